"""Batch geometry, step counts, the DeepSpeed LR schedule's shape, and the data order."""

from __future__ import annotations

import math
import subprocess

import pytest
import torch
from hypothesis import given, settings, strategies as st

from pdc.errors import PdcError
from pdc.lang.settings import TrainConfig
from pdc.inputs.order import DataCursor, global_batch_indices, rank_micro_batch
from pdc.plan.training import Launch, batch_geometry, ds_config, grad_accumulation, total_steps
from train_support import lr_schedule


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
    with pytest.raises(PdcError, match="valid world sizes: 1, 2, 4, 8, 16$"):
        grad_accumulation(cfg, 3, "distill")


@settings(max_examples=60, deadline=None)
@given(g=st.integers(1, 400), micro=st.integers(1, 16), world=st.integers(1, 64))
def test_any_world_size_that_divides_the_global_batch_works(g, micro, world):
    """global = micro x accumulation x world, micro never above the spec's; otherwise refused."""
    cfg = TrainConfig(global_batch=g, micro_batch=micro)
    if g % world:
        with pytest.raises(PdcError, match="valid world sizes"):
            batch_geometry(cfg, world, "distill")
        return
    m, gas = batch_geometry(cfg, world, "distill")
    assert m * gas * world == g and 1 <= m <= micro
    assert all((g // world) % bigger for bigger in range(m + 1, micro + 1))  # the largest that fits


def test_the_papers_global_batch_on_256_gpus_lists_the_world_sizes_that_work():
    with pytest.raises(PdcError) as info:
        batch_geometry(TrainConfig(global_batch=1152, micro_batch=4), 256, "distill")
    assert "global_batch 1152 cannot be split evenly over 256 processes" in info.value.message
    assert ", 128, 144, 192, 288, 384, 576, 1152" in info.value.message
    assert batch_geometry(TrainConfig(global_batch=1152, micro_batch=4), 128, "distill") == (3, 3)


def test_steps_from_tokens_round_up():
    assert total_steps(TrainConfig(tokens=1000, global_batch=2, seq_len=100), "distill") == 5
    assert total_steps(TrainConfig(tokens=1001, global_batch=2, seq_len=100), "distill") == 6
    assert total_steps(TrainConfig(steps=7, tokens=10**9), "distill") == 7
    with pytest.raises(PdcError, match="steps"):
        total_steps(TrainConfig(), "distill")


def test_zero_stages_0_to_3_are_written_and_4_is_refused():
    for zero in range(4):
        assert ds_config(TrainConfig(zero=zero), 10, 1, "correct", bf16=False)["zero_optimization"]["stage"] == zero
    with pytest.raises(PdcError, match="ZeRO stage 4 does not exist"):
        ds_config(TrainConfig(zero=4), 10, 1, "correct", bf16=False)


def test_the_data_cursor_continues_where_it_stopped_and_refuses_other_data():
    a = DataCursor(10, 4, seed=3)
    first = [a.next_batch() for _ in range(5)]
    b = DataCursor(10, 4, seed=3)
    b.next_batch(), b.next_batch()
    c = DataCursor(10, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert all(torch.equal(c.next_batch(), x) for x in first[2:])
    assert torch.equal(first[3], global_batch_indices(10, 4, 3, 3))
    with pytest.raises(PdcError, match="n_blocks=10, this run has 11"):
        DataCursor(11, 4, seed=3).load_state_dict(b.state_dict())


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


def test_stage_files_hold_the_deepspeed_config_and_every_launcher(tmp_path):
    """ds_config.json: AdamW (torch), WarmupCosineLR with min/peak ratio, ZeRO stage, global batch;
    launch.sh (torchrun, c10d), deepspeed.sh + hostfile, slurm.sbatch: all start the same worker on
    the same stage directory with the same world size."""
    import json

    from pdc.stages.train.launch_files import write_stage_files

    cfg = TrainConfig(steps=100, lr=2e-4, min_lr=2e-5, warmup=10, global_batch=8, micro_batch=2, zero=1,
                      precision="bf16")
    write_stage_files(tmp_path / "w", cfg, stage="distill", launch=Launch(nnodes=2, nproc_per_node=2,
                                                                          rdzv_endpoint="node0:29400"))
    c = json.loads((tmp_path / "w" / "ds_config.json").read_text())
    # written on this CPU, the files say what the spec and the launch ask: bf16, 2 GPUs a node
    assert c["bf16"] == {"enabled": True}
    assert "\n#SBATCH --gpus-per-node=2\n" in (tmp_path / "w" / "slurm.sbatch").read_text()
    assert c["optimizer"]["type"] == "AdamW" and c["optimizer"]["params"]["torch_adam"] is True
    assert c["scheduler"]["type"] == "WarmupCosineLR"
    assert c["scheduler"]["params"]["cos_min_ratio"] == pytest.approx(0.1)
    assert c["scheduler"]["params"]["total_num_steps"] == 100
    assert c["zero_optimization"]["stage"] == 1 and c["gradient_accumulation_steps"] == 1  # 8 = 2 x 1 x 4 ranks
    worker = f"-m pdc.stages.train.worker --stage-dir {tmp_path / 'w'}"
    torchrun = (tmp_path / "w" / "launch.sh").read_text()
    assert "torch.distributed.run --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint node0:29400" \
        in torchrun and worker in torchrun
    ds = (tmp_path / "w" / "deepspeed.sh").read_text()
    assert f"deepspeed.launcher.runner --hostfile {tmp_path / 'w' / 'hostfile'} --master_addr node0" in ds
    assert f"--module pdc.stages.train.worker --stage-dir {tmp_path / 'w'}" in ds
    assert (tmp_path / "w" / "hostfile").read_text().splitlines()[1:] == ["node0 slots=2", "node1 slots=2"]
    slurm = (tmp_path / "w" / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=2" in slurm and worker in slurm
    assert 'srun --ntasks-per-node=1 --kill-on-bad-exit=1' in slurm and '--nnodes "$SLURM_NNODES"' in slurm
    assert '--rdzv-endpoint "$head:$port"' in slurm
    for name in ("launch.sh", "deepspeed.sh", "slurm.sbatch"):
        assert subprocess.run(["bash", "-n", str(tmp_path / "w" / name)]).returncode == 0, name


def test_a_hostfile_gives_nodes_and_slots(tmp_path):
    (tmp_path / "hosts").write_text("# two nodes\nworker-1 slots=8\n\nworker-2 slots=8  # second\n")
    launch = Launch.from_hostfile(tmp_path / "hosts")
    assert (launch.nnodes, launch.nproc_per_node, launch.world_size, launch.launcher) == (2, 8, 16, "deepspeed")
    (tmp_path / "bad").write_text("worker-1 slots=8\nworker-2 gpus=8\n")
    with pytest.raises(PdcError, match=r"bad:2: expected `HOST slots=N`"):
        Launch.from_hostfile(tmp_path / "bad")
