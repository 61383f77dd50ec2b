"""Teacher correction concurrent with distillation (`correct ... { order=concurrent }`, the
paper's Figure 4), through `pdc run` on a tiny llama.

The invariant: the concurrent correction sees exactly the batches a sequential correction with
the same settings sees (same seed, batch geometry and split), so after the same number of steps
its teacher has the same weights, while the student learned from the teacher as it moved. A run
interrupted after a checkpoint resumes both models to the same result. The evaluation measures
held-out perplexity on two corpora, each compared between variants over the same blocks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pdc.cli import main as pdc_main
from pdc.plan.results import read_record
from train_support import weights
from tiny_builds import make_project, write_corpus

TRAIN = "global_batch=4 micro_batch=2 seq_len=32"
SPEC = f"""\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")
data other  = jsonl("other.jsonl")

correct teacher on corpus {{ steps=3 lr=2e-3 min_lr=2e-4 warmup=1 {TRAIN} }}
prune width {{ hidden=48 mlp=64 importance=activation(samples=8, seq_len=32) }}
distill from teacher on corpus {{ steps=4 lr=1e-3 min_lr=1e-4 warmup=1 {TRAIN} checkpoint_every=2 val_every=1 }}
evaluate with lm_eval {{ perplexity(corpus, other) }}

compare fig4 {{
  variant sequential {{ correct.order=parallel }}
  variant concurrent {{ correct.order=concurrent }}
}}
"""


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    root = tmp_path_factory.mktemp("concurrent")
    spec = make_project(root, SPEC)
    write_corpus(root / "other.jsonl", n=60, seed=7)
    assert pdc_main(["run", str(spec)]) == 0
    return spec, root / "build" / "tiny"


def test_the_concurrent_teacher_equals_a_correction_on_the_same_batches(build):
    """`parallel` corrects the source teacher in its own stage; `concurrent` inside the
    distillation: same batches, same optimizer and schedule, so the same weights."""
    _, out = build
    sequential = weights(out / "sequential" / "correct" / "model")
    concurrent = weights(out / "concurrent" / "distill" / "teacher")
    source = weights(out.parent.parent / "tiny")
    assert sequential.keys() == concurrent.keys()
    assert any(not torch.equal(sequential[k], source[k]) for k in sequential)  # the correction moved it
    for k in sequential:
        torch.testing.assert_close(concurrent[k], sequential[k], rtol=1e-5, atol=1e-6)


def test_the_student_learned_from_the_teacher_as_it_was_corrected(build):
    """The log holds the teacher's training loss for the correction's 3 steps only, and its
    held-out loss moves during them and is frozen after; the result records the correction and
    the evaluation reads the corrected teacher from the distillation's output."""
    _, out = build
    log = [json.loads(line) for line in (out / "concurrent" / "distill" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "teacher_loss" in r] == [1, 2, 3]
    teacher_val = [r["val_teacher_loss"] for r in log]
    assert len(set(teacher_val[:3])) == 3 and teacher_val[2] == teacher_val[3]
    result = read_record(out / "concurrent" / "distill").result
    assert result.teacher_correction.steps == 3 and result.teacher_correction.method == "full"
    assert result.teacher_val_loss < result.teacher_val_loss_start
    assert "correct" not in {p.name for p in (out / "concurrent").iterdir()}
    scores = read_record(out / "concurrent" / "evaluate").result.models
    assert scores["corrected teacher"].path.endswith("distill/teacher")
    assert list(scores) == ["teacher", "corrected teacher", "pruned", "distilled"]
    # the same corrected weights give the same held-out perplexity in both variants
    sequential = read_record(out / "sequential" / "evaluate").result.models["corrected teacher"]
    assert scores["corrected teacher"].perplexity == pytest.approx(sequential.perplexity, rel=1e-5)


def test_an_interrupted_run_resumes_teacher_and_student(build, tmp_path):
    """Remove the finished distillation but keep its step-2 checkpoint: the rerun resumes there
    (the teacher mid-correction) and ends with the same teacher and student."""
    spec, out = build
    stage = out / "concurrent" / "distill"
    want = {"teacher": weights(stage / "teacher"), "model": weights(stage / "model")}
    work = out / "concurrent" / "distill.work"
    assert json.loads((work / "checkpoints" / "resume.json").read_text())["step"] == 2
    shutil.rmtree(work / "final")
    shutil.rmtree(stage)
    assert pdc_main(["run", str(spec), "--stage", "distill"]) == 0
    result = read_record(stage).result
    assert result.resumed_from_step == 2
    for name, expected in want.items():
        got = weights(stage / name)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)


def test_perplexity_on_several_corpora_is_compared_per_corpus(build):
    """`perplexity(corpus, other)`: every model has both, the second by name; the evaluation
    table and the comparison report show each, with a paired interval per corpus."""
    _, out = build
    result = read_record(out / "concurrent" / "evaluate").result
    assert result.perplexity_data == ("corpus", "other")
    for scores in result.models.values():
        other = scores.more_perplexity["other"]
        assert set(scores.more_perplexity) == {"other"} and other.perplexity > 1
        assert other.perplexity != scores.perplexity and len(other.block_nll) > 1
    assert "perplexity (held-out 'other')" in (out / "concurrent" / "evaluate" / "table.md").read_text()
    report = (out / "comparison.md").read_text()
    assert "perplexity (corpus)" in report and "perplexity (other)" in report
    assert "perplexity ratio (other)" in report and "paired bootstrap over blocks" in report
