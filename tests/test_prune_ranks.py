"""Importance and depth saliency split over processes (`pdc run --nproc-per-node N`): the
calibration batches, saliency candidates and cosine blocks are shared out over ranks (torchrun,
gloo on this CPU) and the sums all-reduced, so 1, 2 and 4 processes keep the same units and drop
the same layers."""

from __future__ import annotations

import json
import os
from unittest import mock
from pathlib import Path

import pytest

from pdc.cli import main as pdc_main
from tiny_builds import make_project

HEAD = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune width { hidden=48 mlp=64 heads=2 kv_heads=1 importance=activation(samples=12, seq_len=32) }
"""
TAIL = """\
prune depth { depth=1 contiguous=true saliency=task(tiny_mc, shots=0) }
evaluate with lm_eval { tasks_dir="tasks" tiny_mc(0) }
"""
SPECS = {
    # width by activation importance, then depth by task accuracy (lm-eval on each rank alone)
    # and a data-parallel evaluation
    "width+task": HEAD + TAIL.replace("depth=1", "depth=3"),
    # and between them depth by loss (single layers scored alone) and by cosine block influence,
    # each on the previous result: every split measurement in one build
    "all": HEAD + """\
prune depth { depth=3 contiguous=false saliency=loss(corpus, samples=6, seq_len=16) }
prune depth { depth=2 contiguous=true saliency=cosine(corpus, samples=6, seq_len=16) }
""" + TAIL,
}


def _build(root: Path, spec_text: str, nproc: int) -> tuple[dict, list]:
    spec = make_project(root, spec_text)
    # A cache of its own: scores kept by another build of the same model would be reused and
    # the evaluation would not run at all.
    with mock.patch.dict(os.environ, {"PDC_CACHE": str(root / "cache")}):
        assert pdc_main(["run", str(spec), "--nproc-per-node", str(nproc)]) == 0
    build = root / "build" / "tiny"
    stages = [p.name for p in build.iterdir() if p.is_dir() and p.name.startswith("prune")
              and not p.name.endswith((".work", ".tmp"))]
    kept = {s: json.loads((build / s / "kept_indices.json").read_text()) for s in sorted(stages)}
    logs = sorted(p.parent.name.removesuffix(".work") for p in build.glob("*.work/launch.log"))
    return kept, logs


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    built = {}

    def get(name: str) -> dict:
        if name not in built:
            built[name], logs = _build(tmp_path_factory.mktemp("ranks1"), SPECS[name], 1)
            assert logs == []  # one process: nothing launched
        return built[name]
    return get


# All slow (two or four torchrun launches each): 134 s for the lightest on this CPU.
@pytest.mark.parametrize("name, nproc", [
    pytest.param("width+task", 2, marks=pytest.mark.slow),
    pytest.param("all", 2, marks=pytest.mark.slow),
    pytest.param("all", 4, marks=pytest.mark.slow),
])
def test_processes_keep_the_same_units_and_drop_the_same_layers(one_process, tmp_path, name, nproc):
    kept, logs = _build(tmp_path, SPECS[name], nproc)
    assert kept == one_process(name)
    assert len(kept) == SPECS[name].count("prune ")
    assert logs == sorted([*kept, "evaluate"])  # every measurement ran in ranks
