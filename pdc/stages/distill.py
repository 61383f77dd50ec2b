"""Knowledge distillation of a pruned student from its teacher (Minitron: logit-only forward KL).

`run_distill` trains the student on DeepSpeed (see `pdc.stages.train.loop`) against the frozen
teacher with `pdc.stages.train.losses.distill_loss`, and writes the distilled HF checkpoint to
`out_dir/model/` with `log.jsonl` and `loss.png`; the result holds the student's validation loss
and KL at the start and end, the teacher's validation loss and the tokens/s. Rerunning with the
same arguments resumes from the last checkpoint in `work_dir`.
"""

from __future__ import annotations

from pathlib import Path

from pdc.inputs.shards import Blocks
from pdc.lang.settings import TrainConfig
from pdc.plan.results import TrainResult
from pdc.plan.training import Launch
from pdc.stages.train.execute import execute


def run_distill(teacher_dir: Path, student_dir: Path, train_blocks: Blocks, val_blocks: Blocks, cfg: TrainConfig,
                work_dir: Path, out_dir: Path, progress: bool = True, launch: Launch = Launch()) -> TrainResult:
    """Distill `student_dir` from `teacher_dir`."""
    return execute("distill", {"teacher_dir": teacher_dir, "student_dir": student_dir}, train_blocks,
                   val_blocks, cfg, work_dir, out_dir, progress, launch)
