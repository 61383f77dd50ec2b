"""`pdc check`: recompile the prune stages in a scratch directory and compare each fresh lock
with the committed one (`pdc.emit.lock.compare_locks`, the comparison the tests test).

What the first prune stage reads comes, in this order, from `--prune-input DIR` (a checkpoint
directory, e.g. a CI cache restored under the hash the lock records), from `--build DIR` (or the
spec's default build directory) when the stage reads an earlier stage's model, or from the spec's
source model. Its content hash is part of the lock, so a different input fails the check by name
instead of passing silently; nothing is retrained here.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from pdc.emit.lock import compare_locks, read_lock, render_mismatches
from pdc.errors import PdcError
from pdc.lang.checked import CheckedSpec
from pdc.plan.stage_graph import StageRef
from pdc.runner.build import Build, default_build_dir
from pdc.runner.build_locks import lock_path_of

STAGE = "check"


def committed_locks(spec: CheckedSpec, lock_path: Optional[Path] = None) -> dict[str, Path]:
    """Prune stage -> committed lock file (`lock_path` replaces the first stage's)."""
    prunes = [n.name for n in Build(spec, progress=False).graph.of_kind("prune")]
    if not prunes:
        raise PdcError("the spec has no prune stage: there is no lock to check", STAGE)
    locks = {name: lock_path_of(spec, name) for name in prunes}
    if lock_path is not None:
        locks[prunes[0]] = Path(lock_path)
    return locks


def input_key(spec: CheckedSpec, lock_path: Optional[Path] = None) -> str:
    """The content hash the committed lock records for the first prune stage's input model: the
    key a CI cache stores that checkpoint under."""
    path = next(iter(committed_locks(spec, lock_path).values()))
    lock = _read_committed(spec, path)
    try:
        return str(lock["inputs"]["model"]["sha256"])
    except (KeyError, TypeError):
        raise PdcError(f"lock file {path} records no prune input hash (rebuild it with `pdc compile`)", STAGE) from None


def check_spec(spec: CheckedSpec, lock_path: Optional[Path] = None, build_dir: Optional[Path] = None,
               prune_input: Optional[Path] = None, progress: bool = True, rtol: Optional[float] = None,
               atol: Optional[float] = None) -> int:
    """Recompile the prune stages in a scratch directory and compare each with its committed
    lock. Returns the exit code: 0 on a match, 1 on a mismatch."""
    locks = committed_locks(spec, lock_path)
    expected = {name: _read_committed(spec, path) for name, path in locks.items()}  # fail before recompiling
    ok_all = True
    with tempfile.TemporaryDirectory(prefix="pdc-check-") as scratch:
        build = Build(spec, Path(scratch), progress, artifacts=False)
        first = next(iter(locks))
        ref = build.graph.node(first).inputs["model"]
        if prune_input is not None:
            build.use_model(ref, _checkpoint_dir(Path(prune_input), "--prune-input"))
        elif isinstance(ref, StageRef):
            home = Path(build_dir) if build_dir else default_build_dir(spec)
            key = expected[first].get("inputs", {}).get("model", {}).get("sha256", "?")
            model = home / ref.stage / ref.output
            if not (model / "config.json").exists():
                raise PdcError(
                    f"prune stage {first!r} reads the model of stage {ref.stage!r}, which is not in {home}: pass "
                    f"--prune-input DIR (the checkpoint the lock records as sha256 {key}) or --build DIR", STAGE)
            build.use_model(ref, model)
        for name in locks:
            build.run_stage(name)
            actual = build.lock(name)
            spec_rtol, spec_atol = build.graph.node(name).decl.check_tolerance  # the command line wins
            mismatches = compare_locks(expected[name], actual, rtol=spec_rtol if rtol is None else rtol,
                                       atol=spec_atol if atol is None else atol)
            message = render_mismatches(mismatches, expected[name], actual)
            print(f"{name}: {message}" if len(locks) > 1 else message)
            ok_all = ok_all and not mismatches
    return 0 if ok_all else 1


def _read_committed(spec: CheckedSpec, path: Path) -> dict:
    if not path.exists():
        raise PdcError(f"no lock at {path}: run `pdc compile {spec.path}` and commit the lock", STAGE)
    return read_lock(path)


def _checkpoint_dir(path: Path, option: str) -> Path:
    if not (path / "config.json").exists():
        raise PdcError(f"{option} {path} is not a Hugging Face checkpoint directory (no config.json)", STAGE)
    return path
