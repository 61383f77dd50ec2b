"""The DeepSpeed training machinery behind teacher correction and distillation.

`execute` (work dir, in-process or torchrun ranks, publishing the result), `loop` (the per-rank
loop: engine, checkpoints, resume, validation), `losses` (KL / CE), `schedule` (the LR schedule as
the engine runs it), `worker` (`python -m pdc.stages.train.worker --stage-dir DIR`), `logs`
(log.jsonl, loss.png). The stage entry points are `pdc.stages.correct` and `pdc.stages.distill`.
"""
