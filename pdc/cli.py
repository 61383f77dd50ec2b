"""The `pdc` console script.

    pdc compile SPEC [--dry-run] [--json] [--out DIR]
    pdc fmt SPEC [--write | --check]
    pdc run SPEC [--stage NAME] [--out DIR]
    pdc check SPEC [--lock PATH] [--build DIR] [--prune-input DIR] [--input-key]
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
import sys
from pathlib import Path
from typing import Sequence

from pdc import __version__
from pdc.errors import PdcError
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
    if args.json and not args.dry_run:
        print("pdc: error: --json needs --dry-run", file=sys.stderr)
        return 2
    spec = _load(args.spec)
    if args.dry_run:
        from pdc.plan.dry_run import (  # counts instantiate models: torch
            build_plan,
            render_plan,
        )

        plan = build_plan(spec)
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


def cmd_run(args) -> int:
    spec = _load(args.spec)
    if args.nproc < 1:
        print("pdc: error: --nproc must be at least 1", file=sys.stderr)
        return 2
    from pdc.runner.build import run_spec

    run_spec(spec, Path(args.out) if args.out else None, args.stage, world_size=args.nproc)
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


def cmd_setup(args) -> int:
    from pdc.inputs import assets

    assets.setup()
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
    r.add_argument("--stage", metavar="NAME", help="run only this stage (correct, prune, distill, evaluate)")
    r.add_argument("--out", metavar="DIR", help="build directory")
    r.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="training processes (gloo on CPU; the global batch stays as the spec says)")
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

    s = sub.add_parser("setup", help="install the local assets (SmolLM2-135M, text data, eval tasks)",
                       description="Install the assets the examples and tests use.")
    s.set_defaults(func=cmd_setup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"pdc: error: {type(exc).__name__}: {first} (set PDC_TRACEBACK=1 for the traceback)", file=sys.stderr)
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
