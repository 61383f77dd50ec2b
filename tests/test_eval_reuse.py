"""`pdc run` scores a model once: a later build (another spec, another variant) that evaluates
the same weights with the same settings reuses the scores; an unreadable score file is scored
again."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pdc.cli import main as pdc_main
from pdc.plan.results import read_record
from pdc.stages.evaluate import scores_dir
from tiny_builds import make_project

SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune width {{ hidden={hidden} mlp=64 importance=activation(samples=8, seq_len=32) }}
evaluate with lm_eval {{ tasks_dir="tasks" perplexity(corpus) tiny_mc(0) }}
"""


def _run(root, name, hidden, capsys):
    spec = root / f"{name}.pds"
    spec.write_text(SPEC.format(hidden=hidden))
    assert pdc_main(["run", str(spec)]) == 0
    return read_record(root / "build" / name / "evaluate").result, capsys.readouterr().out


def _without_path(scores):
    return dataclasses.replace(scores, path="")


@pytest.mark.slow  # three pdc runs (43 s); test_bf16_scores_are_their_own keeps a run pair in the default suite
def test_teacher_scored_once_across_specs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))
    make_project(tmp_path, "")
    first, out = _run(tmp_path, "one", 48, capsys)
    assert "[pdc] evaluate: teacher\n" in out and "reused" not in out
    assert len(list(scores_dir().glob("*.json"))) == 2  # teacher and pruned

    second, out = _run(tmp_path, "two", 32, capsys)
    assert "evaluate: teacher: scored before with the same weights and settings, reused" in out
    assert "[pdc] evaluate: pruned\n" in out  # other weights: scored
    assert _without_path(second.models["teacher"]) == _without_path(first.models["teacher"])
    assert second.models["teacher"].path.endswith("tiny")
    assert second.models["pruned"].perplexity != first.models["pruned"].perplexity

    for f in scores_dir().glob("*.json"):
        f.write_text("{not json")
    (tmp_path / "build" / "two" / "evaluate" / "stage.json").unlink()  # the stage runs again
    third, out = _run(tmp_path, "two", 32, capsys)
    assert "reused" not in out and "[pdc] evaluate: teacher\n" in out
    assert _without_path(third.models["teacher"]) == _without_path(first.models["teacher"])


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 matrix units")
def test_bf16_scores_are_their_own(tmp_path, monkeypatch, capsys):
    """`precision=bf16` on a CPU with bf16 units scores in bf16: the perplexities move by bf16's
    rounding only, the result and the report say bf16, and fp32 scores are not reused for it."""
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))
    make_project(tmp_path, "")
    fp32, _ = _run(tmp_path, "one", 48, capsys)
    spec = tmp_path / "half.pds"
    spec.write_text(SPEC.format(hidden=48).replace('tasks_dir="tasks"', 'tasks_dir="tasks" precision=bf16'))
    assert pdc_main(["run", str(spec)]) == 0
    out = capsys.readouterr().out
    bf16 = read_record(tmp_path / "build" / "half" / "evaluate").result
    assert "reused" not in out and (fp32.precision, bf16.precision) == ("fp32", "bf16")
    for label in ("teacher", "pruned"):
        a, b = fp32.models[label].perplexity, bf16.models[label].perplexity
        assert a != b and abs(b / a - 1) < 0.05
    assert "models scored in bf16" in (tmp_path / "build" / "half" / "report.md").read_text()
