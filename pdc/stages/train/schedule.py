"""The learning-rate schedule as the engine runs it.

DeepSpeed starts its schedulers at iteration -1 (LR 0), which would waste the first optimizer
step; `start_scheduler` moves a fresh scheduler to iteration 1 so that optimizer step k (1-based)
runs at the schedule's value for iteration k. `lr_schedule` replays the schedule of a config
(`pdc.plan.training.scheduler_config`) with DeepSpeed's own scheduler classes.
"""

from __future__ import annotations

import torch

from pdc.lang.settings import TrainConfig
from pdc.plan.training import scheduler_config


def start_scheduler(scheduler) -> None:
    """Move a fresh DeepSpeed scheduler to iteration 1: optimizer step k then runs at iteration k."""
    scheduler.step(1)


def lr_schedule(cfg: TrainConfig, steps: int) -> list[float]:
    """The LR of each optimizer step 1..steps, from the same DeepSpeed scheduler the engine builds."""
    from deepspeed.runtime import lr_schedules  # deepspeed takes seconds to import: only when used

    sched_cfg = scheduler_config(cfg, steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = getattr(lr_schedules, sched_cfg["type"])(opt, **sched_cfg["params"])
    start_scheduler(sched)
    out = []
    for _ in range(steps):
        out.append(float(opt.param_groups[0]["lr"]))
        sched.step()
    return out
