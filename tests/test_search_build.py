"""`pdc run` of a tiny spec with `prune search` before a cached distillation: the top candidates
are distilled briefly from the teacher-logit cache, the lock records the choice and `pdc check`
reproduces it. Slow (a search, short distillations and a check's rebuild)."""

from __future__ import annotations

import json

import pytest

from pdc.cli import main as pdc_main
from tiny_builds import make_project

SEARCH_SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune search {
  params<=0.85x axes(mlp=32, depth=1) slack=0.3 top=2 steps=2 samples=4
  importance=activation(samples=8, seq_len=32) saliency=cosine
  mark(hand, mlp=64)
}
distill from teacher on corpus { steps=3 lr=1e-3 global_batch=4 micro_batch=2 seq_len=32 teacher_logits=cached(k=8) }
"""


@pytest.mark.slow
def test_search_build_ranks_by_short_distillation_and_locks_the_choice(tmp_path):
    spec = make_project(tmp_path, SEARCH_SPEC)
    assert pdc_main(["run", str(spec), "--stage", "prune"]) == 0
    build = tmp_path / "build" / "tiny"
    search = json.loads((build / "prune" / "search.json").read_text())
    rows = search["candidates"]
    distilled = [r for r in rows if r["distill_loss"] is not None]
    assert len(distilled) == 2 and {r["cheap_rank"] for r in distilled} == {1, 2}
    best = min(distilled, key=lambda r: r["distill_loss"])
    assert search["chosen_sizes"] == best["sizes"] and search["hand"]["hand"]["sizes"]["mlp"] == 64
    lock = json.loads((tmp_path / "tiny.prune.lock.json").read_text())
    assert lock["search"]["chosen"] == best["sizes"]
    assert lock["arch"]["mlp"] == best["sizes"]["mlp"] and lock["arch"]["layers"] == best["sizes"]["depth"]
    assert pdc_main(["check", str(spec)]) == 0
