"""matplotlib's pyplot on the file-only Agg backend: every plot pdc draws is a PNG on disk.

Imported on first use (matplotlib takes a second to import; `pdc fmt` and the dry run never
draw)."""

from __future__ import annotations

from pathlib import Path

from pdc.files import replace_path, temp_path_beside


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Save `fig` as a PNG at `path` atomically and close it."""
    path = Path(path)
    tmp = temp_path_beside(path, suffix=".png")
    try:
        fig.savefig(tmp, dpi=dpi)
        replace_path(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        pyplot().close(fig)
    return path
