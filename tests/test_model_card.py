"""Model cards in the students that `pdc run` built (the session's `width_build` and `depth_build`):
every emitted checkpoint carries a README.md that `huggingface_hub.ModelCard.load` reads, whose
metadata and text say what the typed records say."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub import ModelCard

from pdc.emit.fingerprint import model_identity
from pdc.lang import load_spec
from pdc.plan.results import read_record
from pdc.runner.build import Build
from pdc.stages.evaluate import comparison_rows


@pytest.mark.parametrize("stage, tags", [("correct", {"pdc"}), ("prune", {"pdc", "pruned"}),
                                         ("distill", {"pdc", "pruned", "distilled"})])
def test_every_width_build_checkpoint_has_a_card(width_build, stage, tags):
    card = ModelCard.load(width_build / stage / "model" / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert tags <= set(card.data.tags) and ("distilled" in card.data.tags) == (stage == "distill")
    source = model_identity(width_build.parent.parent / "tiny")
    assert source.weights_sha256["model.safetensors"] in card.text  # lineage: the source by hash
    assert "prune width { hidden=48 mlp=64" in card.text  # the spec


def test_distilled_card_has_lineage_training_and_evaluation(width_build):
    """The distilled student's card: the pruned dimensions, importance and calibration tokens,
    the training stages' tokens and losses, and the comparison table with its column marked."""
    text = ModelCard.load(width_build / "distill" / "model" / "README.md").text
    prune = read_record(width_build / "prune").result
    correct = read_record(width_build / "correct").result
    distill = read_record(width_build / "distill").result
    evaluate = read_record(width_build / "evaluate").result
    assert "| hidden channels | 64 | 48 |" in text and "| MLP neurons per layer | 96 | 64 |" in text
    assert f"{prune.importance} importance on {prune.calibration_tokens:,} calibration tokens" in text
    assert prune.inputs.model.sha256 in text and prune.inputs.calibration.sha256 in text
    for train in (correct, distill):
        assert f"{train.steps} steps, {train.tokens:,} tokens" in text
    assert f"| held-out loss, end | {correct.val_loss_end:.4g} | {distill.val_loss_end:.4g} |" in text
    columns, rows = comparison_rows(evaluate)
    assert "| metric | teacher | corrected teacher | pruned | **distilled** (this model) |" in text
    for row in rows:
        assert "| " + " | ".join(row) + " |" in text


def test_depth_card_names_the_dropped_layers(depth_build):
    card = ModelCard.load(depth_build / "prune" / "model" / "README.md")
    sal = read_record(depth_build / "prune").result.saliency
    assert "pruned" in card.data.tags
    assert f"Dropped decoder layers (source numbering): {list(sal.dropped_layers)}" in card.text
    assert f"task saliency on `{sal.task}` ({sal.shots}-shot)" in card.text
    assert "| decoder layers | 4 | 2 |" in card.text
    assert "**pruned** (this model)" in card.text


def test_cards_are_refreshed_from_the_records(width_build, tmp_path):
    """A card is derived data: removed, it comes back identical from the records."""
    project = tmp_path / "project"
    shutil.copytree(width_build.parent.parent, project)
    build = project / "build" / "tiny"
    before = (build / "prune" / "model" / "README.md").read_text()
    (build / "prune" / "model" / "README.md").unlink()
    written = Build(load_spec(project / "tiny.pds"), build, progress=False).write_cards()
    assert len(written) == 3
    assert (build / "prune" / "model" / "README.md").read_text() == before
