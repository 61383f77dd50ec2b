"""The training loop that every rank runs: DeepSpeed engine, checkpoints, resume, logs, validation.

One loop serves both stages. `distill`: the student is trained on the distillation loss against a
frozen teacher (eval mode, no grad), against the teacher's cached top-k distribution
(`pdc.inputs.teacher_cache`, read with the same row numbers as the tokens; the teacher is never
loaded), or on next-token loss alone (`loss=ce`). `correct`: the model is fine-tuned on
next-token loss (`method` full | lora | norm). A distillation with a concurrent teacher correction
(`spec["teacher_correction"]`, `order=concurrent`) does both in one loop: in each of the
correction's steps the teacher's forward pass on the micro-batch gives the student its targets
(detached) and the teacher's own next-token loss, on which a second DeepSpeed engine (the
correction's optimizer and schedule) updates it; afterwards the teacher is frozen. The stage
is described by `<work_dir>/stage.json` (written by `pdc.stages.train.execute`), which names
views on the token shards (`pdc.inputs.shards`): every rank memory-maps them and reads only the
rows of its own micro-batches. What differs between the two kinds (models, batches, loss,
validation, export) is `pdc.stages.train.stage.Stage`; this module runs the steps around it.

Invariants:
  * data order is a pure function of (seed, position) (`pdc.inputs.order`): global batch s is
    positions [s*G, (s+1)*G) of seeded per-epoch permutations; rank r takes micro-batch a's slice
    (a*world + r)*micro ... The position (`DataCursor`) is part of every checkpoint, so a resumed
    run continues with the next unseen block, exactly as an uninterrupted one would.
  * a checkpoint holds model, optimizer, scheduler (DeepSpeed `save_checkpoint`), the step, the data
    position and each rank's RNG; `checkpoints/resume.json` is replaced atomically only after every
    rank has finished writing, so a kill -9 at any moment leaves a loadable checkpoint or none.
  * the final model is written to `final.tmp/` and renamed to `final/` when complete; under ZeRO-3
    its weights are gathered layer by layer first.
  * ZeRO-3 gathers weights collectively in every forward pass: all ranks run the same number of
    forward passes (validation pads the ranks with fewer blocks).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pdc.errors import PdcError
from pdc.inputs.order import DataCursor, rank_micro_batch
from pdc.inputs.shards import Blocks
from pdc.lang.settings import TrainConfig
from pdc.stages.process_group import join_ranks, rank_device
from pdc.stages.train.logs import JsonlLog, truncate_log
from pdc.stages.train.precision import gpu_bf16, precision_label
from pdc.stages.train.schedule import start_scheduler
from pdc.stages.train.stage import TEACHER_DIR, Stage, config_from_dict


# ---- helpers ------------------------------------------------------------------------------------
def ensure_dist_env() -> dict:
    """Single-process rendezvous env (free port) where the launcher did not set one; returns what was set."""
    import socket

    set_now = {}
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            set_now["MASTER_PORT"] = str(s.getsockname()[1])
    for key, val in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        if key not in os.environ:
            set_now[key] = val
    os.environ.update(set_now)
    return set_now


def _rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _quiet_deepspeed() -> None:
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


# ---- checkpoints --------------------------------------------------------------------------------
def _resume_point(ckpt_dir: Path, stage: str) -> dict | None:
    pointer = ckpt_dir / "resume.json"
    if not pointer.exists():
        return None
    info = json.loads(pointer.read_text())
    if not (ckpt_dir / info["tag"]).is_dir():
        raise PdcError(
            f"checkpoint directory {ckpt_dir / info['tag']} is missing (named by {pointer}); "
            f"delete {pointer} to start over",
            stage,
        )
    return info


def _save_checkpoint(engine, ckpt_dir: Path, step: int, extra: dict, rank: int, stage: str,
                     teacher_engine=None) -> None:
    """The student's (or corrected model's) checkpoint, and a concurrently corrected teacher's
    under `checkpoints/teacher/` with the same tag."""
    import deepspeed.comm as dist

    tag = f"step{step:08d}"
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, **extra}, save_latest=False)
        if teacher_engine is not None:
            teacher_engine.save_checkpoint(str(ckpt_dir / TEACHER_DIR), tag=tag, save_latest=False)
        torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise PdcError(f"disk full while saving the checkpoint of step {step} in {ckpt_dir}", stage) from exc
        raise PdcError(f"cannot save the checkpoint of step {step} in {ckpt_dir}: {exc}", stage) from exc
    dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / "resume.json.tmp"
        tmp.write_text(json.dumps({"tag": tag, "step": step}))
        os.replace(tmp, ckpt_dir / "resume.json")
        # Only the newest checkpoint is needed to resume; older ones just use disk.
        for old in [*ckpt_dir.glob("step*"), *(ckpt_dir / TEACHER_DIR).glob("step*")]:
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


# ---- the loop ----------------------------------------------------------------------------------
def run_stage(stage_dir: Path, progress: bool | None = None) -> None:
    """Run (or resume) the stage described in `stage_dir`; every rank calls this."""
    import deepspeed
    import deepspeed.comm as dist

    stage_dir = Path(stage_dir)
    spec = json.loads((stage_dir / "stage.json").read_text())
    ds_cfg = json.loads((stage_dir / "ds_config.json").read_text())
    cfg = config_from_dict(spec["cfg"])
    # The file says what the spec asks (written wherever pdc ran); bf16 weights run where this
    # rank's GPU has bf16, elsewhere fp32 weights (with bf16 autocast on a CPU that has it).
    ds_cfg["bf16"] = {"enabled": gpu_bf16(cfg)}
    name = spec["stage"]
    progress = spec.get("progress", True) if progress is None else progress
    from transformers.utils import logging as hf_logging

    _quiet_deepspeed()
    hf_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # per-file load/save bars would drown the training bar
    # pdc joins the group itself (gloo for CPU tensors beside the GPU's NCCL: `group_backend`);
    # DeepSpeed then wraps the group it finds.
    join_ranks(rank_device())
    deepspeed.init_distributed(verbose=False)
    try:
        _train(stage_dir, spec, ds_cfg, cfg, name, progress)
    finally:
        dist.destroy_process_group()
        if hf_bars:
            hf_logging.enable_progress_bar()


def _train(stage_dir: Path, spec: dict, ds_cfg: dict, cfg: TrainConfig, name: str, progress: bool) -> None:
    """Build the engine, resume or start, run the remaining steps, export the final model."""
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if world != spec["world_size"]:
        raise PdcError(f"launched with {world} processes, stage expects {spec['world_size']}", name)
    device = rank_device()
    train, val = Blocks.from_json(spec["data"]["train"]), Blocks.from_json(spec["data"]["val"])
    micro = ds_cfg["train_micro_batch_size_per_gpu"]
    cursor = DataCursor(len(train), cfg.global_batch, cfg.seed)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    stage = Stage(spec, cfg, device, micro, ds_cfg)
    engine, scheduler, trainable = _start_engine(stage, cfg, ds_cfg, world)
    run = _Run(stage_dir=stage_dir, spec=spec, cfg=cfg, name=name, stage=stage, engine=engine, scheduler=scheduler,
               train=train, val=val, micro=micro, gas=ds_cfg["gradient_accumulation_steps"], rank=rank, world=world,
               device=device, cursor=cursor, trainable=trainable)
    run.resume_or_start()
    run.steps(progress)
    run.export()


def _start_engine(stage: Stage, cfg: TrainConfig, ds_cfg: dict, world: int) -> tuple:
    """The DeepSpeed engine of the trained model, its scheduler and the count of trained
    parameters; a concurrent correction's teacher engine is started beside it."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    params = [p for p in stage.model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    ds_logger.setLevel(logging.ERROR)  # the scheduler warns that it "has not started" (we start it below)
    try:
        engine, _, _, scheduler = deepspeed.initialize(model=stage.model, model_parameters=params, config=ds_cfg)
    finally:
        ds_logger.setLevel(logging.WARNING)
    if world == 1 and cfg.zero == 0:
        # One rank: the gradient all-reduce averages each gradient with itself, yet flattens,
        # copies and unflattens them all every step (bench/bench_distill_throughput.py --profile).
        engine.enable_backward_allreduce = False
    if stage.correction is not None:
        stage.start_correction(world)
    return engine, scheduler, trainable


@dataclass
class _Run:
    """One rank's run of a stage: what the steps, checkpoints and the export share."""

    stage_dir: Path
    spec: dict
    cfg: TrainConfig
    name: str
    stage: Stage
    engine: object
    scheduler: object
    train: Blocks
    val: Blocks
    micro: int
    gas: int
    rank: int
    world: int
    device: torch.device
    cursor: DataCursor
    trainable: int
    start_step: int = 0
    val_start: dict | None = None
    val_end: dict | None = None

    @property
    def ckpt_dir(self) -> Path:
        return self.stage_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.stage_dir / "log.jsonl"

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.global_batch * self.cfg.seq_len

    def validate(self) -> dict | None:
        return self.stage.validate(self.engine, self.val, self.micro, self.rank, self.world)

    def resume_or_start(self) -> None:
        """Load the newest checkpoint (model, optimizer, scheduler, data position, RNG) and cut
        the log back to its step; or start the schedulers and validate the starting model."""
        import deepspeed.comm as dist

        stage, name, ckpt_dir, G = self.stage, self.name, self.ckpt_dir, self.cfg.global_batch
        ckpt_dir.mkdir(exist_ok=True)
        resume = _resume_point(ckpt_dir, name)
        if resume is not None:
            load_path, client = self.engine.load_checkpoint(str(ckpt_dir), tag=resume["tag"])
            if load_path is None:
                raise PdcError(f"cannot load checkpoint {ckpt_dir / resume['tag']}", name)
            if stage.teacher_engine is not None:
                teacher_path, _ = stage.teacher_engine.load_checkpoint(str(ckpt_dir / TEACHER_DIR), tag=resume["tag"])
                if teacher_path is None:
                    raise PdcError(f"cannot load the corrected teacher's checkpoint {ckpt_dir / TEACHER_DIR / resume['tag']}",
                                   name)
            self.start_step = int(client["step"])
            self.cursor.load_state_dict(client["data"], name)
            if self.cursor.position != self.start_step * G:
                raise PdcError(f"checkpoint {resume['tag']} is at data position {self.cursor.position}, not step "
                               f"{self.start_step} x global_batch {G}", name)
            self.val_start = client.get("val_start")
            rng_file = ckpt_dir / resume["tag"] / f"rng_rank{self.rank}.pt"
            if rng_file.exists():
                _set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            self.start_step = 0
            start_scheduler(self.scheduler)
            if stage.teacher_scheduler is not None:
                start_scheduler(stage.teacher_scheduler)
            self.val_start = self.validate()
        if self.rank == 0:
            if resume is None and self.log_path.exists():
                self.log_path.unlink()
            elif resume is not None:
                truncate_log(self.log_path, self.start_step)
        dist.barrier()

    def steps(self, progress: bool) -> None:
        """The optimizer steps from `start_step` on: one log record per step (rank 0), validation
        every `val_every` steps and after the last, a checkpoint every `checkpoint_every`."""
        cfg, steps = self.cfg, self.spec["steps"]
        log = JsonlLog(self.log_path) if self.rank == 0 else None
        bar = None
        if self.rank == 0 and progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=self.start_step, desc=self.name, unit="step", dynamic_ncols=True)
        self.engine.train()
        try:
            for step in range(self.start_step, steps):
                t0, c0 = time.perf_counter(), time.process_time()
                lr = self.scheduler.get_last_lr()[0]
                stats = self.step(step)
                loss_val = stats[0].item()
                dt = time.perf_counter() - t0
                cpu = time.process_time() - c0
                done = step + 1
                val = None
                if cfg.val_every and (done % cfg.val_every == 0 or done == steps):
                    val = self.validate()
                    if done == steps:
                        self.val_end = val
                if log is not None:
                    log.write(self.record(done, stats, lr, dt, cpu, val))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_val:.4f}")
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < steps:
                    _save_checkpoint(self.engine, self.ckpt_dir, done,
                                     {"val_start": self.val_start, "data": self.cursor.state_dict()},
                                     self.rank, self.name, self.stage.teacher_engine)
        finally:
            if bar is not None:
                bar.close()
            if log is not None:
                log.close()

    def step(self, step: int) -> torch.Tensor:
        """One optimizer step over the next global batch (this rank's micro-batches, gradient
        accumulation in the engine): [loss, KL, the corrected teacher's loss] averaged over ranks."""
        import deepspeed.comm as dist

        stage, engine = self.stage, self.engine
        indices = self.cursor.next_batch()
        stats = torch.zeros(3, dtype=torch.float64)  # loss, KL, the corrected teacher's loss
        stage.set_step(step)
        for a in range(self.gas):
            batch = stage.batch(self.train, rank_micro_batch(indices, self.micro, a, self.rank, self.world))
            loss, kl = stage.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            stats[0] += loss.item()
            stats[1] += kl.item() if kl is not None else 0.0
        stats[2] = stage.teacher_step_loss if stage.correcting else 0.0
        dist.all_reduce(stats)
        stats /= self.gas * self.world
        loss_val = stats[0].item()
        if not math.isfinite(loss_val):
            raise PdcError(f"loss is {loss_val} at step {step + 1}; stopped (try a lower lr)", self.name)
        return stats

    def record(self, done: int, stats: torch.Tensor, lr: float, dt: float, cpu: float, val: dict | None) -> dict:
        """The log record of step `done`."""
        rec = {"step": done, "loss": stats[0].item(), "lr": lr, "tokens_per_s": self.tokens_per_step / dt,
               "step_s": dt, "cpu_s": cpu, "tokens": done * self.tokens_per_step}
        if self.stage.uses_teacher:
            rec["kl"] = stats[1].item()
        if self.stage.correcting:
            rec["teacher_loss"] = stats[2].item()
        if val is not None:
            rec.update({f"val_{k}": v for k, v in val.items()})
        return rec

    def export(self) -> None:
        """Write the final model (and a corrected teacher) with `metrics.json` into `final.tmp/`,
        then rename it to `final/`."""
        import deepspeed.comm as dist

        stage, rank, stage_dir = self.stage, self.rank, self.stage_dir
        if self.val_end is None:
            self.val_end = self.validate()
        final_tmp, final = stage_dir / "final.tmp", stage_dir / "final"
        if rank == 0:
            shutil.rmtree(final_tmp, ignore_errors=True)
            final_tmp.mkdir()
        dist.barrier()
        try:
            stage.export(self.engine, final_tmp / "model", self.spec, rank)
            if stage.teacher_engine is not None:
                stage.export_teacher(final_tmp / TEACHER_DIR, rank)
            if rank == 0:
                (final_tmp / "metrics.json").write_text(json.dumps(self.metrics(), indent=2))
        except OSError as exc:
            shutil.rmtree(final_tmp, ignore_errors=True)
            if exc.errno == errno.ENOSPC:
                raise PdcError(f"disk full while saving the final model in {stage_dir}", self.name) from exc
            raise
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(final_tmp, final)
        dist.barrier()

    def metrics(self) -> dict:
        """The stage's `metrics.json`: what ran, where, and the validation before and after."""
        cfg, spec, stage, device, steps = self.cfg, self.spec, self.stage, self.device, self.spec["steps"]
        metrics = {
            "stage": self.name,
            "kind": spec["kind"],
            "steps": steps,
            "tokens": steps * self.tokens_per_step,
            "global_batch": cfg.global_batch,
            "micro_batch": self.micro,
            "grad_accumulation": self.gas,
            "world_size": self.world,
            "seq_len": cfg.seq_len,
            "precision": precision_label(cfg, device),
            "zero": cfg.zero,
            "activation_checkpointing": cfg.activation_checkpointing,
            "teacher_placement": stage.teacher_placement,
            "loaded_partitioned": stage.loaded_partitioned,
            # rank 0's peak of allocated GPU memory (bench/gpu_smoke.sh compares it with the plan)
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "cache_k": stage.cache.k if stage.cache is not None else None,
            "val_every": cfg.val_every,
            "trainable_params": self.trainable,
            "resumed_from_step": self.start_step,
            "val_start": self.val_start,
            "val_end": self.val_end,
            "fingerprint": spec["fingerprint"],
        }
        if spec["kind"] == "correct":
            metrics["method"] = cfg.method
        else:
            metrics["loss"] = cfg.loss
        if stage.correction is not None:
            metrics["teacher_correction"] = {"steps": stage.correction.total_steps(),
                                             "method": stage.correction.method,
                                             "trainable_params": stage.teacher_trainable}
        return metrics
