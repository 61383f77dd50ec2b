"""The search's Pareto plot: each ranked candidate's score against its parameters (and its
predicted latency when a latency budget was fitted), the chosen one and hand-written recipes
marked."""

from __future__ import annotations

from pathlib import Path

from pdc.plotting import pyplot, save_figure


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (fewer params, lower loss)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2, y2) != (x, y) for x2, y2 in points):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_pareto(search: dict, path: Path, hand: dict) -> Path:
    """`hand`: {label: {"params": n, "cheap_loss": x, "distill_loss": y (optional)}}."""
    plt = pyplot()
    rows = search["candidates"]
    xs_key = [("params", "parameters")] + ([("latency", "predicted latency (s)")] if rows[0].get("latency") else [])
    fig, axes = plt.subplots(1, len(xs_key), figsize=(7 * len(xs_key), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], xs_key):
        pts = [(r[key], r["cheap_loss"]) for r in rows]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, c="tab:blue",
                   label="candidates: LM loss untrained (calibration blocks)")
        front = pareto_front(pts)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="tab:blue", lw=0.8, alpha=0.6)
        dist = [(r[key], r["distill_loss"]) for r in rows if r.get("distill_loss") is not None]
        if dist:
            ax.scatter([p[0] for p in dist], [p[1] for p in dist], s=30, marker="s", c="tab:orange",
                       label=f"top {len(dist)} after {search['steps']} distillation steps (validation blocks)")
        ch = rows[search["chosen"]]
        ax.scatter([ch[key]], [ch["distill_loss"] if ch.get("distill_loss") is not None else ch["cheap_loss"]],
                   s=160, facecolors="none", edgecolors="red", lw=2, label="chosen: " + _label(ch["sizes"]))
        for name, h in hand.items():
            if h.get(key) is None:
                continue
            ax.scatter([h[key]], [h["cheap_loss"]], marker="*", s=140, c="black")
            ax.annotate(f"{name} (no training)", (h[key], h["cheap_loss"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
            if h.get("distill_loss") is not None:
                ax.scatter([h[key]], [h["distill_loss"]], marker="*", s=140, c="grey")
                ax.annotate(f"{name} (distilled)", (h[key], h["distill_loss"]), fontsize=8, xytext=(4, -10),
                            textcoords="offset points")
        ax.set(xlabel=label, ylabel="LM loss (nats): calibration blocks untrained, validation blocks distilled")
        ax.legend(fontsize=7)
    fig.suptitle(f"prune search: {len(rows)} candidates of {search['space_size']} shapes "
                 f"({', '.join(_limit(l) for l in search['limits'])})")
    fig.tight_layout()
    return save_figure(fig, path)


def _label(sizes: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())


def _limit(l: dict) -> str:
    return f"{l['metric']}<={l['value']:g}{'x' if l['relative'] else ''}"
