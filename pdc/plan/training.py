"""Training budgets and the DeepSpeed configuration of a training stage: pure arithmetic on
`TrainConfig`, shared by the dry run, the launch files and the training loop.

The schedule is DeepSpeed's own (`WarmupCosineLR`, `WarmupLR`, `WarmupDecayLR`), built by the
engine from `ds_config.json`. Invariants (tested against DeepSpeed's schedulers):
  * warm-up: the LR rises from near 0 to the peak over `warmup` steps;
  * cosine/linear: after warm-up it falls monotonically and the last step runs at exactly `min_lr`;
  * constant: the LR stays at the peak after warm-up.
With `warmup == 0` DeepSpeed still needs >= 2 warm-up iterations; we start them at the peak
(cosine/constant), so there is no visible warm-up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pdc.errors import PdcError
from pdc.lang.settings import TrainConfig

# Standard for LLM training (Megatron's default, used by Minitron); also applied by the bench's bare loop.
GRADIENT_CLIPPING = 1.0
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def batch_geometry(cfg: TrainConfig, world_size: int, stage: str) -> tuple[int, int]:
    """(micro-batch, accumulation steps) per rank: global = micro x accumulation x world size.

    Any world size that divides the global batch works: each rank gets global / world blocks per
    step, split into the largest micro-batch no larger than the spec's `micro_batch` that divides
    them (a smaller micro-batch never needs more memory). Other world sizes are refused with the
    list of valid ones."""
    if cfg.micro_batch < 1 or cfg.global_batch < 1 or world_size < 1:
        raise PdcError("global_batch, micro_batch and world size must be positive", stage)
    if cfg.global_batch % world_size:
        valid = divisors(cfg.global_batch)
        shown = ", ".join(map(str, valid)) if len(valid) <= 40 else ", ".join(map(str, valid[:40])) + ", ..."
        raise PdcError(f"global_batch {cfg.global_batch} cannot be split evenly over {world_size} processes; "
                       f"valid world sizes: {shown}", stage)
    per_rank = cfg.global_batch // world_size
    micro = max(d for d in divisors(per_rank) if d <= cfg.micro_batch)
    return micro, per_rank // micro


def grad_accumulation(cfg: TrainConfig, world_size: int, stage: str) -> int:
    """Micro-batches per rank per optimizer step (`batch_geometry`'s second number)."""
    return batch_geometry(cfg, world_size, stage)[1]


@dataclass(frozen=True)
class Launch:
    """Where the ranks of a training stage run: `nnodes` x `nproc_per_node` processes started by
    torchrun with a c10d rendezvous at `rdzv_endpoint` (HOST:PORT; this machine when None), by
    DeepSpeed's launcher on the nodes and slots of `hostfile`, or by srun inside a Slurm
    allocation (one torchrun per node)."""

    nnodes: int = 1
    nproc_per_node: int = 1
    rdzv_endpoint: Optional[str] = None
    hostfile: Optional[str] = None
    launcher: str = "torchrun"  # torchrun | deepspeed (with hostfile) | slurm (srun + torchrun)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    @classmethod
    def from_hostfile(cls, path: str | Path) -> "Launch":
        hosts = parse_hostfile(path)
        slots = {n for _, n in hosts}
        if len(slots) != 1:
            raise PdcError(f"hostfile {path}: every host needs the same slots= (got {sorted(slots)})")
        return cls(nnodes=len(hosts), nproc_per_node=slots.pop(), hostfile=str(Path(path).resolve()),
                   launcher="deepspeed")


_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)$")


def parse_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile: one `HOST slots=N` line per node; blank lines and # comments ignored."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise PdcError(f"cannot read hostfile {path}: {exc.strerror or exc}") from None
    hosts: list[tuple[str, int]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if not m or int(m.group(2)) < 1:
            raise PdcError(f"{path}:{n}: expected `HOST slots=N` (N >= 1), got {line!r}")
        if m.group(1) in {h for h, _ in hosts}:
            raise PdcError(f"{path}:{n}: host {m.group(1)} is listed twice")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise PdcError(f"hostfile {path} lists no host")
    return hosts


def total_steps(cfg: TrainConfig, stage: str) -> int:
    """`cfg.total_steps()`, checked: a stage needs a budget of at least one step."""
    if cfg.steps is None and cfg.tokens is None:
        raise PdcError("training needs `steps` or `tokens`", stage)
    steps = cfg.total_steps()
    if steps < 1:
        raise PdcError(f"training needs at least one step (got {steps})", stage)
    return steps


def scheduler_config(cfg: TrainConfig, steps: int) -> dict:
    """DeepSpeed `scheduler` section for `cfg.schedule` over `steps` optimizer steps."""
    warmup = max(0, min(int(cfg.warmup), steps))
    ds_warmup = max(2, warmup)  # DeepSpeed's floor
    if cfg.schedule == "cosine":
        return {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": steps,
                "warmup_num_steps": ds_warmup,
                "warmup_min_ratio": 0.0 if warmup else 1.0,
                "cos_min_ratio": cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0,
                "warmup_type": "linear",
            },
        }
    if cfg.schedule == "constant":
        return {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0 if warmup else cfg.lr,
                "warmup_max_lr": cfg.lr,
                "warmup_num_steps": ds_warmup,
                "warmup_type": "linear",
            },
        }
    if cfg.schedule == "linear":
        # WarmupDecayLR ramps min_lr -> lr, then decays linearly back to min_lr at the last step.
        return {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": steps,
                "warmup_min_lr": cfg.min_lr,
                "warmup_max_lr": cfg.lr,
                "warmup_num_steps": ds_warmup,
                "warmup_type": "linear",
            },
        }
    raise PdcError(f"unknown schedule {cfg.schedule!r} (cosine, constant, linear)")


def ds_config(cfg: TrainConfig, steps: int, world_size: int, stage: str, bf16: bool) -> dict:
    """The DeepSpeed config of one training stage (what `ds_config.json` holds)."""
    if cfg.zero not in (0, 1, 2, 3):
        raise PdcError(f"ZeRO stage {cfg.zero} does not exist (0, 1, 2 or 3)", stage)
    micro, gas = batch_geometry(cfg, world_size, stage)
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch.optim.AdamW; DeepSpeed's fused/CPU Adam need compiled ops.
            "params": {
                "lr": cfg.lr,
                "betas": list(ADAM_BETAS),
                "eps": ADAM_EPS,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,
            },
        },
        "scheduler": scheduler_config(cfg, steps),
        "gradient_clipping": GRADIENT_CLIPPING,
        "zero_optimization": {"stage": cfg.zero},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def cache_bytes_per_token(k: int, vocab_size: int, seq_len: int) -> float:
    """Bytes on disk per token of a teacher logits cache (`pdc.inputs.teacher_cache`): k float16
    log-probabilities, k token ids (uint16 up to 65,536 ids, else uint32), a float16 tail, and a
    block's int64 row number and float32 NLL spread over its tokens."""
    index = 2 if vocab_size <= 1 << 16 else 4
    return k * (2 + index) + 2 + 12 / seq_len


def teacher_ds_config(micro_batch: int, bf16: bool) -> dict:
    """DeepSpeed config of a frozen teacher run as a ZeRO-3 inference engine: its weights are
    partitioned over the ranks and gathered layer by layer during each forward pass."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": bool(bf16)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
