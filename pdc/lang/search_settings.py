"""The settings of `prune search`: budgets, the axes searched and how candidates are ranked.

    prune search {
      params<=0.85x  memory(batch=1, context=4096)<=400M  latency(decode, batch=1)<=0.9x
      axes(hidden=64, mlp=128, heads=3, depth=2)   # the axes searched and each one's step
      keep=0.5 slack=0.03 top=3 steps=20
      importance=activation(samples=16, seq_len=256)  saliency=loss(samples=8)
    }

Candidates are every combination of each axis cut down in its steps to `keep` of the source;
those within every budget and using at least `1 - slack` of the parameter budget are scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from pdc.lang.settings import ImportanceConfig, Saliency

SEARCH_AXES = ("hidden", "mlp", "heads", "depth")
METRICS = ("params", "memory", "latency")


@dataclass(frozen=True)
class Limit:
    """`metric<=value`. `relative`: value is a factor of the source's figure. Units: params a
    count, memory bytes (weights + KV cache at `batch` x `context`), latency seconds per token
    (decode) or per prompt of `context` tokens (prefill)."""

    metric: Literal["params", "memory", "latency"]
    value: float
    relative: bool
    batch: int = 1
    context: int = 4096
    mode: Literal["decode", "prefill"] = "decode"

    def describe(self, value: Optional[str] = None) -> str:
        """As written (`value` replaces the budget's value)."""
        if value is None:
            value = f"{self.value:g}x" if self.relative else f"{self.value:,.0f}" if self.metric != "latency" else f"{self.value:g}"
        if self.metric == "memory":
            return f"memory(batch={self.batch}, context={self.context})<={value}"
        if self.metric == "latency":
            return f"latency({self.mode}, batch={self.batch})<={value}"
        return f"params<={value}"


@dataclass(frozen=True)
class SearchConfig:
    limits: tuple[Limit, ...]
    axes: tuple[tuple[str, int], ...]  # (axis, step) in SEARCH_AXES order
    keep: float = 0.5  # smallest fraction of each axis a candidate keeps
    slack: float = 0.03  # candidates use at least 1 - slack of the parameter budget
    top: int = 3  # candidates ranked by short distillation
    steps: int = 20  # distillation steps per top candidate
    samples: int = 8  # calibration blocks of the cheap score (LM loss without training)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    saliency: Saliency = field(default_factory=Saliency)  # orders layers for depth cuts
    hand: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()  # recipes marked on the plot

    def step(self, axis: str) -> Optional[int]:
        return dict(self.axes).get(axis)

    def limit(self, metric: str) -> Optional[Limit]:
        return next((l for l in self.limits if l.metric == metric), None)
