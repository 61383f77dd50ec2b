"""Prepare a training stage's work dir, run its ranks, and publish the result.

`execute` is shared by `run_correct` and `run_distill`:
  1. checks the inputs (one-line `PdcError`s), computes the step count and batch geometry;
  2. writes `stage.json` (settings, source models, the views on the token shards the ranks read),
     `ds_config.json` and the launch files (`launch_files`) into `work_dir`; a work dir
     holding a *different* run (other config, data or source models) is cleared, one holding the
     same run is resumed from its last checkpoint -- by as many processes as wrote it (another
     world size is refused, its checkpoint kept);
  3. runs the ranks: one process on one node in this process; otherwise the stage's launch file
     (torchrun with a c10d rendezvous, DeepSpeed's launcher with a hostfile, or srun in a Slurm
     allocation) starts `python -m pdc.stages.train.worker` on every node;
  4. copies model/ (+ tokenizer files), log.jsonl and loss.png into `out_dir` (the runner's
     staging directory) and returns the typed `TrainResult`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import time
from pathlib import Path

from tqdm import tqdm

from pdc.emit.model_card import CARD_FILE
from pdc.errors import PdcError
from pdc.files import write_bytes
from pdc.inputs.shards import Blocks
from pdc.lang.settings import TrainConfig
from pdc.plan.results import TeacherCorrection, TrainResult
from pdc.plan.training import Launch, batch_geometry, total_steps
from pdc.stages.train.jit_locks import remove_stale_jit_locks
from pdc.stages.train.launch_files import launch_argv, write_stage_files
from pdc.stages.train.logs import plot_loss, read_log
from pdc.stages.train.loop import ensure_dist_env, run_stage
from pdc.stages.train.stage import TEACHER_DIR

MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_model_dir(path: Path, role: str, stage: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise PdcError(f"{role} model directory not found: {path}", stage)
    if not (path / "config.json").exists():
        raise PdcError(f"{role} model directory {path} has no config.json", stage)
    return path


def _check_blocks(blocks, role: str, stage: str, allow_empty: bool) -> Blocks:
    if not isinstance(blocks, Blocks):
        raise PdcError(f"{role} data must be token shards (pdc.inputs.shards.Blocks), got {type(blocks).__name__}",
                       stage)
    if len(blocks) == 0 and not allow_empty:
        raise PdcError(f"no {role} blocks: nothing to train on", stage)
    return blocks


def _dir_signature(path: Path) -> list:
    """Names, sizes and mtimes of a model dir's files: changes when an upstream stage rewrote it.
    The model card (README.md) is left out: the runner refreshes it after every stage (and every
    comparison variant refreshes a shared stage's), which must not void a resumable checkpoint."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).iterdir()
                  if p.is_file() and p.name != CARD_FILE)


def execute(kind: str, sources: dict, train_blocks: Blocks, val_blocks: Blocks, cfg: TrainConfig, work_dir: Path,
            out_dir: Path, progress: bool = True, launch: Launch = Launch(),
            teacher_cache: dict | None = None, targets: dict | None = None,
            teacher_correction: dict | None = None) -> TrainResult:
    """Train `kind` ("correct" or "distill") on `sources` (role -> model dir); `teacher_cache`
    ({"dir", "key"}) names the teacher logits cache a distillation reads instead of a teacher;
    `targets` are the correction's LoRA / norm-only targets found by the graph's structure;
    `teacher_correction` ({"cfg": TrainConfig fields, + its targets}) fine-tunes a distillation's
    teacher in the same loop (`order=concurrent`)."""
    stage = kind
    t_start = time.perf_counter()
    sources = {role: _check_model_dir(p, role.replace("_dir", ""), stage) for role, p in sources.items()}
    train_blocks = _check_blocks(train_blocks, "training", stage, allow_empty=False)
    val_blocks = _check_blocks(val_blocks, "validation", stage, allow_empty=True)
    if len(val_blocks) and val_blocks.seq_len != train_blocks.seq_len:
        raise PdcError("training and validation blocks differ in length", stage)
    if train_blocks.seq_len != cfg.seq_len:
        cfg = dataclasses.replace(cfg, seq_len=train_blocks.seq_len)  # the blocks are the truth
    world_size = launch.world_size
    if not isinstance(world_size, int) or world_size < 1:
        raise PdcError(f"world size must be a positive integer (got {world_size!r})", stage)
    if launch.nnodes > 1 and launch.launcher == "torchrun" and not launch.rdzv_endpoint:
        raise PdcError(f"{launch.nnodes} nodes need a rendezvous endpoint HOST:PORT that every node reaches", stage)
    steps = total_steps(cfg, stage)
    micro, gas = batch_geometry(cfg, world_size, stage)
    if micro != cfg.micro_batch and progress:
        print(f"[pdc] {stage}: micro_batch {micro} (not {cfg.micro_batch}) so that global_batch {cfg.global_batch} "
              f"splits over {world_size} processes in {gas} accumulation step(s)")

    work_dir, out_dir = Path(work_dir).resolve(), Path(out_dir).resolve()
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PdcError(f"cannot create work dir {work_dir}: {exc.strerror}", stage) from exc

    spec = {
        "kind": kind,
        "stage": stage,
        **{role: str(p.resolve()) for role, p in sources.items()},
        "cfg": dataclasses.asdict(cfg),
        "world_size": world_size,
        "steps": steps,
        "data": {"train": train_blocks.to_json(), "val": val_blocks.to_json()},
        **(targets or {}),  # correction: the modules LoRA adapts / the norms that train
    }
    if teacher_cache is not None:
        spec["teacher_cache"] = teacher_cache  # its key is its content's: teacher, tokens, k, temperature
    if teacher_correction is not None:
        spec["teacher_correction"] = teacher_correction
    # The run's identity leaves the world size out: the same run on other processes is the same
    # run, whose checkpoints are refused (`_check_resumable`), never deleted.
    fp = hashlib.sha256(json.dumps({k: v for k, v in spec.items() if k != "world_size"}, sort_keys=True).encode())
    for p in sources.values():
        fp.update(json.dumps(_dir_signature(p)).encode())
    fp.update(json.dumps([train_blocks.identity(), val_blocks.identity()]).encode())
    spec["fingerprint"] = fp.hexdigest()[:16]
    spec["progress"] = progress

    old = work_dir / "stage.json"
    previous = json.loads(old.read_text()) if old.exists() else {}
    if previous.get("fingerprint") == spec["fingerprint"] and not _finished(work_dir, spec["fingerprint"]):
        _check_resumable(work_dir, previous.get("world_size"), world_size, stage)
    if previous and previous.get("fingerprint") != spec["fingerprint"]:
        # A different run used this work dir: its checkpoints must not be resumed.
        for stale in ("checkpoints", "final", "final.tmp"):
            shutil.rmtree(work_dir / stale, ignore_errors=True)
        (work_dir / "log.jsonl").unlink(missing_ok=True)
    (work_dir / "error.json").unlink(missing_ok=True)

    write_stage_files(work_dir, cfg, stage, launch, _free_port())
    try:
        write_bytes(work_dir / "stage.json", json.dumps(spec, indent=2).encode())
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise PdcError(f"disk full while writing the work dir {work_dir}", stage) from exc
        raise PdcError(f"cannot write the work dir {work_dir}: {exc.strerror}", stage) from exc

    if not _finished(work_dir, spec["fingerprint"]):
        for lock in remove_stale_jit_locks():
            print(f"[pdc] {stage}: removed {lock}, a lock of DeepSpeed's op build left by a killed "
                  "process (every DeepSpeed start would wait for it forever)")
        if world_size == 1 and launch.launcher == "torchrun":
            _run_in_process(work_dir, progress)
        else:
            _run_workers(work_dir, launch, steps, stage, progress)
    return _publish(work_dir, out_dir, sources, stage, time.perf_counter() - t_start)


def _check_resumable(work_dir: Path, written_by: int | None, world_size: int, stage: str) -> None:
    """A one-line refusal when the checkpoint to resume was written by another number of processes:
    ZeRO's optimizer partitions and each rank's RNG state belong to the world size that saved them."""
    if written_by is None or written_by == world_size or not (work_dir / "checkpoints" / "resume.json").exists():
        return
    raise PdcError(f"the checkpoint in {work_dir / 'checkpoints'} was written by {written_by} process(es) and this "
                   f"run has {world_size}: rerun with {written_by} to resume it, or delete {work_dir} to start over",
                   stage)


def _finished(work_dir: Path, fingerprint: str) -> bool:
    metrics = work_dir / "final" / "metrics.json"
    return metrics.exists() and json.loads(metrics.read_text()).get("fingerprint") == fingerprint


def _run_in_process(work_dir: Path, progress: bool) -> None:
    set_now = ensure_dist_env()
    try:
        run_stage(work_dir, progress)
    finally:
        for key in set_now:
            os.environ.pop(key, None)


def _run_workers(work_dir: Path, launch: Launch, steps: int, stage: str, progress: bool) -> None:
    argv = launch_argv(work_dir, launch)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // launch.nproc_per_node)))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if launch.nnodes > 1 and launch.launcher == "torchrun":
        print(f"[pdc] {stage}: this node joins the rendezvous at {launch.rdzv_endpoint}; start the other "
              f"{launch.nnodes - 1} node(s) with: sh {work_dir / 'launch.sh'}")
    log_file = work_dir / "launch.log"
    bar = None
    if progress:
        bar = tqdm(total=steps, desc=f"{stage} x{launch.world_size}", unit="step", dynamic_ncols=True)
    try:
        with open(log_file, "w") as out:
            try:
                proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            except OSError as exc:
                raise PdcError(f"cannot start the training workers: {exc}", stage) from exc
            try:
                while proc.poll() is None:
                    time.sleep(0.5)
                    if bar is not None:
                        records = read_log(work_dir / "log.jsonl")
                        if records:
                            bar.n = records[-1]["step"]
                            bar.set_postfix(loss=f"{records[-1]['loss']:.4f}")
                            bar.refresh()
            except BaseException:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                raise
    finally:
        if bar is not None:
            bar.close()
    if proc.returncode != 0:
        err = work_dir / "error.json"
        if err.exists():
            raise PdcError(json.loads(err.read_text())["message"], stage)
        tail = [l for l in log_file.read_text(errors="replace").splitlines() if l.strip()][-1:]
        raise PdcError(
            f"training workers failed (exit {proc.returncode}); see {log_file}"
            + (f": {tail[0][:200]}" if tail else ""),
            stage,
        )


def _summarise(metrics: dict, records: list[dict], wall_s: float) -> TrainResult:
    """The stage's typed result from the loop's final metrics and its step log."""
    speeds = [r["tokens_per_s"] for r in records[1:]] or [r["tokens_per_s"] for r in records[:1]]
    vs, ve = metrics.get("val_start") or {}, metrics.get("val_end") or {}
    distill = metrics["kind"] == "distill"
    return TrainResult(
        kind=metrics["kind"], steps=metrics["steps"], tokens=metrics["tokens"],
        global_batch=metrics["global_batch"], micro_batch=metrics["micro_batch"],
        grad_accumulation=metrics["grad_accumulation"], world_size=metrics["world_size"],
        seq_len=metrics["seq_len"], precision=metrics["precision"], zero=metrics["zero"],
        trainable_params=metrics["trainable_params"], resumed_from_step=metrics["resumed_from_step"],
        val_loss_start=vs.get("loss"), val_loss_end=ve.get("loss"),
        train_loss_first=records[0]["loss"] if records else None,
        train_loss_last=records[-1]["loss"] if records else None,
        tokens_per_s=statistics.median(speeds) if speeds else None,  # step 1 includes warm-up costs
        wall_s=wall_s, method=metrics.get("method"), loss=metrics.get("loss") if distill else None,
        teacher_val_loss=ve.get("teacher_loss") if distill else None,
        val_kl_start=vs.get("kl") if distill else None, val_kl_end=ve.get("kl") if distill else None,
        activation_checkpointing=bool(metrics.get("activation_checkpointing", False)),
        teacher_placement=metrics.get("teacher_placement"), cache_k=metrics.get("cache_k"),
        val_every=int(metrics.get("val_every") or 0),
        teacher_correction=TeacherCorrection(**metrics["teacher_correction"]) if metrics.get("teacher_correction")
        else None,
        teacher_val_loss_start=vs.get("teacher_loss") if distill else None,
    )


def _publish(work_dir: Path, out_dir: Path, sources: dict, stage: str, wall_s: float) -> TrainResult:
    """Copy the trained model (with the source's tokenizer files), the log and the loss plot into
    `out_dir` (the caller's staging directory: it owns atomicity)."""
    final = work_dir / "final"
    records = read_log(work_dir / "log.jsonl")
    result = _summarise(json.loads((final / "metrics.json").read_text()), records, wall_s)
    source = sources.get("student_dir") or sources.get("model_dir")
    models = [(final / "model", out_dir / result.model, source)]
    if result.teacher_correction is not None:  # the concurrently corrected teacher
        models.append((final / TEACHER_DIR, out_dir / TEACHER_DIR, sources["teacher_dir"]))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for trained, dest, origin in models:
            shutil.copytree(trained, dest, dirs_exist_ok=True)
            for f in Path(origin).iterdir():  # tokenizer and generation files travel with the model
                if f.is_file() and f.name not in MODEL_FILES and not f.name.endswith((".safetensors", ".bin")) \
                        and not (dest / f.name).exists():
                    shutil.copy2(f, dest / f.name)
        if (work_dir / "log.jsonl").exists():
            shutil.copy2(work_dir / "log.jsonl", out_dir / result.log)
        plot_loss(records, out_dir / result.plot, f"{stage}: {result.steps} steps, {result.tokens:,} tokens")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise PdcError(f"disk full while writing {out_dir}", stage) from exc
        raise PdcError(f"cannot write {out_dir}: {exc}", stage) from exc
    return result
