"""Work split over several processes on this node: the one launcher and worker frame that
evaluation and pruning (importance, depth saliency) use when `pdc run --nproc-per-node M`.

    result = run_in_ranks("pdc.stages.evaluate", job, nproc=2, work_dir=..., stage="evaluate")

starts `python -m <module> --job <work_dir>/job.json` on `nproc` ranks with torchrun
(`--standalone`: a c10d rendezvous on this node); the module's `main` calls `worker_main`, which
joins the process group (`join_ranks`), runs the job on every rank and writes rank
0's answer to `result.json`. A rank that fails writes `error.json` (the first one wins), so the
caller raises that one line, never a traceback; the full log stays in `launch.log`.

`rank_world()` is what a computation asks to find its share; inside `local_only()` it answers
(0, 1), for work that one rank does alone while the others do other work (one depth-saliency
candidate per rank).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from pdc.errors import PdcError, one_line
from pdc.files import write_json
from pdc.stages.process_group import join_ranks, rank_device
from pdc.stages.train.worker import write_error

_LOCAL = [False]  # inside `local_only()`: this rank computes alone


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process's share of a split computation; (0, 1) alone."""
    if not _LOCAL[0] and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Computations inside see a world of one (no split, no collective). LOCAL_RANK reads 0
    inside too: lm-eval returns results only where it is 0."""
    saved, saved_env = _LOCAL[0], os.environ.get("LOCAL_RANK")
    _LOCAL[0] = True
    if saved_env is not None:
        os.environ["LOCAL_RANK"] = "0"
    try:
        yield
    finally:
        _LOCAL[0] = saved
        if saved_env is not None:
            os.environ["LOCAL_RANK"] = saved_env


def rank_batches(n: int, batch_size: int, desc: str, progress: bool = False) -> Iterator[list[int]]:
    """This rank's share of `n` rows, `batch_size` at a time: rank r of w takes rows r, r+w, ...
    (`rank_world`; alone, every row in order), with a progress bar named `desc` on rank 0. The
    one split of a batch loop over ranks (perplexity, block influence): each row is read by
    exactly one rank, so per-row results and sums can be all-reduced."""
    rank, world = rank_world()
    mine = list(range(rank, n, world))
    starts = range(0, len(mine), batch_size)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for start in starts:
        yield mine[start:start + batch_size]


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters is not a model
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """`model` in eval mode inside the block; its training mode restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def run_in_ranks(module: str, job: dict, nproc: int, work_dir: Path, stage: str, what: str) -> dict:
    """Run `python -m module --job FILE` on `nproc` ranks of this node and return rank 0's
    result (the JSON its job function returned). `what` names the work in messages."""
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "error.json"):
        (work_dir / stale).unlink(missing_ok=True)
    write_json(work_dir / "job.json", job)
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", module, "--job", str(work_dir / "job.json")]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log_path = work_dir / "launch.log"
    print(f"[pdc] {stage}: {what} on {nproc} processes (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    result = work_dir / "result.json"
    if code != 0 or not result.exists():
        err = work_dir / "error.json"
        if err.exists():
            raise PdcError(json.loads(err.read_text())["message"], stage)
        raise PdcError(f"{what} processes failed (exit {code}); see {log_path}", stage)
    return json.loads(result.read_text())


def worker_main(argv: Optional[Sequence[str]], prog: str, work: Callable[[dict], Optional[dict]]) -> int:
    """The `main` of a job module: join the process group, run `work(job)` on every rank, write
    rank 0's return value to `result.json`; a failure becomes `error.json` and exit 1."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--job", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        job = json.loads(args.job.read_text())
        join_ranks(rank_device())
        try:
            result = work(job)
            if dist.get_rank() == 0:
                write_json(args.job.parent / "result.json", result)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except PdcError as exc:
        write_error(args.job.parent, exc.message)
        print(f"pdc: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # unexpected: the traceback stays in the log, one line upstream
        traceback.print_exc()
        write_error(args.job.parent, f"{type(exc).__name__}: {one_line(exc)}")
        return 1
    return 0
