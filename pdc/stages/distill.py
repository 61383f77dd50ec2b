"""Knowledge distillation of a pruned student from its teacher (Minitron: logit-only forward KL).

`run_distill` trains the student on DeepSpeed (see `pdc.stages.train.loop`) with
`pdc.stages.train.losses`: against the frozen teacher run in every step (online), against the
teacher's top-k distribution read from a cache that `pdc.stages.teacher_logits` filled
(`cfg.cache_k`; the teacher is never loaded), or on next-token cross-entropy alone (`loss=ce`).
With `teacher_correction` (`order=concurrent`, the paper's Figure 4) the online teacher is itself
fine-tuned on next-token loss in the same loop, on the same micro-batches, for its first
`teacher_correction.total_steps()` steps: the student learns from the teacher as it is being
corrected. The corrected teacher is written beside the student (`out_dir/teacher/`).
It writes the distilled HF checkpoint to `out_dir/model/` with `log.jsonl` and `loss.png`; the
result holds the student's validation loss and KL at the start and end, the teacher's validation
loss and the tokens/s. Rerunning with the same arguments resumes from the last checkpoint in
`work_dir`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from pdc.errors import PdcError
from pdc.inputs.shards import Blocks
from pdc.inputs.teacher_cache import TeacherLogits
from pdc.lang.settings import TrainConfig
from pdc.plan.results import TrainResult
from pdc.plan.training import Launch
from pdc.stages.correct import correction_targets
from pdc.stages.teacher_logits import blocks_read
from pdc.stages.train.execute import execute

STAGE = "distill"


def run_distill(teacher_dir: Path, student_dir: Path, train_blocks: Blocks, val_blocks: Blocks, cfg: TrainConfig,
                work_dir: Path, out_dir: Path, progress: bool = True, launch: Launch = Launch(),
                teacher_cache: Optional[Path] = None, teacher_correction: Optional[TrainConfig] = None) -> TrainResult:
    """Distill `student_dir` from `teacher_dir`, or from the teacher logits cache `teacher_cache`
    when `cfg.cache_k` is set; with `teacher_correction`, while fine-tuning the teacher."""
    sources = {"student_dir": student_dir}
    cache = None
    correction = None
    if teacher_correction is not None:
        if not cfg.online_teacher:
            raise PdcError("a concurrent teacher correction needs the teacher online (not loss=ce, not a cache)", STAGE)
        for key in ("global_batch", "micro_batch", "seq_len"):
            if getattr(teacher_correction, key) != getattr(cfg, key):
                raise PdcError(f"a concurrent teacher correction trains on the distillation's batches: its {key} "
                               f"{getattr(teacher_correction, key)} is not the distillation's {getattr(cfg, key)}", STAGE)
        correction = {"cfg": dataclasses.asdict(teacher_correction),
                      **correction_targets(teacher_dir, teacher_correction.method)}
    if cfg.online_teacher:
        sources["teacher_dir"] = teacher_dir
    elif cfg.uses_teacher:
        if teacher_cache is None:
            raise PdcError(f"teacher_logits=cached(k={cfg.cache_k}) needs the teacher logits cache (its "
                           "teacher_logits stage)", STAGE)
        check_cache(Path(teacher_cache), train_blocks, val_blocks, cfg)
        cache = {"dir": str(Path(teacher_cache).resolve()), "key": Path(teacher_cache).name}
    return execute(STAGE, sources, train_blocks, val_blocks, cfg, work_dir, out_dir, progress, launch,
                   teacher_cache=cache, teacher_correction=correction)


def check_cache(directory: Path, train: Blocks, val: Blocks, cfg: TrainConfig) -> None:
    """One-line errors, before any rank starts, for a cache that does not fit this distillation:
    another k, temperature, block length or token shards, or blocks it does not hold."""
    cache = TeacherLogits(directory)
    token_key = train.array.meta.get("key", train.array.dir.name)
    for what, have, want in (("k", cache.k, cfg.cache_k), ("temperature", cache.temperature, cfg.temperature),
                             ("seq_len", cache.seq_len, train.seq_len),
                             ("token shards", cache.meta.get("tokens"), token_key)):
        if have != want:
            raise PdcError(f"the teacher logits cache {directory} has {what} {have}, this distillation {want}", STAGE)
    missing = cache.missing(blocks_read(train, val, cfg, STAGE))
    if len(missing):
        raise PdcError(f"the teacher logits cache {directory} lacks {len(missing):,} of the blocks this distillation "
                       "reads: run its teacher_logits stage (`pdc run SPEC --stage teacher_logits`)", STAGE)
