"""Teacher correction: fine-tune the teacher on the distillation data before distilling.

Methods (`cfg.method`): `full` (every weight), `lora` (peft adapters of rank `cfg.lora_rank`,
alpha = 2 x rank, on q/k/v/o and the MLP projections; merged into the weights at the end, so the
output is a plain HF checkpoint with the source's parameter count), `norm` (only the RMSNorm
weights train). `run_correct` uses `cfg` verbatim; `paper_correction_config` gives the Minitron
defaults (peak LR = one fifth of the distillation peak, 120 warm-up steps, cosine to min_lr).
Output: `out_dir/model/`, `metrics.json` (val_loss_before / val_loss_after), `log.jsonl`, `loss.png`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pdc.stages import TrainConfig
from pdc.train.launch import execute

PAPER_WARMUP_STEPS = 120
PAPER_LR_FRACTION = 0.2


def paper_correction_config(distill_cfg: TrainConfig, **overrides) -> TrainConfig:
    """Correction settings derived from the distillation config when the spec gives none:
    LR = distill LR / 5 (min LR scaled alike), 120 warm-up steps, cosine schedule."""
    base = dataclasses.replace(
        distill_cfg,
        lr=distill_cfg.lr * PAPER_LR_FRACTION,
        min_lr=distill_cfg.min_lr * PAPER_LR_FRACTION,
        warmup=PAPER_WARMUP_STEPS,
        schedule="cosine",
    )
    return dataclasses.replace(base, **overrides)


def run_correct(model_dir: Path, train_blocks, val_blocks, cfg: TrainConfig, work_dir: Path,
                out_dir: Path, progress: bool = True, world_size: int = 1) -> dict:
    """Fine-tune `model_dir` on the blocks; returns the metrics written to `out_dir/metrics.json`."""
    return execute("correct", {"model_dir": model_dir}, train_blocks, val_blocks, cfg, work_dir,
                   out_dir, progress, world_size)
