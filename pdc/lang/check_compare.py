"""A `compare { variant ... expect ... }` block: each variant checked as a whole spec, and each
`expect A beats B on METRIC` checked against what every variant's evaluation measures."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from pdc.lang import ast
from pdc.lang.check_settings import suggest
from pdc.lang.checked import Comparison, EvaluateStage, Expectation, SPEED_METRICS, VariantSpec
from pdc.lang.diagnostics import Diagnostic, Note
from pdc.lang.variants import apply_variant, describe


def check_comparison(stmt: ast.CompareStmt, base_ast: ast.Spec, diagnostics: list, attempt) -> Optional[Comparison]:
    if len(stmt.variants) < 2:
        diagnostics.append(Diagnostic(f"compare '{stmt.name.value}' needs at least two variants "
                                      "(`variant NAME { ... }`; an empty one is the recipe as written)",
                                      stmt.name.span))
    seen: dict[str, ast.Variant] = {}
    variants = []
    for variant in stmt.variants:
        name = variant.name.value
        if name in seen:
            diagnostics.append(Diagnostic(f"variant '{name}' is declared twice", variant.name.span,
                                          notes=(Note("first declared here", seen[name].name.span),)))
            continue
        seen[name] = variant
        statements, errors = apply_variant(base_ast.statements, variant)
        diagnostics.extend(e for e in errors if e not in diagnostics)
        checked = attempt(replace(base_ast, statements=statements))
        if checked is not None:
            variants.append(VariantSpec(name, tuple(describe(i) for i in variant.items), checked, variant.span))
    expects = tuple(e for e in (check_expectation(x, seen, variants, diagnostics) for x in stmt.expects) if e)
    return Comparison(stmt.name.value, tuple(variants), stmt.span, expects)


def check_expectation(x: ast.Expect, declared: dict, variants: list[VariantSpec], diagnostics: list) -> Optional[Expectation]:
    """The checked claim of `expect A beats B on METRIC`: both variants declared and different,
    and METRIC measured by every variant's evaluation."""
    ok = True
    for side in (x.winner, x.loser):
        if side.value not in declared:
            diagnostics.append(Diagnostic(f"expect names variant '{side.value}', which is not declared"
                                          + suggest(side.value, declared), side.span))
            ok = False
    if ok and x.winner.value == x.loser.value:
        diagnostics.append(Diagnostic(f"expect compares variant '{x.winner.value}' with itself", x.loser.span))
        ok = False
    evaluations = [next((s.eval for s in v.spec.stages if isinstance(s, EvaluateStage)), None) for v in variants]
    measured: dict[str, tuple[Optional[str], Optional[str]]] = {}  # written form -> (task, data)
    if evaluations and all(evaluations):
        tasks = set.intersection(*({t.name for t in e.tasks} for e in evaluations))
        corpora = set.intersection(*(set(e.perplexity_data) for e in evaluations))
        headline = evaluations[0].perplexity_data[0] if evaluations[0].perplexity_data else None
        if headline is not None and all(e.perplexity_data[:1] == (headline,) for e in evaluations):
            measured["perplexity"] = (None, None)
        for d in sorted(corpora):
            measured[f"perplexity({d})"] = (None, None if d == headline else d)
        for t in sorted(tasks):
            measured[t] = (t, None)
        if all(e.speed for e in evaluations):
            measured.update({m: (None, None) for m in SPEED_METRICS})
    m = x.metric
    written = m.value if isinstance(m, ast.Name) else (
        f"{m.name.value}({', '.join(a.value for a in m.args if isinstance(a, ast.Name))})"
        if all(isinstance(a, ast.Name) for a in m.args) else None)
    if written not in measured:
        what = f"'{written}'" if written else "this metric"
        listed = ", ".join(measured) if measured else "nothing (the variants have no common evaluate stage)"
        diagnostics.append(Diagnostic(f"expect on {what}: every variant's evaluation must measure it; they all "
                                      f"measure {listed}", m.span))
        return None
    if not ok:
        return None
    task, data = measured[written]
    return Expectation(x.winner.value, x.loser.value, f"{x.winner.value} beats {x.loser.value} on {written}",
                       task, data, x.span, speed=written if written in SPEED_METRICS else None)
