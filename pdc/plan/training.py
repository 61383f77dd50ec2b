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

from pdc.errors import PdcError
from pdc.lang.settings import TrainConfig

# Standard for LLM training (Megatron's default, used by Minitron); also applied by the bench's bare loop.
GRADIENT_CLIPPING = 1.0
ADAM_BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8


def grad_accumulation(cfg: TrainConfig, world_size: int, stage: str) -> int:
    """Micro-batches per rank per optimizer step: global = micro x accumulation x world size."""
    per_pass = cfg.micro_batch * world_size
    if cfg.micro_batch < 1 or cfg.global_batch < 1 or world_size < 1:
        raise PdcError("global_batch, micro_batch and world size must be positive", stage)
    if cfg.global_batch % per_pass:
        raise PdcError(
            f"global_batch {cfg.global_batch} is not a multiple of micro_batch {cfg.micro_batch} "
            f"x world size {world_size}",
            stage,
        )
    return cfg.global_batch // per_pass


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
    if cfg.zero not in (0, 1, 2):
        raise PdcError(f"ZeRO stage {cfg.zero} is not supported here (0, 1 or 2)", stage)
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": grad_accumulation(cfg, world_size, stage),
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
