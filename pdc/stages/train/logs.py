"""Training logs: one JSON object per optimizer step in `log.jsonl`, and a loss-curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pdc.plotting import pyplot, save_figure


def read_log(path: Path) -> list[dict]:
    """All complete records of a JSONL log (a torn last line from a killed run is skipped)."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def truncate_log(path: Path, last_step: int) -> None:
    """Keep only records with step <= last_step (a resumed run re-logs the steps after it)."""
    records = [r for r in read_log(path) if r.get("step", 0) <= last_step]
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


class JsonlLog:
    """Appends records, flushed per line so a reader (the launcher's progress bar) sees them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def plot_loss(records: list[dict], png: Path, title: str) -> None:
    """Training loss (and KL, LR, the held-out loss of `val_every`) per step as a PNG."""
    plt = pyplot()

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in records], label="train loss")
    if records and "kl" in records[0] and any(abs(r["kl"] - r["loss"]) > 1e-9 for r in records):
        ax.plot(steps, [r["kl"] for r in records], label="KL term", alpha=0.7)
    corrected = [(r["step"], r["teacher_loss"]) for r in records if "teacher_loss" in r]
    if corrected:  # a teacher corrected in the same loop (order=concurrent)
        ax.plot([c[0] for c in corrected], [c[1] for c in corrected], label="teacher train loss (corrected)", alpha=0.7)
    curves = [("val_loss", "held-out LM loss"), ("val_kl", "held-out KL")]
    if corrected:
        curves.append(("val_teacher_loss", "teacher held-out LM loss"))
    for key, label in curves:
        val = [(r["step"], r[key]) for r in records if key in r]
        if val:
            ax.plot([v[0] for v in val], [v[1] for v in val], marker="o", ms=3, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if records:
        ax2 = ax.twinx()
        ax2.plot(steps, [r["lr"] for r in records], color="gray", linestyle=":", label="LR")
        ax2.set_ylabel("learning rate")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
    fig.tight_layout()
    save_figure(fig, png, dpi=110)
