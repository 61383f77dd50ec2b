"""The dry run of `prune search`: the size of the space, the candidates within the budgets, the
cost of ranking them; budgets no candidate meets are spec errors naming the nearest feasible one.
"""

from __future__ import annotations

from typing import Any, Optional

from pdc.lang.checked import CheckedSpec, DistillStage, PruneStage
from pdc.lang.diagnostics import DiagnosticSink
from pdc.plan.search_space import bound, nearest_feasible, plan_space, ranking_cost, value_of


def short_distill_stage(spec: CheckedSpec, st: PruneStage) -> Optional[DistillStage]:
    """The distillation after the search: its settings train the top candidates briefly."""
    after = spec.stages[spec.stages.index(st) + 1:]
    return next((s for s in after if isinstance(s, DistillStage)), None)


def search_entry(spec: CheckedSpec, st: PruneStage) -> dict[str, Any]:
    """The plan entry of a search stage; `SpecError` at the budget nothing meets, or at `steps`
    when there is no distillation to rank by."""
    cfg = st.search
    source = st.source_arch or spec.source_arch
    sink = DiagnosticSink(spec.text)
    space, cands = plan_space(spec.source_config, source, cfg)
    if not space.ranked:
        for limit in cfg.limits:
            if limit.metric == "latency":
                continue
            alone = [c for c in cands if _meets(c, limit, space.figures)]
            if alone:
                continue
            nearest = nearest_feasible(cands, cfg, space.figures, limit)
            hint = f"; the nearest feasible budget is {limit.describe(nearest)}" if nearest else ""
            sink.error(f"no candidate of the {space.representable} shapes meets {limit.describe()}{hint} "
                       f"(or search smaller sizes: keep={cfg.keep:g})", st.setting_spans.get(f"limit:{limit.metric}", st.span))
        if not sink.diagnostics:  # each budget alone is met, not all together
            sink.error(f"no candidate of the {space.representable} shapes meets all budgets together "
                       f"({', '.join(l.describe() for l in cfg.limits)})", st.span)
    distill = short_distill_stage(spec, st)
    if distill is None and cfg.steps > 0:
        sink.error("ranking by short distillation needs a distill stage after the search (or steps=0: rank by "
                   "LM loss alone)", st.setting_spans.get("steps", st.span))
    sink.raise_if_errors()
    seq_len = distill.train.seq_len if distill else st.importance.seq_len
    per_step = distill.train.global_batch * distill.train.seq_len if distill else 0
    return {
        "axes": dict(cfg.axes), "keep": cfg.keep, "slack": cfg.slack,
        "limits": [l.describe() for l in cfg.limits],
        "space_size": space.size, "representable": space.representable,
        "rejected": space.rejected, "feasible": space.feasible, "ranked": len(space.ranked),
        "latency_pending": space.latency_pending,
        "candidates": [{"sizes": c.sizes, "params": c.params} for c in space.ranked],
        "cost": ranking_cost(cfg, len(space.ranked), seq_len, per_step),
        "cache_k": distill.train.cache_k if distill else None,
    }


def _meets(cand, limit, figures) -> bool:
    v = value_of(cand, limit)
    return v is None or v <= bound(limit, figures[limit.describe()])


def render_search(st: dict[str, Any]) -> list[str]:
    s = st["search"]
    cost = s["cost"]
    out = [f"    search: {', '.join(s['limits'])}; axes "
           + " ".join(f"{a} (step {v})" for a, v in s["axes"].items()) + f", each kept to >= {s['keep']:g}",
           f"    space: {s['space_size']:,} shapes, {s['representable']:,} representable, {s['feasible']:,} within "
           f"the budgets, {s['ranked']} within {s['slack']:g} of the largest ranked"
           + ("; the latency budget is checked when measured (run time)" if s["latency_pending"] else "")]
    for why, n in s["rejected"].items():
        out.append(f"    {n:,} shapes the emitted config cannot hold: {why}")
    for c in s["candidates"][:12]:
        out.append(f"      {' '.join(f'{k}={v}' for k, v in c['sizes'].items())}  {c['params']:,} params")
    if len(s["candidates"]) > 12:
        out.append(f"      ... {len(s['candidates']) - 12} more")
    cheap = f"    ranking cost: LM loss of {s['ranked']} candidates ({cost['cheap_forward_tokens']:,} forward tokens)"
    if not cost["distill_steps"]:  # steps=0: the cheap score decides
        out.append(cheap + "; no distillation ranks them (steps=0): the lowest loss is chosen")
        return out
    out.append(f"{cheap}, then the top {cost['distill_students']} distilled {cost['distill_steps'] // max(1, cost['distill_students'])} "
               f"steps each ({cost['distill_steps']} steps, {cost['distill_tokens']:,} tokens)"
               + (f" from one cached teacher pass ({cost['teacher_pass_tokens']:,} tokens, k={s['cache_k']})"
                  if s["cache_k"] else " with the teacher online"))
    return out
