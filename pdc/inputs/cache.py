"""Where pdc keeps what it builds once and reuses: `$PDC_CACHE`, else `~/.cache/pdc`."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("PDC_CACHE", Path.home() / ".cache" / "pdc"))
