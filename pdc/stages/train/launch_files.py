"""The launch files of a training stage, all for the same stage directory:

  ds_config.json   the DeepSpeed config (batch geometry, optimizer, schedule, ZeRO stage, bf16 as
                   the spec asks: the rank decides on its own machine whether it can run it)
  launch.sh        torchrun with a c10d rendezvous: the same line on every node (pdc runs it here)
  deepspeed.sh     DeepSpeed's launcher on the nodes and slots of `hostfile` (pdc runs it with --hostfile)
  hostfile         the hostfile that deepspeed.sh reads (this machine, or the one given, or a template)
  slurm.sbatch     a Slurm batch script: one torchrun per node of the allocation (srun), c10d
                   rendezvous on the first node (pdc runs it with --launcher slurm)

Written by `pdc compile` for every training stage (so a cluster job can be started by hand) and
by the stage itself before it runs. Every file starts the same worker
(`python -m pdc.stages.train.worker --stage-dir DIR`); rerunning any of them resumes from the
last checkpoint. Several nodes must see DIR, the pdc cache and this Python at the same paths (a
shared filesystem).
"""

from __future__ import annotations

import errno
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

from pdc.errors import PdcError
from pdc.files import write_bytes
from pdc.lang.settings import TrainConfig
from pdc.plan.training import Launch, ds_config, parse_hostfile, total_steps

WORKER = ["-m", "pdc.stages.train.worker", "--stage-dir"]
RDZV_JOIN_TIMEOUT_S = 900  # how long the first node waits for the others to join


def _q(args) -> str:
    return " ".join(shlex.quote(str(a)) for a in args)


def _torchrun_words(work_dir: Path, nnodes: str, nproc: int, endpoint: str, run_id: str) -> list[str]:
    """The torchrun command as shell words; `nnodes`, `endpoint` and `run_id` are already shell
    words (quoted values, or "$VARIABLES" that a batch script expands)."""
    return [shlex.quote(sys.executable), "-m", "torch.distributed.run", "--nnodes", nnodes,
            "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", run_id, "--rdzv-conf", f"join_timeout={RDZV_JOIN_TIMEOUT_S}", "--max-restarts", "0",
            *WORKER, shlex.quote(str(work_dir))]


def deepspeed_argv(work_dir: Path, hostfile: Path, hosts: list[tuple[str, int]], port: int) -> list[str]:
    first = hosts[0][0]
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
            "--master_addr", "127.0.0.1" if first in ("localhost", "127.0.0.1") else first,
            "--master_port", str(port)]
    if len(hosts) == 1:
        argv.append("--no_ssh_check")  # one node starts its processes locally: no ssh needed
    return argv + ["--module", *WORKER[1:], str(work_dir)]


def _script(lines: list[str]) -> str:
    return "\n".join(["#!/bin/sh", *lines, ""])


def launch_scripts(work_dir: Path, cfg: TrainConfig, stage: str, launch: Launch, port: int,
                   run_id: str) -> dict[str, str]:
    """File name -> text of every launch file of the stage (not ds_config.json)."""
    n, m = launch.nnodes, launch.nproc_per_node
    endpoint = launch.rdzv_endpoint or f"127.0.0.1:{port}"
    what = f"pdc training stage `{stage}` in {work_dir}: {n} node(s) x {m} process(es) = world size {n * m}."
    files: dict[str, str] = {}
    files["launch.sh"] = _script([
        f"# {what}",
        f"# torchrun, c10d rendezvous at {endpoint}: run this same line on each of the {n} node(s);",
        "# the rendezvous assigns the ranks. Rerunning resumes from the last checkpoint.",
        "exec " + " ".join(_torchrun_words(work_dir, str(n), m, shlex.quote(endpoint), shlex.quote(run_id))),
    ])
    if launch.hostfile:
        hosts = parse_hostfile(launch.hostfile)
        hostfile = "".join(f"{h} slots={s}\n" for h, s in hosts)
        note = f"# the hosts of {launch.hostfile}"
    elif n == 1:
        hosts = [("localhost", m)]
        hostfile = f"localhost slots={m}\n"
        note = "# this machine"
    else:
        hosts = [(f"node{i}", m) for i in range(n)]
        hostfile = "# replace with your nodes (reachable by passwordless ssh), one per line\n" + \
            "".join(f"{h} slots={m}\n" for h, _ in hosts)
        note = "# edit hostfile first: it lists placeholder nodes"
    files["hostfile"] = hostfile
    files["deepspeed.sh"] = _script([
        f"# {what}",
        f"# DeepSpeed's launcher on the nodes and slots of {work_dir / 'hostfile'} ({note[2:]});",
        "# it starts the other nodes' processes over ssh (pdsh). Rerunning resumes from the last checkpoint.",
        "exec " + _q(deepspeed_argv(work_dir, work_dir / "hostfile", hosts, port)),
    ])
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *_torchrun_words(work_dir, '"$SLURM_NNODES"', m, '"$head:$port"', f'"pdc-{stage}-$SLURM_JOB_ID"')]
    files["slurm.sbatch"] = "\n".join([
        "#!/bin/bash",
        f"#SBATCH --job-name=pdc-{stage}",
        f"#SBATCH --nodes={n}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={m}",
        f"#SBATCH --output={work_dir}/slurm-%j.log",
        f"# {what}",
        "# One GPU per process (drop --gpus-per-node above on a CPU-only cluster).",
        "# `pdc run --launcher slurm` inside an allocation runs this file with bash; `sbatch` it by hand to",
        "# run this stage as its own job once pdc has prepared the directory (stage.json). Rerunning resumes",
        "# from the last checkpoint. One torchrun per node; the c10d rendezvous runs on the first node.",
        "set -eu",
        'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "port=$((29400 + SLURM_JOB_ID % 1000))",
        " ".join(srun),
        "",
    ])
    return files


def launch_argv(work_dir: Path, launch: Launch) -> list[str]:
    """What pdc runs on this node: launch.sh (torchrun), deepspeed.sh (hostfile) or slurm.sbatch."""
    name = {"torchrun": "launch.sh", "deepspeed": "deepspeed.sh", "slurm": "slurm.sbatch"}[launch.launcher]
    return ["bash" if launch.launcher == "slurm" else "sh", str(Path(work_dir) / name)]


def write_stage_files(work_dir: Path, cfg: TrainConfig, stage: str, launch: Launch = Launch(),
                      port: Optional[int] = None, run_id: Optional[str] = None) -> dict:
    """Write `ds_config.json` and the launch files of a stage into `work_dir` (also usable before a
    run, e.g. for a plan); returns the DeepSpeed config. Raises PdcError for an impossible geometry."""
    steps = total_steps(cfg, stage)
    config = ds_config(cfg, steps, launch.world_size, stage, cfg.precision == "bf16")
    work_dir = Path(work_dir).resolve()
    files = launch_scripts(work_dir, cfg, stage, launch, port or 29500, run_id or f"pdc-{stage}")
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        write_bytes(work_dir / "ds_config.json", json.dumps(config, indent=2).encode())
        for name, text in files.items():
            write_bytes(work_dir / name, text.encode())
            if not name.endswith("hostfile"):
                (work_dir / name).chmod(0o755)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise PdcError(f"disk full while writing the work dir {work_dir}", stage) from exc
        raise PdcError(f"cannot write the work dir {work_dir}: {exc.strerror}", stage) from exc
    return config
