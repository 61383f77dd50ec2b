"""Depth saliency is scored on the program (each candidate the program with `drop_layers` applied,
weights shared), for loss, task and cosine: the same tables as the Hugging Face model with the
layers removed (the old way: fixtures/depth_saliency_hf.json, written by depth_saliency_hf.py at
the last commit that had it), and the same again when the weights are streamed from the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, make_tiny_tokenizer
from depth_saliency_hf import BLOCKS, CASES, MC_ITEMS
from eval_support import write_mc_task
from pdc.graph.export import export_dir, export_model, materialize
from pdc.lang.settings import DepthTarget, Saliency
from pdc.stages.depth_on_program import score_candidates, scoring_program
from pdc.stages.prune_depth import candidates, saliency_table

HF_TABLES = json.loads((Path(__file__).parent / "fixtures" / "depth_saliency_hf.json").read_text())


# fp32 task saliency is also checked against a hand-built model (test_depth_prune): slow here.
@pytest.mark.parametrize("name, family, layers, depth, contiguous, saliency", [
    pytest.param(*case, id=case[0], marks=[pytest.mark.slow] if case[0] == "task_llama_single" else [])
    for case in CASES])
def test_program_tables_equal_the_hf_model_with_layers_removed(tmp_path, name, family, layers, depth, contiguous,
                                                               saliency):
    if saliency.precision == "bf16" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 matrix units: the fixture was scored in bf16")
    model = make_tiny_model(family, num_hidden_layers=layers)
    program = export_model(model)
    task = saliency.kind == "task"
    table = saliency_table(scoring_program(program, model, saliency), DepthTarget(depth, saliency, contiguous),
                           None if task else BLOCKS, make_tiny_tokenizer() if task else None,
                           write_mc_task(tmp_path / "tasks", n=MC_ITEMS) if task else None, progress=False)
    old = HF_TABLES[name]
    # Bit for bit on this machine (fp32 and bf16): the graph runs the HF model's own aten ops.
    assert [c["value"] for c in table["candidates"]] == pytest.approx([c["value"] for c in old["candidates"]],
                                                                      rel=1e-6)
    assert [c["layers"] for c in table["candidates"]] == [c["layers"] for c in old["candidates"]]
    assert table["dropped_layers"] == old["dropped_layers"]
    assert table["baseline"] == pytest.approx(old["baseline"], rel=1e-6)
    assert table["after_drop"] == pytest.approx(old["after_drop"], rel=1e-6)
    assert table["items"] == old["items"]
    assert program.arch.layers == layers  # candidates are copies: the program itself is untouched


@pytest.mark.parametrize("kind", ["loss", "cosine"])
def test_streamed_scores_equal_the_loaded_ones(tmp_path, kind):
    make_tiny_model("llama", num_hidden_layers=4).save_pretrained(tmp_path / "src")
    on_meta = export_dir(tmp_path / "src")
    assert on_meta.on_meta()
    real = export_dir(tmp_path / "src")
    materialize(real)
    cands = candidates(4, 2, True)
    streamed = score_candidates(on_meta, cands, Saliency(kind), BLOCKS, progress=False)
    loaded = score_candidates(real, cands, Saliency(kind), BLOCKS, progress=False)
    assert streamed == loaded
    assert on_meta.on_meta()  # scoring read no weight into the program
