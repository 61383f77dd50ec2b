"""Every collective pdc runs, on the process group a GPU rank joins: host-side sums (validation,
step statistics, importance and saliency totals) are CPU tensors, which an NCCL-only group cannot
carry. `group_backend` gives a GPU rank gloo for them beside NCCL; the check in
tests/collective_check wraps torch.distributed in every test process and every rank it starts."""

from __future__ import annotations

import json
import os
from collections import Counter
from unittest import mock

import pytest
import torch

import collective_check
from pdc.cli import main as pdc_main
from pdc.stages.process_group import group_backend
from tiny_builds import make_project


def test_the_gpu_group_has_a_backend_for_cpu_and_gpu_tensors():
    assert group_backend(torch.device("cuda", 3)) == "cpu:gloo,cuda:nccl"
    assert group_backend(torch.device("cpu")) == "gloo"
    gpu = collective_check.backend_map(group_backend(torch.device("cuda", 0)))
    collective_check.check("all_reduce", ["cpu", "cuda"], "test", gpu)


def test_the_check_refuses_cpu_tensors_on_an_nccl_only_group():
    """What `init_process_group("nccl")` (the group pdc joined on a GPU before) would do to the
    validation sums: the check fails it, so a regression fails every multi-rank test."""
    with pytest.raises(RuntimeError, match="no backend for them"):
        collective_check.check("all_reduce", ["cpu"], "pdc.stages.train.loop", collective_check.backend_map("nccl"))


SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune width { hidden=48 mlp=64 importance=activation(samples=8, seq_len=32) }
prune depth { depth=3 contiguous=true saliency=cosine(corpus, samples=4, seq_len=16) }
prune depth { depth=2 contiguous=true saliency=task(tiny_mc, shots=0) }
distill from teacher on corpus { steps=2 lr=1e-3 warmup=1 global_batch=4 micro_batch=1 seq_len=32 val_every=1 }
evaluate with lm_eval { tasks_dir="tasks" perplexity(corpus) tiny_mc(0) }
"""


@pytest.mark.slow  # one build of five stages on two ranks each (~5 min on this shared CPU)
def test_every_distributed_path_runs_its_collectives_on_the_gpu_groups_devices(tmp_path, monkeypatch):
    """Distillation with validation, importance, block influence, task saliency and evaluation on two
    ranks: every rank joined the group through `group_backend`, and every collective (pdc's own,
    DeepSpeed's, lm-eval's) had tensors the GPU group carries."""
    log = tmp_path / "collectives.jsonl"
    monkeypatch.setenv("PDC_COLLECTIVE_LOG", str(log))
    spec = make_project(tmp_path, SPEC)
    with mock.patch.dict(os.environ, {"PDC_CACHE": str(tmp_path / "cache")}):
        assert pdc_main(["run", str(spec), "--nproc-per-node", "2"]) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    joins = [r for r in records if r["op"] == "init_process_group"]
    assert len(joins) == 2 * 5 and {(r["backend"], r["where"]) for r in joins} == {("gloo", "pdc.stages.process_group")}
    collectives = [r for r in records if r["op"] != "init_process_group"]
    assert all(r["ok"] for r in collectives)
    where = Counter(r["where"] for r in collectives)
    for module in ("pdc.stages.train.loop", "pdc.graph.importance", "pdc.stages.prune_depth", "pdc.stages.evaluate"):
        assert where[module] > 0, (module, where)
    assert any(r["where"] == "pdc.stages.train.loop" and "cpu" in r["devices"] for r in collectives)
