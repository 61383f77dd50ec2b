"""Stale lock files of torch's JIT extension builds, left by killed processes.

DeepSpeed loads its C++ ops (on CPU: the shared-memory collectives) with
`torch.utils.cpp_extension.load`, which takes a lock file `<build dir>/lock` (created with
O_CREAT|O_EXCL and held open, then closed and removed) around every load, even when nothing
needs building. A process killed while it holds the file leaves it behind, and every later
DeepSpeed start on the machine then waits for it forever, silently.

`remove_stale_jit_locks` removes such a file when no process has it open (read from
`/proc/*/fd`) at two looks a moment apart: a live holder keeps the file open until it removes it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

LOCK_NAME = "lock"
SECOND_LOOK_S = 0.5


def extensions_root() -> Path:
    """Where torch builds JIT extensions (`TORCH_EXTENSIONS_DIR`, else its default)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def _open_files() -> set[tuple[int, int]]:
    """(device, inode) of every file some process has open (the ones we may look at)."""
    held = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                st = fd.stat()
            except OSError:
                continue
            held.add((st.st_dev, st.st_ino))
    return held


def _identity(path: Path):
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def remove_stale_jit_locks(root: Path | None = None) -> list[Path]:
    """Remove the extension build locks under `root` that no process holds; returns them."""
    if not Path("/proc/self/fd").is_dir():
        return []  # not Linux: nothing to read the holders from
    root = Path(root) if root is not None else extensions_root()
    locks = [p for pattern in (f"*/{LOCK_NAME}", f"*/*/{LOCK_NAME}") for p in root.glob(pattern) if p.is_file()]
    if not locks:
        return []
    held = _open_files()
    first = {p: i for p in locks if (i := _identity(p)) is not None and i not in held}
    if not first:
        return []
    time.sleep(SECOND_LOOK_S)
    held = _open_files()
    removed = []
    for path, ident in first.items():
        if _identity(path) == ident and ident not in held:
            try:
                path.unlink()
            except OSError:
                continue
            removed.append(path)
    return removed
