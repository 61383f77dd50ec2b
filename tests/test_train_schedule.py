"""Batch geometry, step counts, the DeepSpeed LR schedule's shape, and the data order."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pdc.errors import PdcError
from pdc.lang.settings import TrainConfig
from pdc.stages.train.loop import global_batch_indices, rank_micro_batch
from pdc.plan.training import ds_config, grad_accumulation, total_steps
from pdc.stages.train.schedule import lr_schedule


def test_cosine_schedule_warms_up_then_decays_to_min():
    """Linear warm-up over `warmup` steps, then monotone cosine decay ending exactly at min_lr."""
    cfg = TrainConfig(steps=50, lr=1e-3, min_lr=1e-4, warmup=10)
    lrs = lr_schedule(cfg, 50)
    warm, decay = lrs[:10], lrs[10:]
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert warm[0] > 0 and max(lrs) <= cfg.lr + 1e-12 and max(lrs) > 0.9 * cfg.lr
    assert all(b <= a + 1e-15 for a, b in zip(decay, decay[1:]))
    assert lrs[-1] == pytest.approx(cfg.min_lr)
    # Cosine, not linear: step k >= warmup follows min + (lr - min) * (1 + cos(pi * progress)) / 2.
    n, w = 50, 10
    for k in range(w, n + 1):
        progress = min(1.0, (k - w + 1) / (n - w))
        expected = cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress)) / 2
        assert lrs[k - 1] == pytest.approx(expected)


def test_no_warmup_starts_at_peak():
    lrs = lr_schedule(TrainConfig(steps=20, lr=2e-3, min_lr=2e-4, warmup=0), 20)
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-4)


def test_constant_and_linear_schedules():
    const = lr_schedule(TrainConfig(lr=1e-3, warmup=4, schedule="constant"), 20)
    assert const[3:] == pytest.approx([1e-3] * 17) and 0 < const[0] < const[1] < const[2] < 1e-3
    lin = lr_schedule(TrainConfig(lr=1e-3, min_lr=1e-4, warmup=4, schedule="linear"), 20)
    diffs = [b - a for a, b in zip(lin[4:], lin[5:])]
    assert all(d < 0 for d in diffs) and max(diffs) == pytest.approx(min(diffs))  # straight line
    assert lin[-1] == pytest.approx(1e-4)


def test_global_batch_is_micro_times_accumulation_times_world():
    cfg = TrainConfig(global_batch=16, micro_batch=2)
    assert grad_accumulation(cfg, 1, "distill") == 8
    assert grad_accumulation(cfg, 4, "distill") == 2
    c = ds_config(cfg, 10, 2, "distill", bf16=False)
    assert c["train_batch_size"] == c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * 2
    with pytest.raises(PdcError, match="not a multiple"):
        grad_accumulation(cfg, 3, "distill")


def test_steps_from_tokens_round_up():
    assert total_steps(TrainConfig(tokens=1000, global_batch=2, seq_len=100), "distill") == 5
    assert total_steps(TrainConfig(tokens=1001, global_batch=2, seq_len=100), "distill") == 6
    assert total_steps(TrainConfig(steps=7, tokens=10**9), "distill") == 7
    with pytest.raises(PdcError, match="steps"):
        total_steps(TrainConfig(), "distill")


def test_zero_stage_3_is_rejected_with_one_line():
    with pytest.raises(PdcError, match="ZeRO stage 3"):
        ds_config(TrainConfig(zero=3), 10, 1, "correct", bf16=False)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), g=st.integers(1, 12), seed=st.integers(0, 100))
def test_data_order_covers_each_epoch_once_and_is_deterministic(n, g, seed):
    """Consecutive global batches walk seeded epoch permutations: every block once per epoch."""
    steps = (3 * n) // g + 1
    stream = torch.cat([global_batch_indices(n, g, s, seed) for s in range(steps)])
    for e in range(len(stream) // n):
        assert sorted(stream[e * n:(e + 1) * n].tolist()) == list(range(n))
    again = torch.cat([global_batch_indices(n, g, s, seed) for s in range(steps)])
    assert torch.equal(stream, again)


@settings(max_examples=30, deadline=None)
@given(micro=st.integers(1, 4), accum=st.integers(1, 4), world=st.integers(1, 4))
def test_rank_micro_batches_partition_the_global_batch(micro, accum, world):
    g = micro * accum * world
    idx = global_batch_indices(50, g, 3, 0)
    parts = [rank_micro_batch(idx, micro, a, r, world) for a in range(accum) for r in range(world)]
    assert sorted(torch.cat(parts).tolist()) == sorted(idx.tolist())
    assert all(len(p) == micro for p in parts)


def test_stage_files_hold_the_deepspeed_config_and_both_launch_lines(tmp_path):
    """ds_config.json: AdamW (torch), WarmupCosineLR with min/peak ratio, ZeRO stage, global batch;
    launch.sh: the torchrun (CPU/gloo) line pdc runs and the deepspeed launcher line for GPUs."""
    import json

    from pdc.emit.launch_files import write_stage_files

    cfg = TrainConfig(steps=100, lr=2e-4, min_lr=2e-5, warmup=10, global_batch=8, micro_batch=2, zero=1)
    write_stage_files(tmp_path / "w", cfg, stage="distill", world_size=2)
    c = json.loads((tmp_path / "w" / "ds_config.json").read_text())
    assert c["optimizer"]["type"] == "AdamW" and c["optimizer"]["params"]["torch_adam"] is True
    assert c["scheduler"]["type"] == "WarmupCosineLR"
    assert c["scheduler"]["params"]["cos_min_ratio"] == pytest.approx(0.1)
    assert c["scheduler"]["params"]["total_num_steps"] == 100
    assert c["zero_optimization"]["stage"] == 1 and c["gradient_accumulation_steps"] == 2
    script = (tmp_path / "w" / "launch.sh").read_text()
    assert "torch.distributed.run --nproc_per_node 2" in script and "-m pdc.stages.train.worker --stage-dir" in script
    assert "deepspeed --num_gpus 2 --module pdc.stages.train.worker" in script
