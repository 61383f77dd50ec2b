"""Teacher correction and distillation as DeepSpeed runs.

Public entry points (called by `pdc.runner`):
  pdc.train.correct.run_correct(model_dir, train_blocks, val_blocks, cfg, work_dir, out_dir, progress, world_size)
  pdc.train.distill.run_distill(teacher_dir, student_dir, train_blocks, val_blocks, cfg, work_dir, out_dir,
                                progress, world_size)
  pdc.train.launch.write_stage_files(work_dir, cfg, stage, world_size)  # ds_config.json + launch.sh only

Modules: `schedule` (batch geometry, DeepSpeed config, LR schedule), `losses` (KL / CE), `loop`
(the per-rank loop: engine, checkpoints, resume, validation), `launch` (work dir, in-process or
torchrun ranks, publishing out_dir), `worker` (`python -m pdc.train.worker --stage-dir DIR`),
`logs` (log.jsonl, loss.png).
"""
