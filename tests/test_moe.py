"""Mixtures of experts pruned from their graph alone: tiny random Mixtral, Qwen3-MoE and OLMoE
models (and Qwen2-MoE for the shared expert), built from configs and saved as Hugging Face
checkpoints (which store each expert's weights apart: transformers merges them on load), through
the functions `pdc run` calls.

For every family: keeping everything reproduces the source checkpoint's logits; pruning experts,
expert neurons, hidden channels and heads (and dropping layers) emits a checkpoint that
`AutoModelForCausalLM` loads, that computes the rewritten program's logits (fp32, 1e-5 relative)
and whose total and active parameters are what `pdc compile --dry-run` predicts from the
source's config.json alone; the router's settings are carried over.
"""

from __future__ import annotations

import json

import pytest
import torch

from family_sources import checkpoint_fixtures
from graph_exports import assert_same_logits, load_hf
from pdc.emit.pruned import emit_pruned
from pdc.graph import importance as imp_mod
from pdc.graph.export import export_dir, materialize
from pdc.graph.manager import PassManager
from pdc.graph.structure import structure_of
from pdc.lang.settings import ImportanceConfig, WidthTarget
from pdc.passes.drop_layers import DropLayers
from pdc.passes.slice_expert_mlp import SliceExpertMlp
from pdc.passes.slice_experts import SliceExperts
from pdc.passes.slice_heads import SliceHeads
from pdc.passes.slice_hidden import SliceHidden
from pdc.passes.slice_shared_mlp import SliceSharedMlp
from pdc.plan.counts import count_arch
from pdc.stages.prune_width import prune_program

IDS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
             pad_token_id=3)
# family -> (config overrides, width target the emitted config can represent). OLMoE sizes its
# q/k norms from hidden_size, so there hidden must stay heads x head_dim.
FAMILIES = {
    "mixtral": (dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02),
                WidthTarget(hidden=48, heads=2, experts=4, expert_mlp=48)),
    "qwen3_moe": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True),
                  WidthTarget(hidden=48, heads=2, kv_heads=1, experts=3, expert_mlp=16)),
    "olmoe": (dict(num_experts=8, num_experts_per_tok=2, output_router_logits=True),
              WidthTarget(hidden=32, heads=2, experts=5, expert_mlp=40)),
    "qwen2_moe": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48),
                  WidthTarget(hidden=48, heads=2, kv_heads=1, experts=4, expert_mlp=16, shared_mlp=24)),
}
ROUTER_KEYS = ("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits", "norm_topk_prob",
               "router_jitter_noise")


source_dirs, programs = checkpoint_fixtures(FAMILIES, SIZES, "moe")


def _counts(model) -> tuple[int, int]:
    """(total, active per token) of a loaded model, from its modules: a token runs top_k of the
    experts stacked along dim 0 of each 3-D expert weight."""
    k = model.config.num_experts_per_tok
    total = sum(p.numel() for p in model.parameters())
    idle = sum(p[0].numel() * (p.shape[0] - k) for p in model.parameters() if p.dim() == 3)
    return total, total - idle


def _dry_run(source_dir, target: WidthTarget, tmp_path, capsys) -> dict:
    """`pdc compile --dry-run --json` of a width spec on a directory holding only config.json:
    the final student's counts."""
    from pdc.cli import main

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((source_dir / "config.json").read_text())
    sizes = " ".join(f"{a}={getattr(target, a)}" for a in ("hidden", "heads", "kv_heads", "experts", "expert_mlp",
                                                           "shared_mlp") if getattr(target, a) is not None)
    spec = tmp_path / "w.pds"
    spec.write_text(f'model m = dir("cfg")\nprune width {{ {sizes} importance=magnitude }}\n')
    capsys.readouterr()
    assert main(["compile", str(spec), "--dry-run", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["final"]


REQUIRED = ["mixtral", "qwen3_moe", "olmoe"]


@pytest.mark.parametrize("family", REQUIRED + ["qwen2_moe"])
def test_structure_is_found_in_the_graph(family, programs):
    """Router, top-k, stacked gate|up and down, and (Qwen2-MoE) the shared expert with its gate,
    from the graph: every layer is a mixture with the config's sizes."""
    program = programs(family)
    a = program.arch
    for layer in structure_of(program).layers:
        e = layer.moe
        assert layer.mlp is None and e is not None
        assert (e.experts, e.top_k, e.size) == (a.experts, a.top_k, a.expert_mlp)
        assert e.router.endswith("gate.weight") and e.down.endswith("experts.down_proj")
        assert [(s.offset, s.units) for s in e.spans] == [(0, a.expert_mlp), (a.expert_mlp, a.expert_mlp)]
        assert (e.shared is not None) == (family == "qwen2_moe")
        if e.shared:
            assert e.shared.size == a.shared_mlp and e.shared_gate.endswith("shared_expert_gate.weight")


@pytest.mark.parametrize("family", REQUIRED + ["qwen2_moe"])
def test_keep_all_reproduces_source_logits(family, source_dirs, programs):
    """The program exported from the checkpoint (per-expert tensors merged as transformers
    merges them) computes its logits, and slicing passes that keep every unit leave them
    bit-identical; the structure they keep up to date equals rediscovery (check="full")."""
    program = programs(family)
    assert_same_logits(load_hf(source_dirs(family)), program, IDS)
    before = program.forward(IDS)
    a = program.arch
    layers = range(a.layers)
    passes = [
        SliceHidden(torch.arange(a.hidden)),
        SliceHeads({i: torch.arange(a.heads) for i in layers}, {i: torch.arange(a.kv_heads) for i in layers}),
        SliceExperts({i: torch.arange(a.experts) for i in layers}),
        SliceExpertMlp({i: torch.arange(a.expert_mlp).expand(a.experts, -1) for i in layers}),
    ]
    if a.shared_mlp:
        passes.append(SliceSharedMlp({i: torch.arange(a.shared_mlp) for i in layers}))
    PassManager(passes, check="full").run(program)
    assert torch.equal(program.forward(IDS), before)


@pytest.mark.parametrize("family", REQUIRED + ["qwen2_moe"])
def test_width_prune_checkpoint_equals_program(family, source_dirs, programs, tmp_path, capsys):
    """Activation importance, slicing and emission as the width stage runs them: the emitted
    checkpoint loads, computes the rewritten program's logits, has the total and active counts
    that `pdc compile --dry-run` predicts, and keeps the source's router settings."""
    predicted = _dry_run(source_dirs(family), FAMILIES[family][1], tmp_path, capsys)
    program = programs(family)
    source_cfg = dict(program.hf_config)
    target = FAMILIES[family][1]
    _, report = prune_program(program, CALIB, target, ImportanceConfig(), progress=False)
    for axis in ("hidden", "heads", "kv_heads", "experts", "expert_mlp", "shared_mlp"):
        if getattr(target, axis) is not None:
            assert getattr(program.arch, axis) == getattr(target, axis)
    emit_pruned(program, tmp_path, source_dirs(family), None, deploy=False)
    model = load_hf(tmp_path / "model")
    assert_same_logits(model, program, IDS)
    total, active = _counts(model)
    assert total == program.num_params() == count_arch(source_cfg, program.arch).total == predicted["params_total"]
    assert active == predicted["params_active"] < total
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    for key in ROUTER_KEYS:
        if key in source_cfg:
            assert config[key] == source_cfg[key], key
    # Each kept expert keeps its own best neurons: the ones its activation scores rank highest.
    scores = report["importance"]
    kept = json.loads((tmp_path / "kept_indices.json").read_text())["layers"]["0"]
    assert len(kept["experts"]) == target.experts == len(kept["expert_mlp"])
    for e in kept["experts"]:
        assert kept["expert_mlp"][str(e)] == imp_mod.top_k(scores.expert_mlp[0][e], target.expert_mlp).tolist()
    assert kept["experts"] == imp_mod.top_k(scores.experts[0], target.experts).tolist()


@pytest.mark.parametrize("family", REQUIRED)
def test_depth_prune_checkpoint_equals_program(family, source_dirs, programs, tmp_path):
    """Dropping a mixture-of-experts layer (its router's in-place renormalisation goes with it):
    the emitted checkpoint computes the rewritten program's logits and has the dry run's count."""
    program = programs(family)
    source_cfg = dict(program.hf_config)
    PassManager([DropLayers([1])]).run(program)
    emit_pruned(program, tmp_path, source_dirs(family), None, deploy=False)
    model = load_hf(tmp_path / "model")
    assert_same_logits(model, program, IDS)
    counts = count_arch(source_cfg, program.arch)
    assert _counts(model) == (counts.total, counts.active) == (program.num_params(), counts.active)


def test_expert_scores_rank_what_the_model_relies_on(source_dirs, tmp_path):
    """Both expert measures on calibration data: with Mixtral's renormalised top-k the routed
    mass of all experts sums to the number of tokens; an expert whose output is zeroed (its down
    projection) scores 0 by output norm and is the one `experts=output` drops, while the mass,
    which only sees the router, still ranks it."""
    from safetensors.torch import load_file, save_file

    src = source_dirs("mixtral")
    dead = tmp_path / "dead"
    dead.mkdir()
    for f in src.iterdir():
        (dead / f.name).write_bytes(f.read_bytes())
    tensors = load_file(dead / "model.safetensors")
    for key in tensors:
        if ".experts.5.w2." in key:  # expert 5's down projection in every layer
            tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, dead / "model.safetensors", metadata={"format": "pt"})
    program = export_dir(dead)
    materialize(program)
    scores = imp_mod.compute(program, CALIB, ImportanceConfig(), progress=False)
    for i in range(program.arch.layers):
        assert scores.expert_mass[i].sum().item() == pytest.approx(CALIB.numel(), rel=1e-5)
        assert scores.expert_output[i][5] == 0 and (scores.expert_output[i] > 0).sum() >= 6
        assert torch.equal(scores.experts[i], scores.expert_mass[i])  # the default measure
        assert scores.expert_mass[i][5] > 0
    assert 5 not in imp_mod.top_k(scores.expert_output[0], 7).tolist()
    data = scores.to_json()
    assert data["expert_score"] == "mass" and set(data["layers"]["0"]) >= {"expert_mass", "expert_output",
                                                                              "expert_mlp"}
    assert imp_mod.Importance.from_json(data).expert_mlp[0].shape == (8, 96)


def test_experts_below_top_k_are_refused(source_dirs, tmp_path):
    """The stage refuses fewer experts than the router picks per token, in one line, before
    exporting (the checker says the same about a spec)."""
    from pdc.errors import PdcError
    from pdc.stages.prune_width import prune_width

    with pytest.raises(PdcError) as err:
        prune_width(source_dirs("mixtral"), CALIB, WidthTarget(experts=1), ImportanceConfig(), tmp_path / "out",
                    progress=False)
    assert err.value.message == "cannot keep 1 experts: the router picks 2 per token"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_correction_targets_come_from_the_structure(family, source_dirs):
    """LoRA adapts every linear layer (attention, a shared expert and its gate) as modules and the
    routers and stacked expert weights as parameters; peft accepts both lists as they are and a
    step of training changes the experts' effective weights."""
    from peft import LoraConfig, get_peft_model

    from pdc.stages.correct import correction_targets

    model = load_hf(source_dirs(family))
    head = model.get_output_embeddings()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    targets = correction_targets(source_dirs(family), "lora")
    assert set(targets["lora_modules"]) == linears
    stacked = {n for n, p in model.named_parameters() if p.dim() == 3}
    routers = {n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight")}
    assert set(targets["lora_parameters"]) == stacked | routers
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=targets["lora_modules"],
                                               target_parameters=targets["lora_parameters"]))
    trained = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert any(".experts." in n for n in trained) and any(".self_attn." in n for n in trained)


@pytest.mark.parametrize("family", REQUIRED)
def test_active_count_is_what_one_token_uses(family, source_dirs, programs, tmp_path):
    """The dry run's active count, measured: a backward pass from one token's logits reaches
    exactly the expert slices that token ran (its top-k per layer); every other parameter counts
    whole (the router scores every expert; the embedding is a table, counted whole by
    convention). Before and after pruning experts."""
    def used(model) -> int:
        model.zero_grad()
        model(input_ids=IDS[:1, :1]).logits.sum().backward()
        total = 0
        for p in model.parameters():
            if p.dim() == 3:
                hit = p.grad is not None and p.grad.flatten(1).abs().sum(1).gt(0)
                assert int(hit.sum()) == model.config.num_experts_per_tok
                total += int(hit.sum()) * p[0].numel()
            else:
                total += p.numel()
        return total

    source = load_hf(source_dirs(family))
    assert used(source) == count_arch(programs(family).hf_config, programs(family).arch).active
    program = programs(family)
    source_cfg = dict(program.hf_config)
    prune_program(program, None, WidthTarget(experts=3, expert_mlp=16), ImportanceConfig(method="magnitude"),
                  progress=False)
    emit_pruned(program, tmp_path, source_dirs(family), None, deploy=False)
    assert used(load_hf(tmp_path / "model")) == count_arch(source_cfg, program.arch).active


def test_dense_and_expert_layers_mixed():
    """Qwen3-MoE's `mlp_only_layers`: a dense MLP in layer 1 between mixtures; `mlp=` slices the
    dense layer, `experts=`/`expert_mlp=` the mixtures, and the count is the emitted config's."""
    from conftest import make_tiny_model
    from pdc.graph.export import export_model

    model = make_tiny_model("custom", model_type="qwen3_moe", **SIZES, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=32, mlp_only_layers=[1])
    program = export_model(model)
    assert [(l.mlp is not None, l.moe is not None) for l in structure_of(program).layers] == [
        (False, True), (True, False), (False, True)]
    source_cfg = dict(program.hf_config)
    prune_program(program, CALIB, WidthTarget(hidden=48, mlp=48, experts=4, expert_mlp=16), ImportanceConfig(),
                  progress=False)
    assert (program.arch.mlp, program.arch.experts, program.arch.expert_mlp) == (48, 4, 16)
    assert program.num_params() == count_arch(source_cfg, program.arch).total
    assert "experts" in program.kept["layers"]["0"] and len(program.kept["layers"]["1"]["mlp"]) == 48
