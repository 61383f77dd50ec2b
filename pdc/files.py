"""Files that are either absent, as they were, or complete: the one implementation of atomic
writes, staged directories and content hashes that every layer uses.

- `write_text` / `write_bytes` / `write_json`: write a sibling temporary file, then rename it over
  the destination (same filesystem, so the rename is atomic). A crash leaves the old file or none.
- `staged_dir(final)`: a context manager yielding `<final>.tmp/`; on success it replaces `final`
  in one rename, on failure (any exception, KeyboardInterrupt too) it removes the temporary
  directory. A stale `<final>.tmp/` from a killed run is removed before the new one is made.
- `sha256_file` / `sha256_bytes`: content identity, streamed in 1 MiB chunks.
- `remove_temp_leftovers(dir)`: every temporary name above ends in `.tmp` (or, for files that
  must keep their suffix, contains `.tmp.` after a leading dot), so what a killed process left
  behind can be found and removed by the next run.
- `exclusive_lock(path)`: one writer per build directory (an advisory lock the kernel releases
  when the holder dies, even by SIGKILL).

No torch here: the language layer and the CLI use it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Union

from pdc.errors import PdcError

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


def read_versioned_json(path: PathLike, key: str, expected: Any, what: str, rebuild: PathLike) -> dict:
    """The JSON header at `path` that this pdc wrote, its `key` (a format name or version) equal
    to `expected`; otherwise one `PdcError` saying what is wrong: missing (`what` names the thing
    it describes), unreadable, or of another format, with the directory `rebuild` to delete so it
    is built again."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PdcError(f"no {what} in {rebuild} ({path.name} missing)") from None
    except ValueError as exc:
        raise PdcError(f"{path} is not readable JSON ({exc}): delete {rebuild} to rebuild it") from None
    if data.get(key) != expected:
        raise PdcError(f"{path} has {key} {data.get(key)!r}, this pdc reads {expected!r}: delete {rebuild} "
                       "to rebuild it")
    return data


def temp_path_beside(path: PathLike, suffix: str = "") -> Path:
    """A fresh, empty temporary file name next to `path` that keeps its suffix (some writers
    insist on one, e.g. `.pt2`): `.<stem>.<random>.tmp<suffix>`. The caller renames or removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=TMP_SUFFIX + (suffix or path.suffix),
                                dir=path.parent)
    os.close(fd)
    return Path(name)


def replace_path(src: PathLike, dst: PathLike) -> None:
    """Move `src` over `dst` (a file or a directory). A directory at `dst` is first renamed
    aside and removed only after `src` is in place, so a kill at any moment leaves `dst`
    complete (old or new) or absent, never half-deleted."""
    src, dst = Path(src), Path(dst)
    if dst.is_symlink():
        dst.unlink()  # a link to a stage shared with a sibling build: the target stays
    elif dst.is_dir():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=TMP_SUFFIX, dir=dst.parent))
        os.replace(dst, trash / dst.name)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
        return
    os.replace(src, dst)


def is_temp_name(name: str) -> bool:
    """A name made by this module for something not yet (or no longer) in place."""
    return name.endswith(TMP_SUFFIX) or (name.startswith(".") and TMP_SUFFIX + "." in name)


def remove_temp_leftovers(root: PathLike, recurse: Iterable[PathLike] = ()) -> list[Path]:
    """Remove the temporary files and directories directly in `root` and anywhere below the
    directories `recurse`; returns what was removed. Only for a directory no other process is
    writing into (hold its `exclusive_lock`)."""
    found: list[Path] = []
    for top, deep in [(Path(root), False)] + [(Path(d), True) for d in recurse]:
        for dirpath, dirnames, filenames in os.walk(top):
            for name in list(dirnames) + filenames:
                if is_temp_name(name):
                    found.append(Path(dirpath) / name)
            dirnames[:] = [d for d in dirnames if deep and not is_temp_name(d)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def exclusive_lock(path: PathLike, busy_message: str) -> Iterator[None]:
    """Hold an advisory exclusive lock on `path` (created) for the block; if another process
    holds it, raise a `PdcError` with `busy_message` and the holder's pid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise PdcError(f"{busy_message} (pid {holder}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


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
