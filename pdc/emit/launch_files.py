"""The launch files of a training stage: `ds_config.json` and `launch.sh` (the exact commands).

Written by `pdc compile` for every training stage (so a cluster job can be started by hand) and
by the stage itself before it runs.
"""

from __future__ import annotations

import errno
import json
import shlex
import sys
from pathlib import Path

import torch

from pdc.errors import PdcError
from pdc.files import write_bytes
from pdc.lang.settings import TrainConfig
from pdc.plan.training import ds_config, total_steps


def launch_commands(work_dir: Path, world_size: int, port: int) -> tuple[list[str], str]:
    """(the CPU/gloo torchrun argv pdc runs, launch.sh text also showing the GPU `deepspeed` line)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
            "--master_addr", "127.0.0.1", "--master_port", str(port),
            "-m", "pdc.stages.train.worker", "--stage-dir", str(work_dir)]
    script = "\n".join([
        "#!/bin/sh",
        f"# pdc training stage in {work_dir}: {world_size} process(es). Rerunning resumes from the last checkpoint.",
        "# CPU / gloo (what pdc runs here; world size 1 runs in-process, equivalent to this):",
        " ".join(shlex.quote(a) for a in argv),
        "# GPUs, one process per GPU (add --hostfile FILE for several nodes):",
        f"# deepspeed --num_gpus {world_size} --module pdc.stages.train.worker --stage-dir {shlex.quote(str(work_dir))}",
        "",
    ])
    return argv, script


def write_stage_files(work_dir: Path, cfg: TrainConfig, stage: str, world_size: int = 1,
                      port: int | None = None) -> dict:
    """Write `ds_config.json` and `launch.sh` of a stage into `work_dir` (also usable before a run,
    e.g. for a plan); returns the DeepSpeed config. Raises PdcError for an impossible geometry."""
    steps = total_steps(cfg, stage)
    bf16 = cfg.precision == "bf16" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    config = ds_config(cfg, steps, world_size, stage, bf16)
    work_dir = Path(work_dir).resolve()
    _, script = launch_commands(work_dir, world_size, port or 29500)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        write_bytes(work_dir / "ds_config.json", json.dumps(config, indent=2).encode())
        write_bytes(work_dir / "launch.sh", script.encode())
        (work_dir / "launch.sh").chmod(0o755)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise PdcError(f"disk full while writing the work dir {work_dir}", stage) from exc
        raise PdcError(f"cannot write the work dir {work_dir}: {exc.strerror}", stage) from exc
    return config
