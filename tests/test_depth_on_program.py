"""Depth saliency by loss is scored on the program (each candidate the program with
`drop_layers` applied, weights shared): the same table and choice as the Hugging Face model with
the layers removed, and the same again when the weights are streamed from the files."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from pdc.graph.export import export_dir, export_model
from pdc.lang.settings import DepthTarget, Saliency
from pdc.stages.depth_on_program import loss_scores, program_nll, without
from pdc.stages.prune_depth import candidates, saliency_table

BLOCKS = torch.randint(3, 98, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family, contiguous", [("llama", True), ("qwen2", False)])
def test_program_scores_equal_the_hf_model_with_layers_removed(family, contiguous):
    model = make_tiny_model(family, num_hidden_layers=5)
    target = DepthTarget(depth=3, saliency=Saliency("loss"), contiguous=contiguous)
    hf = saliency_table(model, target, BLOCKS, progress=False)
    program = export_model(model)
    on_program = saliency_table(
        None, target, BLOCKS, progress=False, n_layers=5,
        scorer=lambda cands, blocks: loss_scores(program, cands, blocks, progress=False),
        measure_dropped=lambda drop, blocks: program_nll(without(program, drop), blocks))
    values = [c["value"] for c in on_program["candidates"]]
    assert values == pytest.approx([c["value"] for c in hf["candidates"]], rel=1e-5)
    assert on_program["dropped_layers"] == hf["dropped_layers"]
    assert on_program["baseline"] == pytest.approx(hf["baseline"], rel=1e-5)
    assert on_program["after_drop"] == pytest.approx(hf["after_drop"], rel=1e-5)
    assert program.arch.layers == 5  # candidates are copies: the program itself is untouched


def test_streamed_scores_equal_the_loaded_ones(tmp_path):
    make_tiny_model("llama", num_hidden_layers=4).save_pretrained(tmp_path / "src")
    on_meta = export_dir(tmp_path / "src")
    assert on_meta.on_meta()
    from pdc.graph.export import materialize

    real = export_dir(tmp_path / "src")
    materialize(real)
    cands = candidates(4, 2, True)
    streamed_values, streamed_base = loss_scores(on_meta, cands, BLOCKS, progress=False)
    real_values, real_base = loss_scores(real, cands, BLOCKS, progress=False)
    assert streamed_values == real_values and streamed_base == real_base
    assert on_meta.on_meta()  # scoring read no weight into the program
