#!/usr/bin/env python3
"""Rebuild the data files pdc carries (`pdc/data/`) from their upstream and check them.

    python3 scripts/rebuild_assets.py                 # clone the upstream repos, rebuild, compare
    python3 scripts/rebuild_assets.py --squadshifts DIR --bbh DIR   # from local clones (git or files)
    python3 scripts/rebuild_assets.py ... --write     # write pdc/data/*.gz and manifest.json

Without --write it changes nothing: it rebuilds every carried file in memory from the upstream
files pinned in `pdc.inputs.asset_sources` (repository, commit, path, sha256) and compares the
result with `pdc/data/manifest.json` and with the carried files, byte for byte. Exit 0 when all
agree, 1 with one line per difference.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from pdc.errors import PdcError
from pdc.inputs.asset_sources import UPSTREAM_FILES, UPSTREAMS, build_carried, gzip_bytes, manifest_files
from pdc.inputs.assets import CARRIED_DIR

ABOUT = ("Data files pdc carries (gzipped JSONL). sha256 and bytes are of the decompressed contents. "
         "Rebuild and check: python3 scripts/rebuild_assets.py")


def _read(folder: Path, commit: str, path: str) -> bytes:
    """`path` at `commit` from a git clone (bare or not), else the file under `folder`."""
    got = subprocess.run(["git", "-C", str(folder), "show", f"{commit}:{path}"], capture_output=True)
    if got.returncode == 0:
        return got.stdout
    if (folder / path).is_file():
        return (folder / path).read_bytes()
    raise PdcError(f"{folder}: neither a git clone holding commit {commit[:12]} nor a folder with {path}")


def _clone(name: str, into: Path) -> Path:
    up = UPSTREAMS[name]
    dest = into / name
    # Blobs are fetched on demand by `git show`: only the pinned files are downloaded.
    if subprocess.run(["git", "clone", "--quiet", "--filter=blob:none", "--no-checkout", up.repo, str(dest)]).returncode:
        raise PdcError(f"git clone {up.repo} failed")
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in UPSTREAMS:
        ap.add_argument(f"--{name}", type=Path, metavar="DIR", help=f"a clone of {UPSTREAMS[name].repo}")
    ap.add_argument("--write", action="store_true", help="write the carried files and the manifest")
    args = ap.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folders = {n: getattr(args, n) or _clone(n, Path(tmp)) for n in UPSTREAMS}
            upstream = {key: _read(folders[up], UPSTREAMS[up].commit, path)
                        for key, (up, path, _) in UPSTREAM_FILES.items()}
        carried = build_carried(upstream)
    except PdcError as exc:
        print(f"rebuild_assets: error: {exc}", file=sys.stderr)
        return 1
    files = manifest_files(carried)
    manifest = {"about": ABOUT, "files": files}
    if args.write:
        for name, (data, _) in carried.items():
            (CARRIED_DIR / f"{name}.gz").write_bytes(gzip_bytes(data))
        (CARRIED_DIR / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {len(files)} files and manifest.json into {CARRIED_DIR}")
        return 0
    problems = []
    try:
        committed = json.loads((CARRIED_DIR / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        committed = {"files": {}}
        problems.append(f"manifest.json: unreadable ({exc})")
    for name in sorted(set(files) | set(committed["files"])):
        want, have = files.get(name), committed["files"].get(name)
        if want != have:
            problems.append(f"{name}: the manifest entry differs from the rebuilt one" if want and have
                            else f"{name}: {'not in the manifest' if want else 'in the manifest, not rebuilt'}")
        elif (CARRIED_DIR / name).read_bytes() != gzip_bytes(carried[name.removesuffix('.gz')][0]):
            problems.append(f"{name}: the carried file differs from the rebuilt one")
    for p in problems:
        print(f"rebuild_assets: {p}", file=sys.stderr)
    print(f"{len(files) - len(problems)} of {len(files)} carried files rebuilt identically from upstream")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
