"""Mixtures of experts through the production path: `pdc compile`, `pdc check` and `pdc run` on a
tiny Mixtral project (its checkpoint stores each expert's weights apart, as Mixtral checkpoints
do), with the files those commands leave."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdc.cli import main as pdc_main
from pdc.plan.results import read_record
from tiny_builds import MOE_DEPTH_SPEC, MOE_MODEL, MOE_PRUNE_SPEC, MOE_RUN_SPEC, make_project, run_project


def _active(model) -> int:
    k = model.config.num_experts_per_tok
    return sum(p.numel() - (p[0].numel() * (p.shape[0] - k) if p.dim() == 3 else 0) for p in model.parameters())


def test_compile_and_check_a_mixture_of_experts(tmp_path, capsys):
    """`pdc compile` prunes experts, expert neurons and hidden channels: the checkpoint loads
    with the dry run's total and active counts and the kept experts recorded per layer (and
    per expert their neurons); importance.json reports both expert measures; `pdc check`
    recompiles to the same lock."""
    spec = make_project(tmp_path, MOE_PRUNE_SPEC, **MOE_MODEL)
    capsys.readouterr()
    assert pdc_main(["compile", str(spec), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert pdc_main(["compile", str(spec)]) == 0
    build = tmp_path / "build" / "tiny"
    model = AutoModelForCausalLM.from_pretrained(build / "prune" / "model", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == plan["final"]["params_total"]
    assert _active(model) == plan["final"]["params_active"]
    config = json.loads((build / "prune" / "model" / "config.json").read_text())
    assert (config["num_local_experts"], config["intermediate_size"], config["router_aux_loss_coef"]) == (4, 48, 0.02)
    kept = json.loads((build / "prune" / "kept_indices.json").read_text())
    for layer in kept["layers"].values():
        assert len(layer["experts"]) == 4 and sorted(layer["expert_mlp"]) == sorted(map(str, layer["experts"]))
        assert {len(v) for v in layer["expert_mlp"].values()} == {48}
    scores = json.loads((build / "prune" / "importance.json").read_text())
    assert scores["expert_score"] == "mass"
    assert {len(scores["layers"]["0"][k]) for k in ("experts", "expert_mass", "expert_output")} == {8}
    result = read_record(build / "prune").result
    assert result.arch_after["experts"] == 4 and result.params_after == plan["final"]["params_total"]
    assert set(result.artifacts) == {"model", "program.pt2", "model.onnx"}
    capsys.readouterr()
    assert pdc_main(["check", str(spec)]) == 0


@pytest.mark.slow
def test_run_a_mixture_of_experts_end_to_end(tmp_path):
    """`pdc run`: LoRA correction (routers and stacked experts adapted as parameters), width
    pruning with the output-norm expert score, distillation of the MoE student and evaluation;
    then depth pruning of the same model, distilled and evaluated."""
    build = run_project(tmp_path / "width", MOE_RUN_SPEC, **MOE_MODEL)
    correct = read_record(build / "correct").result
    assert correct.method == "lora" and correct.trainable_params > 0
    scores = json.loads((build / "prune" / "importance.json").read_text())
    assert scores["expert_score"] == "output"
    assert scores["layers"]["0"]["experts"] == scores["layers"]["0"]["expert_output"]
    distilled = AutoModelForCausalLM.from_pretrained(build / "distill" / "model")
    assert distilled.config.num_local_experts == 4
    table = (build / "evaluate" / "table.md").read_text()
    assert "distilled" in table and "perplexity" in table
    build = run_project(tmp_path / "depth", MOE_DEPTH_SPEC, **MOE_MODEL)
    assert len(read_record(build / "prune").result.saliency.dropped_layers) == 2
    assert AutoModelForCausalLM.from_pretrained(build / "distill" / "model").config.num_hidden_layers == 2
