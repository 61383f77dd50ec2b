"""Entry point of one training rank: `python -m pdc.stages.train.worker --stage-dir DIR`.

Started by `torchrun` (CPU/gloo) or the `deepspeed` launcher (GPUs), which set RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT. An expected fault is written to `DIR/error.json` (first
rank to fail wins) so the launcher can report it as one line; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from pdc.errors import PdcError, one_line
from pdc.stages.train.loop import run_stage


def write_error(stage_dir: Path, message: str) -> None:
    path = stage_dir / "error.json"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as f:
        json.dump({"message": message, "rank": int(os.environ.get("RANK", 0))}, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdc.stages.train.worker")
    parser.add_argument("--stage-dir", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))

    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    try:
        run_stage(args.stage_dir)
    except PdcError as exc:
        write_error(args.stage_dir, exc.message)
        print(f"pdc: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an unexpected failure: keep the traceback in the log, one line upstream
        traceback.print_exc()
        write_error(args.stage_dir, one_line(exc))
        return 1
    return 0


def _exit(code: int) -> None:
    """Leave without interpreter teardown: the work is done and on disk (the checkpoint pointer
    and the final model are renamed into place atomically). Under load, tearing down DeepSpeed's
    and gloo's C++ threads after the process group is destroyed can abort the process
    ('terminate called without an active exception'), which the launcher would report as a
    failed run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
