"""Comparisons that say when a difference is noise: paired tests on the same items and blocks.

- `mcnemar`: two models answering the same multiple-choice items (0/1 per item): the exact
  two-sided binomial test on the items where they disagree.
- `paired_bootstrap`: the mean difference of paired per-item (or per-block) values with a
  percentile interval from resampling the pairs (seeded: the report is reproducible).
- `unpaired_interval`: when only each side's mean and standard error are known.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Optional, Sequence

from pdc.plan.results import ModelScores

BOOTSTRAP_SAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Difference:
    """b - a, with a `CONFIDENCE` interval, and whether it excludes zero."""

    delta: float
    low: float
    high: float
    method: str
    p_value: Optional[float] = None

    @property
    def significant(self) -> bool:
        if self.p_value is not None:
            return self.p_value < 1 - CONFIDENCE
        return self.low > 0 or self.high < 0


def mcnemar(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided p-value that models a and b are equally accurate on the same items
    (per-item scores 0 or 1)."""
    only_a = sum(1 for x, y in zip(a, b) if x > y)
    only_b = sum(1 for x, y in zip(a, b) if y > x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], samples: int = BOOTSTRAP_SAMPLES,
                     seed: int = 0) -> Difference:
    """Mean of b - a over paired values with a percentile bootstrap interval."""
    if len(a) != len(b) or not a:
        raise ValueError("paired values must be non-empty and of equal length")
    diffs = [y - x for x, y in zip(a, b)]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo = means[int((1 - CONFIDENCE) / 2 * samples)]
    hi = means[min(samples - 1, int((1 + CONFIDENCE) / 2 * samples))]
    return Difference(sum(diffs) / n, lo, hi, "paired bootstrap")


def paired_items(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Per-item scores of two models on the same items: bootstrap interval of the accuracy
    difference, McNemar's p-value when the scores are 0/1."""
    diff = paired_bootstrap(a, b)
    if all(x in (0.0, 1.0) for x in list(a) + list(b)):
        return Difference(diff.delta, diff.low, diff.high, "McNemar (exact), bootstrap interval", mcnemar(a, b))
    return diff


def unpaired_interval(mean_a: float, se_a: float, mean_b: float, se_b: float) -> Difference:
    """b - a with a normal interval from the two standard errors (no pairing information)."""
    z = 1.959963984540054
    half = z * math.sqrt(se_a ** 2 + se_b ** 2)
    delta = mean_b - mean_a
    return Difference(delta, delta - half, delta + half, "unpaired normal interval")


PERPLEXITY_RATIO = "perplexity ratio"
SPEED_RATIO = "speed-up ratio"  # the winner's speed-up over the teacher / the loser's


def perplexity_ratio(ppl_a: float, nll_a: Sequence[float], ppl_b: float, nll_b: Sequence[float]) -> Difference:
    """b's perplexity over a's: a paired bootstrap over the same blocks (the interval on the mean
    NLL difference, exponentiated), or no interval without per-block data."""
    if nll_a and len(nll_a) == len(nll_b):
        d = paired_bootstrap(nll_a, nll_b)
        return Difference(math.exp(d.delta), math.exp(d.low), math.exp(d.high), "paired bootstrap over blocks")
    return Difference(ppl_b / ppl_a, math.nan, math.nan, "no per-block data: no interval")


def score_differences(a: ModelScores, b: ModelScores) -> list[tuple[str, Difference]]:
    """(metric, b - a) for the held-out perplexity (as a ratio b / a) and every task both were
    scored on: paired over the same blocks and items when both carry per-block / per-item
    scores, else an unpaired interval from the standard errors (or no interval)."""
    out: list[tuple[str, Difference]] = []
    if a.perplexity is not None and b.perplexity is not None:
        out.append((PERPLEXITY_RATIO, perplexity_ratio(a.perplexity, a.block_nll, b.perplexity, b.block_nll)))
    for name, ha in a.more_perplexity.items():
        hb = b.more_perplexity.get(name)
        if hb is not None:
            out.append((f"{PERPLEXITY_RATIO} ({name})",
                        perplexity_ratio(ha.perplexity, ha.block_nll, hb.perplexity, hb.block_nll)))
    for task, sa in a.tasks.items():
        sb = b.tasks.get(task)
        if sb is None:
            continue
        metric = sa.primary
        if sa.per_item and len(sa.per_item) == len(sb.per_item):
            out.append((f"{task} {metric}", paired_items(sa.per_item, sb.per_item)))
        elif metric in sa.stderr and metric in sb.stderr:
            out.append((f"{task} {metric}", unpaired_interval(sa.values[metric], sa.stderr[metric],
                                                              sb.values[metric], sb.stderr[metric])))
    return out


def verdict(metric: str, d: Difference) -> str:
    """'not significant at 95%' unless the interval excludes no change; else which way."""
    if math.isnan(d.low):
        return "no interval"
    if metric.startswith(PERPLEXITY_RATIO):
        if d.low <= 1 <= d.high:
            return "not significant at 95%"
        return "lower perplexity" if d.high < 1 else "higher perplexity"
    if not d.significant:
        return "not significant at 95%"
    return "higher" if d.delta > 0 else "lower"


def format_difference(metric: str, d: Difference) -> str:
    if metric.startswith((PERPLEXITY_RATIO, SPEED_RATIO)):
        return f"x{d.delta:.3f}" + ("" if math.isnan(d.low) else f" [{d.low:.3f}, {d.high:.3f}]")
    text = f"{100 * d.delta:+.1f} pts [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
    return text + (f", p={d.p_value:.3g}" if d.p_value is not None else "")
