"""Files that are either absent, as they were, or complete: the one implementation of atomic
writes, staged directories and content hashes that every layer uses.

- `write_text` / `write_bytes` / `write_json`: write a sibling temporary file, then rename it over
  the destination (same filesystem, so the rename is atomic). A crash leaves the old file or none.
- `staged_dir(final)`: a context manager yielding `<final>.tmp/`; on success it replaces `final`
  in one rename, on failure (any exception, KeyboardInterrupt too) it removes the temporary
  directory. A stale `<final>.tmp/` from a killed run is removed before the new one is made.
- `sha256_file` / `sha256_bytes`: content identity, streamed in 1 MiB chunks.

No torch here: the language layer and the CLI use it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, Path]
TMP_SUFFIX = ".tmp"
_CHUNK = 1 << 20


def _default_mode(path: Path) -> None:
    """mkstemp creates files 0600; give the file the mode a plain open() would (the umask's)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        _default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def temp_path_beside(path: PathLike, suffix: str = "") -> Path:
    """A fresh, empty temporary file name next to `path` (the caller renames or removes it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def replace_path(src: PathLike, dst: PathLike) -> None:
    """Move `src` over `dst` (a file or a directory); a directory at `dst` is removed first."""
    src, dst = Path(src), Path(dst)
    if dst.is_symlink():
        dst.unlink()  # a link to a stage shared with a sibling build: the target stays
    elif dst.is_dir():
        shutil.rmtree(dst)
    os.replace(src, dst)


def replace_path_with_link(link: PathLike, target: PathLike) -> Path:
    """Make `link` a relative symbolic link to `target` (what was at `link` is replaced)."""
    link, target = Path(link), Path(target)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.link{TMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent.resolve()), tmp)
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    os.replace(tmp, link)
    return link


def staging_path(final: PathLike) -> Path:
    """The temporary directory that `staged_dir(final)` uses: `<final>.tmp`."""
    final = Path(final)
    return final.with_name(final.name + TMP_SUFFIX)


@contextlib.contextmanager
def staged_dir(final: PathLike) -> Iterator[Path]:
    """Yield an empty `<final>.tmp/`; rename it to `final` when the block succeeds, remove it
    when the block raises. `final` is never half-written."""
    final = Path(final)
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, final)


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON form (sorted keys, no spaces) of `obj`."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode())
