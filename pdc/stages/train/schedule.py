"""The learning-rate schedule as the engine runs it.

DeepSpeed starts its schedulers at iteration -1 (LR 0), which would waste the first optimizer
step; `start_scheduler` moves a fresh scheduler to iteration 1 so that optimizer step k (1-based)
runs at the schedule's value for iteration k. The schedule itself is DeepSpeed's, configured by
`pdc.plan.training.scheduler_config`.
"""

from __future__ import annotations


def start_scheduler(scheduler) -> None:
    """Move a fresh DeepSpeed scheduler to iteration 1: optimizer step k then runs at iteration k."""
    scheduler.step(1)
