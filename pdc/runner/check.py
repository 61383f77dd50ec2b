"""`pdc check`: recompile the prune stages in a scratch directory and compare each fresh lock
with the committed one (`pdc.emit.lock.compare_locks`, the comparison the tests test)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

from pdc.emit.lock import compare_locks, read_lock, render_mismatches
from pdc.errors import PdcError
from pdc.lang.checked import CheckedSpec
from pdc.runner.build import Build, default_build_dir, lock_path_of


def check_spec(spec: CheckedSpec, lock_path: Optional[Path] = None, out_dir: Optional[Path] = None,
               progress: bool = True, rtol: Optional[float] = None, atol: Optional[float] = None) -> int:
    """Recompile the prune stages in a scratch directory and compare each with its committed
    lock (`lock_path` names the lock of the first prune stage). Returns the exit code: 0 on a
    match, 1 on a mismatch."""
    home = Path(out_dir) if out_dir else default_build_dir(spec)
    build_home = Build(spec, home, progress)
    prunes = [n.name for n in build_home.graph.of_kind("prune")]
    if not prunes:
        raise PdcError("the spec has no prune stage: there is no lock to check", "check")
    locks = {n: lock_path_of(home, n) for n in prunes}
    if lock_path is not None:
        locks[prunes[0]] = Path(lock_path)
    expected = {}
    for name, path in locks.items():
        if not path.exists():
            raise PdcError(f"no lock at {path}: run `pdc compile {spec.path}` and commit the lock", "check")
        expected[name] = read_lock(path)  # a corrupt lock fails here, before the recompile
    ok_all = True
    with tempfile.TemporaryDirectory(prefix="pdc-check-") as scratch:
        build = Build(spec, Path(scratch), progress, artifacts=False)
        for node in build.graph.of_kind("correct"):
            if node.decl.order != "sequential":
                continue
            # Reuse the corrected teacher of the real build when it is up to date.
            if not build_home.done(node.name):
                raise PdcError("the corrected teacher is missing or stale: run `pdc run --stage correct` first", "check")
            shutil.copytree(home / node.name, build.out / node.name)
        build.write_plan()
        for name in prunes:
            build.run_stage(name)
            actual = read_lock(build.write_lock(name))
            spec_rtol, spec_atol = build.graph.node(name).decl.check_tolerance  # the command line wins
            mismatches = compare_locks(expected[name], actual, rtol=spec_rtol if rtol is None else rtol,
                                       atol=spec_atol if atol is None else atol)
            message = render_mismatches(mismatches, expected[name], actual)
            print(f"{name}: {message}" if len(prunes) > 1 else message)
            ok_all = ok_all and not mismatches
    return 0 if ok_all else 1
