"""What a `SpeedResult` says, as tables, text and a plot: the report, `pdc bench` and the
comparison's `expect A beats B on decode_speed` all read it from here.

The headline is each student's speed-up over the teacher (median of the per-round ratios with its
interval), beside its parameter, FLOPs/token and peak-memory ratios; absolute tokens/s are given
per model but only as context.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Sequence

from pdc.errors import PdcError
from pdc.files import write_json
from pdc.plan.results import RECORD_VERSION, Estimate, SpeedResult, decode, encode
from pdc.plotting import pyplot, save_figure
from pdc.runner.stats import BOOTSTRAP_SAMPLES, CONFIDENCE, Difference
from pdc.stages.speed import estimate, interval_coverage

SPEED_PNG = "speed.png"
def students(result: SpeedResult) -> list[str]:
    return [k for k in result.models if k != result.teacher]


def measures(result: SpeedResult) -> list[str]:
    return list(result.models[result.teacher].measures)


def metric_measure(result: SpeedResult, metric: str) -> Optional[str]:
    """The measure a claim metric names: decode at batch 1, decode at the largest batch, torch
    prefill at the longest prompt."""
    if metric == "decode_speed":
        name = f"torch decode@b{min(result.batches)}"
    elif metric == "batch_decode_speed":
        name = f"torch decode@b{max(result.batches)}"
    elif metric == "prefill_speed":
        name = f"torch prefill@{max(result.prompt_lens)}"
    else:
        return None
    return name if name in result.models[result.teacher].measures else None


def fmt_x(e: Estimate) -> str:
    return f"{e.median:.2f}x [{e.low:.2f}, {e.high:.2f}]"


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def speedup_table(result: SpeedResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per student its parameter, FLOPs and memory ratios and its speed-up on
    every measure."""
    t = result.models[result.teacher]
    header = ["student", "params", "FLOPs/token", "peak memory"] + [f"{m} speed-up" for m in measures(result)]
    rows = []
    for k in students(result):
        s = result.models[k]
        rows.append([k, f"{s.params / t.params:.3f}x", f"{s.flops_per_token / t.flops_per_token:.3f}x",
                     f"{s.peak_bytes / t.peak_bytes:.3f}x"] + [fmt_x(s.speedup[m]) for m in measures(result)])
    return header, rows


def absolute_table(result: SpeedResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per model tokens/s medians, time to first token and memory (context for
    the ratios, which are the result)."""
    ms = measures(result)
    header = ["model", "params", "weights", "KV cache/token", "peak memory"] + [f"{m} tok/s" for m in ms]
    header += [f"TTFT@{n} (ms)" for n in result.prompt_lens]
    rows = []
    for k, s in result.models.items():
        row = [k, f"{s.params:,}", fmt_bytes(s.weights_bytes),
               fmt_bytes(s.kv_bytes_per_token), fmt_bytes(s.peak_bytes)]
        row += [f"{s.measures[m].tokens_per_s.median:,.0f}" for m in ms]
        row += [f"{1000 * _median(s.measures[f'torch prefill@{n}'].seconds):.1f}" for n in result.prompt_lens]
        rows.append(row)
    return header, rows


def setup_line(result: SpeedResult) -> str:
    return (f"{result.device}, {result.hardware}, {_threads(result)}, {result.precision}; "
            f"{result.warmup} warm-up + {result.repeats} interleaved rounds per measure, medians with "
            f"{100 * result.confidence:.1f}% intervals; decode: {result.decode_tokens} steps after "
            f"{result.context} prompt tokens")


def _threads(result: SpeedResult) -> str:
    return f"{result.threads} thread" + ("" if result.threads == 1 else "s")


def render_text(result: SpeedResult) -> str:
    lines = [f"speed: {setup_line(result)}", ""]
    for header, rows in (speedup_table(result), absolute_table(result)):
        if rows:
            lines += _text_table(header, rows) + [""]
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines).rstrip() + "\n"


def _text_table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]


def _median(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def plot_speed(result: SpeedResult, path: Path) -> Optional[Path]:
    """Speed-up per measure and student with its interval, against 1x and each student's
    parameter ratio (dashed)."""
    names = students(result)
    if not names:
        return None
    plt = pyplot()
    ms = measures(result)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(ms) * len(names) + 2), 4.2))
    width = 0.8 / len(names)
    t = result.models[result.teacher]
    for i, k in enumerate(names):
        s = result.models[k]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(ms))]
        e = [s.speedup[m] for m in ms]
        bars = ax.bar(xs, [x.median for x in e], width, label=f"{k} ({s.params / t.params:.2f}x params)",
                      yerr=[[x.median - x.low for x in e], [x.high - x.median for x in e]], capsize=3)
        ax.axhline(t.params / s.params, color=bars.patches[0].get_facecolor(), ls="--", lw=1)
    ax.axhline(1.0, color="black", lw=1)
    ax.set_xticks(range(len(ms)), [m.replace(" ", "\n") for m in ms], fontsize=8)
    ax.set_ylabel("speed-up over the teacher (x)")
    ax.set_title(f"student / teacher speed ({result.device}, {_threads(result)}); dashed: 1 / params ratio",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def speedup_ratio(winner: SpeedResult, loser: SpeedResult, metric: str, seed: int = 0) -> Optional[Difference]:
    """The winner's speed-up over its teacher divided by the loser's on `metric`'s measure, each
    from its own session (their teachers are the same model), with a bootstrap interval: the
    rounds of each side resampled apart, the ratio of medians. None when a side did not measure it."""
    rounds = []
    for result in (winner, loser):
        name = metric_measure(result, metric)
        student = students(result)[:1]
        if name is None or not student:
            return None
        t, s = result.models[result.teacher].measures[name].seconds, result.models[student[0]].measures[name].seconds
        rounds.append([a / b for a, b in zip(t, s)])
    a, b = rounds
    rng = random.Random(seed)
    ratios = sorted(_median(rng.choices(a, k=len(a))) / _median(rng.choices(b, k=len(b)))
                    for _ in range(BOOTSTRAP_SAMPLES))
    lo = ratios[int((1 - CONFIDENCE) / 2 * BOOTSTRAP_SAMPLES)]
    hi = ratios[min(BOOTSTRAP_SAMPLES - 1, int((1 + CONFIDENCE) / 2 * BOOTSTRAP_SAMPLES))]
    return Difference(_median(a) / _median(b), lo, hi, "bootstrap over rounds (teacher-normalised speed-ups)")


def variant_student(result: SpeedResult, variant: str) -> Optional[str]:
    """The label of a comparison variant's last student in a `pdc bench` session."""
    found = [k for k in students(result) if k.startswith(f"{variant}/")]
    return found[-1] if found else None


def paired_ratio(result: SpeedResult, winner: str, loser: str, metric: str) -> Optional[Difference]:
    """Two students of one session on `metric`'s measure: the median over rounds of the loser's
    seconds / the winner's (= the winner's speed-up / the loser's in that round), with the
    order-statistic interval of the median."""
    name = metric_measure(result, metric)
    if name is None:
        return None
    a, b = result.models[winner].measures[name].seconds, result.models[loser].measures[name].seconds
    e = estimate([y / x for x, y in zip(a, b)])
    return Difference(e.median, e.low, e.high, f"paired over {len(a)} rounds of one `pdc bench` session "
                      f"({100 * interval_coverage(len(a)):.1f}% interval of the median)")


# ---- the file `pdc bench` writes ----------------------------------------------------------------
SPEED_DIR = "bench"
SPEED_FILE = "speed.json"


def write_speed(build: Path, result: SpeedResult) -> Path:
    return write_json(Path(build) / SPEED_DIR / SPEED_FILE, {"version": RECORD_VERSION, "speed": encode(result)})


def read_speed(build: Path) -> Optional[SpeedResult]:
    """What `pdc bench` measured last in `build` (None: nothing, or a file of another version)."""
    path = Path(build) / SPEED_DIR / SPEED_FILE
    try:
        data = json.loads(path.read_text())
        return decode(SpeedResult, data["speed"], str(path)) if data.get("version") == RECORD_VERSION else None
    except (OSError, ValueError, KeyError, TypeError, PdcError):
        return None
