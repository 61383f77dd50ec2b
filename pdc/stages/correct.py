"""Teacher correction: fine-tune the teacher on the distillation data before distilling.

Methods (`cfg.method`): `full` (every weight), `lora` (peft adapters of rank `cfg.lora_rank`,
alpha = 2 x rank, merged into the weights at the end, so the output is a plain HF checkpoint with
the source's parameter count), `norm` (only the norm weights train). The paper's defaults (peak
LR one fifth of distillation's, 120 warm-up steps) are filled in by the checker
(`pdc.lang.settings.paper_correction`). Output in `out_dir`: `model/`, `log.jsonl`, `loss.png`.
"""

from __future__ import annotations

from pathlib import Path

from pdc.inputs.shards import Blocks
from pdc.lang.settings import TrainConfig
from pdc.plan.results import TrainResult
from pdc.plan.training import Launch
from pdc.stages.train.execute import execute


def run_correct(model_dir: Path, train_blocks: Blocks, val_blocks: Blocks, cfg: TrainConfig, work_dir: Path,
                out_dir: Path, progress: bool = True, launch: Launch = Launch()) -> TrainResult:
    """Fine-tune `model_dir` on the blocks (validation loss before and after in the result)."""
    return execute("correct", {"model_dir": model_dir}, train_blocks, val_blocks, cfg, work_dir,
                   out_dir, progress, launch)
