"""Latency of candidate shapes: measure a few, fit per-layer costs, predict the rest.

A decode step (or a prefill) of a decoder costs a fixed part (embedding, output head: ~ hidden x
vocab) plus, per layer, attention ~ hidden x heads x head_dim, MLP ~ hidden x mlp and a per-layer
overhead (norms, kernel launches). `fit_latency` measures the source and the corners of the
search space (random weights: speed does not depend on values) and fits those five costs by
non-negative least squares; `LatencyFit.check` measures the chosen shape and reports how far the
prediction was (and the fit's leave-one-out error on the measured shapes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from statistics import median

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from pdc.arch import Arch
from pdc.lang.search_settings import Limit, SearchConfig
from pdc.plan.counts import hf_config
from pdc.plan.search_space import axis_values


def features(arch: Arch) -> list[float]:
    per_layer_attn = arch.hidden * arch.heads * arch.head_dim
    return [1.0, float(arch.hidden * arch.vocab), float(arch.layers * per_layer_attn),
            float(arch.layers * arch.hidden * arch.mlp), float(arch.layers)]


@torch.no_grad()
def _constant_model(config):
    """The model of `config` with every weight and buffer a small constant: random
    initialisation of a 135M model takes longer than timing it, and speed does not depend on
    the values (a constant has no denormals)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    for t in list(model.parameters()) + list(model.buffers()):
        t.fill_(0.01)
    return model.eval()


@torch.no_grad()
def measure(source_cfg: dict, arch: Arch, limit: Limit, repeats: int = 5, tokens: int = 16,
            prompt: int = 32, threads: int | None = None) -> float:
    """Median seconds per decoded token (mode decode) or per prefill of `limit.context` tokens,
    at `limit.batch`, of a randomly initialised model of shape `arch` on this CPU."""
    if threads:
        torch.set_num_threads(threads)
    model = _constant_model(hf_config(arch.to_hf_config(source_cfg)))
    ids = torch.randint(0, arch.vocab, (limit.batch, prompt if limit.mode == "decode" else limit.context))
    times = []
    for _ in range(repeats + 1):  # the first run warms the allocator up
        start = time.perf_counter()
        if limit.mode == "prefill":
            model(input_ids=ids, use_cache=False)
            times.append(time.perf_counter() - start)
            continue
        out = model(input_ids=ids, use_cache=True)
        past, nxt = out.past_key_values, ids[:, -1:]
        start = time.perf_counter()
        for _ in range(tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
        times.append((time.perf_counter() - start) / tokens)
    return median(times[1:])


def _nnls(rows: list[list[float]], ys: list[float]) -> list[float]:
    """Non-negative least squares (columns scaled; few unknowns: active-set by exhaustion)."""
    x = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    scale = x.abs().max(0).values.clamp_min(1e-12)
    xs = x / scale
    best, best_err = torch.zeros(x.shape[1], dtype=torch.float64), float("inf")
    n = x.shape[1]
    for mask in range(1, 1 << n):
        cols = [i for i in range(n) if mask >> i & 1]
        sol = torch.linalg.lstsq(xs[:, cols], y.unsqueeze(1)).solution.squeeze(1)
        if (sol < 0).any():
            continue
        err = float(((xs[:, cols] @ sol - y) ** 2).sum())
        if err < best_err - 1e-18:
            best_err, best = err, torch.zeros(n, dtype=torch.float64)
            best[cols] = sol
    return (best / scale).tolist()


@dataclass
class LatencyFit:
    limit: Limit
    coef: list[float]
    measured: list[dict] = field(default_factory=list)  # {"sizes", "seconds", "predicted", "loo"}
    check: dict | None = None  # the chosen shape: measured against predicted

    def predict(self, arch: Arch) -> float:
        return sum(c * f for c, f in zip(self.coef, features(arch)))

    def to_json(self) -> dict:
        return {"mode": self.limit.mode, "batch": self.limit.batch, "context": self.limit.context,
                "coef": self.coef, "measured": self.measured, "check": self.check,
                "measured_on": "this CPU, randomly initialised weights"}


def fit_latency(source_cfg: dict, source: Arch, limit: Limit, shapes: list[Arch], **kw) -> LatencyFit:
    """Measure `shapes` (the source first) and fit the five costs; records each shape's
    leave-one-out prediction error."""
    secs = [measure(source_cfg, a, limit, **kw) for a in tqdm(shapes, desc="latency of the measured shapes")]
    rows = [features(a) for a in shapes]
    fit = LatencyFit(limit, _nnls(rows, secs))
    for i, (a, s) in enumerate(zip(shapes, secs)):
        loo = _nnls(rows[:i] + rows[i + 1:], secs[:i] + secs[i + 1:]) if len(shapes) > len(rows[0]) else None
        fit.measured.append({"sizes": a.sizes(), "seconds": s, "predicted": fit.predict(a),
                             "loo_predicted": None if loo is None else sum(c * f for c, f in zip(loo, features(a)))})
    return fit


def corner_shapes(source: Arch, cfg: SearchConfig) -> list[Arch]:
    """The shapes measured: the source, each searched axis alone at its smallest, every axis at
    its middle, every axis at its smallest (seven at most; the fit has five costs)."""
    values = axis_values(source, cfg)
    lo = {a: v[-1] for a, v in values.items()}
    mid = {a: v[len(v) // 2] for a, v in values.items()}
    as_arch = lambda s: source.with_sizes(hidden=s.get("hidden"), mlp=s.get("mlp"), heads=s.get("heads"),
                                          layers=s.get("depth"))
    shapes = [source] + [as_arch({a: lo[a]}) for a, _ in cfg.axes] + [as_arch(mid), as_arch(lo)]
    unique = []
    for s in shapes:
        if s not in unique:
            unique.append(s)
    return unique


def check_chosen(fit: LatencyFit, source_cfg: dict, arch: Arch, **kw) -> dict:
    seconds = measure(source_cfg, arch, fit.limit, **kw)
    predicted = fit.predict(arch)
    fit.check = {"sizes": arch.sizes(), "seconds": seconds, "predicted": predicted,
                 "error": predicted / seconds - 1}
    return fit.check
