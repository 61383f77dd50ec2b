"""Checking `prune search { ... }` (the budgets, axes and ranking settings of an architecture
search; see `pdc.lang.search_settings`). Called by the checker for a prune stage of kind
`search`; the budgets' feasibility needs exact parameter counts (torch), so the plan layer
checks it (`pdc.plan.search_plan`) with the spans recorded here."""

from __future__ import annotations

import difflib
from dataclasses import replace
from typing import Any, Optional

from pdc.arch import Arch
from pdc.lang import ast
from pdc.lang.checked import PruneStage
from pdc.lang.diagnostics import Note, Span
from pdc.lang.search_settings import METRICS, SEARCH_AXES, Limit, SearchConfig
from pdc.lang.settings import ImportanceConfig, Saliency

# key -> (type, lower bound, upper bound); bounds inclusive
NUMERIC = {"keep": (float, 0.0, 1.0), "slack": (float, 0.0, 1.0), "top": (int, 1, None), "steps": (int, 0, None),
           "samples": (int, 1, None), "check_rtol": (float, 0.0, None), "check_atol": (float, 0.0, None)}
DELEGATED = ("importance", "saliency", "data")  # read by the checker's own readers


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _number(v: ast.Value, key: str, kind, lo, hi, error) -> Optional[Any]:
    if not isinstance(v, ast.Number) or (kind is int and not isinstance(v.value, int)):
        error(f"{key} must be {'an integer' if kind is int else 'a number'}", v.span)
        return None
    if (lo is not None and v.value < lo) or (hi is not None and v.value > hi) or (key == "keep" and v.value <= 0):
        rng = f"{'(' if key == 'keep' else ''}{lo}..{hi if hi is not None else ''}"
        error(f"{key}={v.text or v.value} is out of range {rng}", v.span)
        return None
    return kind(v.value)


def read_limit(item: ast.Limit, error) -> Optional[Limit]:
    """`params<=0.85x`, `memory(batch=1, context=4096)<=400M`, `latency(decode, batch=1)<=0.9x`."""
    m = item.metric
    name = m.value if isinstance(m, ast.Name) else m.name.value
    if name not in METRICS:
        error(f"unknown budget '{name}': expected one of {', '.join(METRICS)}" + _suggest(name, METRICS), m.span)
        return None
    v = item.value
    if not isinstance(v, ast.Number) or v.value <= 0:
        error(f"{name}<=: the budget must be a positive number (absolute, or relative to the source: 0.85x)",
              v.span)
        return None
    relative = v.text.endswith("x")
    if name == "params" and isinstance(m, ast.Call):
        error("params takes no arguments: params<=0.85x", m.span)
        return None
    kw: dict = {}
    if isinstance(m, ast.Call):
        allowed = {"memory": ("batch", "context"), "latency": ("batch", "context")}[name]
        pos = m.positional
        if name == "latency" and pos:
            mode = pos[0].value if isinstance(pos[0], ast.Name) else None
            if mode not in ("decode", "prefill") or len(pos) > 1:
                error("latency(MODE, ...): MODE is decode or prefill", pos[0].span)
                return None
            kw["mode"] = mode
        elif pos:
            error(f"{name}(...) takes keyword arguments: {', '.join(a + '=' for a in allowed)}", pos[0].span)
            return None
        for k in m.keywords:
            if k.key.value not in allowed:
                error(f"unknown argument '{k.key.value}' of {name}(...): expected {', '.join(allowed)}", k.key.span)
                return None
            got = _number(k.value, k.key.value, int, 1, None, error)
            if got is None:
                return None
            kw[k.key.value] = got
    if name == "params" and not relative and v.value < 1000:
        error(f"params<={v.text}: an absolute parameter count (write 0.85x for a share of the source)", v.span)
        return None
    return Limit(name, float(v.value), relative, **kw)


def read_axes(call: ast.Call, arch: Arch, error) -> tuple[tuple[str, int], ...]:
    """`axes(hidden=72, mlp=128, heads=3, depth=2)`: each axis and its step; a bare axis takes
    an eighth of the source's size as its step (depth: 2 layers, heads: one per kv group)."""
    source = {"hidden": arch.hidden, "mlp": arch.mlp, "heads": arch.heads, "depth": arch.layers}
    default = {"hidden": max(1, arch.hidden // 8), "mlp": max(1, arch.mlp // 8), "heads": arch.kv_heads, "depth": 2}
    out: dict[str, int] = {}
    for a in call.args:
        key, value = (a.key, a.value) if isinstance(a, ast.Kwarg) else (a, None)
        if not isinstance(key, ast.Name) or key.value not in SEARCH_AXES:
            word = key.value if isinstance(key, ast.Name) else "?"
            error(f"unknown search axis '{word}': expected {', '.join(SEARCH_AXES)}" + _suggest(word, SEARCH_AXES),
                  key.span)
            continue
        if key.value in out:
            error(f"axis '{key.value}' given twice", key.span)
            continue
        step = default[key.value] if value is None else _number(value, key.value, int, 1, None, error)
        if step is None:
            continue
        if step >= source[key.value]:
            error(f"{key.value} step {step} is not below the source's {source[key.value]}", (value or key).span)
            continue
        if key.value == "heads" and step % arch.kv_heads:
            error(f"heads step {step} must be a multiple of the kv heads ({arch.kv_heads}): query heads stay "
                  "grouped", (value or key).span)
            continue
        out[key.value] = step
    return tuple((a, out[a]) for a in SEARCH_AXES if a in out)


def check_search(checker, st: ast.PruneStmt, arch: Optional[Arch], default_data: Optional[str],
                 source_note: Note) -> Optional[PruneStage]:
    error = checker.error
    limits: list[tuple[Limit, Span]] = []
    axes, axes_span, hand = None, None, []
    for item in st.block.items:
        if isinstance(item, ast.Limit):
            lim = read_limit(item, error)
            if lim is None:
                continue
            same = next((s for l, s in limits if l.metric == lim.metric), None)
            if same is not None:
                error(f"budget '{lim.metric}' given twice", item.span, Note("first given here", same))
                continue
            limits.append((lim, item.span))
        elif isinstance(item, ast.Entry):
            v = item.value
            name = v.value if isinstance(v, ast.Name) else v.name.value
            if name == "axes" and isinstance(v, ast.Call) and arch is not None:
                axes, axes_span = read_axes(v, arch, error), v.span
            elif name == "mark" and isinstance(v, ast.Call):
                hand.append(v)
            elif name not in ("axes", "mark"):
                error(f"unexpected entry '{name}' in prune search: budgets (params<=...), axes(...), mark(...) "
                      "and key=value settings", item.span)
    numeric: dict = {}
    spans: dict = {}
    delegated = []
    for s in st.block.settings:
        key = s.key.value
        if key in DELEGATED:
            delegated.append(s)
        elif key in NUMERIC:
            if key in numeric:
                error(f"duplicate key '{key}' in prune search", s.key.span)
                continue
            got = _number(s.value, key, *NUMERIC[key], error)
            if got is not None:
                numeric[key], spans[key] = got, s.span
        else:
            error(f"unknown key '{key}' in prune search" + (_suggest(key, list(NUMERIC) + list(DELEGATED))
                                                           or f" (known: {', '.join(sorted(list(NUMERIC) + list(DELEGATED)))})"),
                  s.key.span)
    got = checker.settings(delegated, {"importance": checker.importance, "saliency": checker.saliency,
                                       "data": checker.data_reader()}, "prune search")
    if not any(isinstance(i, ast.Limit) for i in st.block.items):
        error("prune search needs a budget: params<=0.85x, memory(batch=1, context=4096)<=..., "
              "latency(decode, batch=1)<=...", _head(st))
    if axes is None and arch is not None:
        error("prune search needs axes(...): the axes searched and their steps, e.g. "
              "axes(hidden=64, mlp=128, heads=3, depth=2)", _head(st))
    if arch is None or axes is None or not limits:  # reported
        return None
    importance, imp_data = got.get("importance", ((ImportanceConfig(), None), None))[0]
    saliency = got.get("saliency", (Saliency(),))[0]
    data = imp_data or got.get("data", (None,))[0] or default_data
    if data is None:
        error("prune search needs calibration data: declare `data NAME = ...`", _head(st))
        return None
    if saliency.kind == "task":
        error("prune search orders layers by loss or cosine saliency (task saliency scores each candidate "
              "on the task: too slow for a search)", got["saliency"][1].span)
        return None
    saliency = replace(saliency, data=saliency.data or data)
    marks = tuple(_mark(c, error) for c in hand)
    cfg = SearchConfig(tuple(l for l, _ in limits), axes, importance=importance, saliency=saliency,
                       hand=tuple(m for m in marks if m is not None),
                       **{k: v for k, v in numeric.items() if not k.startswith("check_")})
    spans.update({f"limit:{l.metric}": s for l, s in limits}, axes=axes_span)
    tol = (numeric.get("check_rtol"), numeric.get("check_atol"))
    return PruneStage("search", None, None, importance, data, arch, arch, span=st.span, check_tolerance=tol,
                      setting_spans=spans, search=cfg)


def _mark(call: ast.Call, error):
    """`mark(NAME, mlp=1152, ...)`: a hand-written recipe's sizes, drawn on the Pareto plot."""
    pos = call.positional
    if len(pos) != 1 or not isinstance(pos[0], ast.Name):
        error("mark(NAME, axis=size, ...): one name, then the recipe's sizes", call.span)
        return None
    sizes = []
    for k in call.keywords:
        if k.key.value not in SEARCH_AXES:
            error(f"unknown axis '{k.key.value}' in mark(...): expected {', '.join(SEARCH_AXES)}", k.key.span)
            return None
        size = _number(k.value, k.key.value, int, 1, None, error)
        if size is None:
            return None
        sizes.append((k.key.value, size))
    return (pos[0].value, tuple(sizes))


def _head(st) -> Span:
    s = st.span
    return Span(s.file, s.line, s.col, s.line, s.col + len("prune"))
