"""Knowledge distillation of a pruned student from its teacher (Minitron: logit-only forward KL).

`run_distill` trains the student on DeepSpeed (see `pdc.train.loop`) against the frozen teacher
with `pdc.train.losses.distill_loss`, and writes the distilled HF checkpoint to `out_dir/model/`
with `metrics.json` (student val loss/KL at the start and end, the teacher's val loss, tokens/s),
`log.jsonl` and `loss.png`. Rerunning with the same arguments resumes from the last checkpoint in
`work_dir` (or only republishes, if training already finished).
"""

from __future__ import annotations

from pathlib import Path

from pdc.stages import TrainConfig
from pdc.train.launch import execute


def run_distill(teacher_dir: Path, student_dir: Path, train_blocks, val_blocks, cfg: TrainConfig,
                work_dir: Path, out_dir: Path, progress: bool = True, world_size: int = 1) -> dict:
    """Distill `student_dir` from `teacher_dir`; returns the metrics written to `out_dir/metrics.json`."""
    return execute("distill", {"teacher_dir": teacher_dir, "student_dir": student_dir}, train_blocks,
                   val_blocks, cfg, work_dir, out_dir, progress, world_size)
