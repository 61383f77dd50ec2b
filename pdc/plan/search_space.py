"""The search space of `prune search`: candidates, their exact sizes, the budgets they meet.

Each candidate is a combination of axis sizes (hidden, mlp, query heads, depth), every axis cut
in its step from the source down to `keep` of it. Its parameter count is exact: the config pdc
would emit, instantiated on the meta device (`pdc.plan.counts`; a config transformers refuses is
no candidate). Its memory is that of inference in bf16: 2 bytes per counted parameter plus the
KV cache at the limit's batch and context, 2 x layers x kv_heads x head_dim x tokens x 2 bytes,
read from the candidate's config. Latency limits need measurements (`pdc.stages.search_latency`)
and are checked when the stage runs; `latency_of` passes them in.

Of the candidates within every budget, those using at least `1 - slack` of the largest
feasible parameter count are ranked (a much smaller model only wastes the budget).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from pdc.arch import Arch
from pdc.lang.search_settings import SEARCH_AXES, Limit, SearchConfig
from pdc.plan.counts import ConfigError, count_arch, representable

KV_BYTES = 2  # bf16 cache entries
WEIGHT_BYTES = 2  # bf16 weights


@dataclass
class Candidate:
    sizes: dict  # axis -> size (hidden, mlp, heads, depth)
    arch: Arch
    params: int
    memory: dict = field(default_factory=dict)  # limit description -> bytes
    latency: Optional[float] = None  # predicted seconds (set once measured)

    @property
    def label(self) -> str:
        return " ".join(f"{a}={self.sizes[a]}" for a in SEARCH_AXES)


def arch_of(source: Arch, sizes: dict) -> Arch:
    return source.with_sizes(hidden=sizes["hidden"], mlp=sizes["mlp"], heads=sizes["heads"], layers=sizes["depth"])


def source_sizes(source: Arch) -> dict:
    return {"hidden": source.hidden, "mlp": source.mlp, "heads": source.heads, "depth": source.layers}


def axis_values(source: Arch, cfg: SearchConfig) -> dict[str, list[int]]:
    """Each axis's sizes, largest first; an axis not searched keeps the source's size. Query
    heads stay a multiple of the kv heads (GQA groups keep their kv head)."""
    full = source_sizes(source)
    out = {}
    for axis in SEARCH_AXES:
        step = cfg.step(axis)
        if step is None:
            out[axis] = [full[axis]]
            continue
        low = max(1, math.ceil(cfg.keep * full[axis]))
        values = list(range(full[axis], low - 1, -step))
        if axis == "heads":
            values = [v for v in values if v % source.kv_heads == 0]
        out[axis] = values
    return out


def space_size(source: Arch, cfg: SearchConfig) -> int:
    return math.prod(len(v) for v in axis_values(source, cfg).values())


def kv_cache_bytes(arch: Arch, batch: int, context: int) -> int:
    return 2 * arch.layers * arch.kv_heads * arch.head_dim * batch * context * KV_BYTES


def memory_bytes(arch: Arch, params: int, limit: Limit) -> int:
    return params * WEIGHT_BYTES + kv_cache_bytes(arch, limit.batch, limit.context)


def _depth_counter(source_cfg: dict, arch: Arch) -> Callable[[int], int]:
    """Exact parameter count of `arch` at any depth. Instantiating hundreds of full models on
    the meta device takes minutes, so the models of 1, 2 and 3 layers are built: when each layer
    adds the same count (checked: 3 - 2 == 2 - 1), depth d has count(1) + (d - 1) x that, which
    is what the full model counts; otherwise every depth is built."""
    c1, c2, c3 = (count_arch(source_cfg, arch.with_sizes(layers=n)).total for n in (1, 2, 3))
    if c3 - c2 == c2 - c1:
        return lambda d: c1 + (d - 1) * (c2 - c1)
    return lambda d: count_arch(source_cfg, arch.with_sizes(layers=d)).total


def candidates(source_cfg: dict, source: Arch, cfg: SearchConfig,
               rejected: Optional[dict] = None) -> list[Candidate]:
    """Every representable combination, with exact counts and the memory of each memory limit.
    `rejected` collects why a width combination is no candidate (its first reason, and how many)."""
    values = axis_values(source, cfg)
    out = []
    widths = [a for a in SEARCH_AXES if a != "depth"]
    for combo in itertools.product(*(values[a] for a in widths)):
        sized = dict(zip(widths, combo))
        arch = arch_of(source, dict(sized, depth=source.layers))
        why = representable(source_cfg, arch)
        if why is None:
            try:
                params_at = _depth_counter(source_cfg, arch)
            except ConfigError as exc:
                why = exc.message
        if why is not None:
            if rejected is not None:
                rejected.setdefault(why, 0)
                rejected[why] += len(values["depth"])
            continue
        for depth in values["depth"]:
            out.append(_candidate(dict(sized, depth=depth), arch.with_sizes(layers=depth), params_at(depth), cfg))
    return out


def _candidate(sizes: dict, arch: Arch, params: int, cfg: SearchConfig) -> Candidate:
    cand = Candidate(sizes, arch, params)
    cand.memory = {l.describe(): memory_bytes(arch, params, l) for l in cfg.limits if l.metric == "memory"}
    return cand


def bound(limit: Limit, source_value: float) -> float:
    """The limit's absolute value (a relative limit times the source's figure)."""
    return limit.value * source_value if limit.relative else limit.value


def source_figures(source_cfg: dict, source: Arch, cfg: SearchConfig,
                   source_latency: Optional[float] = None) -> dict[str, float]:
    """The source's figure per limit (what a relative limit multiplies)."""
    params = count_arch(source_cfg, source).total
    out = {}
    for l in cfg.limits:
        if l.metric == "params":
            out[l.describe()] = params
        elif l.metric == "memory":
            out[l.describe()] = memory_bytes(source, params, l)
        elif source_latency is not None:
            out[l.describe()] = source_latency
    return out


def value_of(cand: Candidate, limit: Limit) -> Optional[float]:
    if limit.metric == "params":
        return cand.params
    if limit.metric == "memory":
        return cand.memory[limit.describe()]
    return cand.latency


def feasible(cands: list[Candidate], cfg: SearchConfig, figures: dict[str, float]) -> list[Candidate]:
    """Candidates within every limit whose value is known (latency: once predicted)."""
    def ok(c: Candidate) -> bool:
        for l in cfg.limits:
            v = value_of(c, l)
            if v is not None and l.describe() in figures and v > bound(l, figures[l.describe()]):
                return False
        return True
    return [c for c in cands if ok(c)]


def band(feasible_cands: list[Candidate], cfg: SearchConfig) -> list[Candidate]:
    """The feasible candidates using at least 1 - slack of the largest feasible parameter count,
    largest first (ties: wider before deeper cuts, a stable order)."""
    if not feasible_cands:
        return []
    top = max(c.params for c in feasible_cands)
    kept = [c for c in feasible_cands if c.params >= (1 - cfg.slack) * top]
    return sorted(kept, key=lambda c: (-c.params, c.label))


def nearest_feasible(cands: list[Candidate], cfg: SearchConfig, figures: dict[str, float],
                     limit: Limit) -> Optional[str]:
    """The tightest value of `limit` that some candidate meets, given the other limits: what to
    write instead of a budget nothing meets."""
    others = SearchConfig(**{**cfg.__dict__, "limits": tuple(l for l in cfg.limits if l is not limit)})
    pool = feasible(cands, others, figures)
    values = [value_of(c, limit) for c in pool if value_of(c, limit) is not None]
    if not values:
        return None
    best = min(values)
    ref = figures.get(limit.describe())
    if limit.relative and ref:
        return f"{math.ceil(best / ref * 1000) / 1000:g}x"
    return f"{best:,.0f}" if limit.metric != "latency" else f"{best:.4g}"


@dataclass
class SpacePlan:
    size: int  # combinations of axis sizes
    representable: int
    rejected: dict  # reason -> combinations the emitted config cannot hold
    feasible: int
    ranked: list[Candidate]  # the band, largest first
    figures: dict
    latency_pending: bool  # a latency limit waits for measurements


def plan_space(source_cfg: dict, source: Arch, cfg: SearchConfig,
               latency_of: Optional[Callable[[Arch], float]] = None,
               source_latency: Optional[float] = None) -> tuple[SpacePlan, list[Candidate]]:
    rejected: dict = {}
    cands = candidates(source_cfg, source, cfg, rejected)
    if latency_of is not None:
        for c in cands:
            c.latency = latency_of(c.arch)
    figures = source_figures(source_cfg, source, cfg, source_latency)
    ok = feasible(cands, cfg, figures)
    pending = cfg.limit("latency") is not None and latency_of is None
    return SpacePlan(space_size(source, cfg), len(cands), rejected, len(ok), band(ok, cfg), figures, pending), cands


def ranking_cost(cfg: SearchConfig, n_ranked: int, seq_len: int, tokens_per_step: int) -> dict:
    """Tokens each ranking stage reads: the cheap score runs every ranked candidate forward over
    the calibration blocks; the short distillation trains the top K for `steps` each, from one
    cached teacher pass over the blocks they read (the same blocks for every student)."""
    top = min(cfg.top, n_ranked)
    return {
        "cheap_forward_tokens": n_ranked * cfg.samples * seq_len,
        "distill_students": top,
        "distill_steps": top * cfg.steps,
        "distill_tokens": top * cfg.steps * tokens_per_step,
        "teacher_pass_tokens": cfg.steps * tokens_per_step,
    }
