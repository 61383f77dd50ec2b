"""The comparison report: every variant of a `compare` block side by side, with intervals.

`write_comparison_report(build_dir, comparison)` reads the typed records of each variant's build
(`<build>/<variant>/<stage>/stage.json`) and writes `comparison.md` and `comparison.html`
(self-contained) plus its plots:

- a table of what each variant changed and what it produced (parameters, the distillation's
  validation losses, the final model's held-out perplexity and task scores with standard errors);
- the difference of every variant's final model to the first variant's, with a 95% interval and
  a verdict: per-item scores on the same task items are compared paired (McNemar for 0/1 scores,
  paired bootstrap for the interval), held-out perplexity by a paired bootstrap over the same
  blocks; only when per-item data are missing, an unpaired interval from the standard errors.
  A difference whose interval includes zero is reported as not significant, not ranked;
- for the variants that prune depth, the metric of every removed candidate in a table and the
  candidates that cost the most and the least;
- plots: the distillation curves of all variants on one axis, the final scores with error bars,
  and the depth-saliency curves of the variants that prune depth.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from pdc.errors import PdcError
from pdc.files import write_text
from pdc.lang.checked import Comparison, Expectation
from pdc.plan.results import (
    MODEL_COLUMNS,
    EvaluateResult,
    ModelScores,
    PruneResult,
    SaliencyResult,
    StageRecord,
    TrainResult,
    read_record,
)
from pdc.plotting import pyplot, save_figure
from pdc.runner.report import format_number, read_log_records, speed_section
from pdc.runner.report_doc import Doc, render_html, render_markdown
from pdc.runner.speed_table import paired_ratio, read_speed, speedup_ratio, variant_student
from pdc.runner.stats import PERPLEXITY_RATIO, SPEED_RATIO, Difference, format_difference, score_differences, verdict

STAGE = "report"
LOSSES_PNG = "comparison_losses.png"
SCORES_PNG = "comparison_scores.png"
SALIENCY_PNG = "comparison_saliency.png"


class Variant:
    """The records of one variant's build."""

    def __init__(self, name: str, changes: tuple[str, ...], out: Path):
        self.name, self.changes, self.out = name, changes, out
        self.records: dict[str, StageRecord] = {}
        if out.is_dir():
            for path in sorted(out.iterdir()):
                if path.is_dir() and not path.name.endswith((".tmp", ".work")):
                    try:
                        rec = read_record(path)
                    except PdcError:
                        continue  # the variant's own report names the unreadable record
                    if rec is not None:
                        self.records[path.name] = rec

    def result(self, kind: str):
        recs = [r for r in self.records.values() if r.kind == kind]
        return recs[-1].result if recs else None

    @property
    def final(self) -> Optional[tuple[str, ModelScores]]:
        """The last model column this variant evaluated (distilled, else pruned, ...)."""
        ev: Optional[EvaluateResult] = self.result("evaluate")
        if ev is None:
            return None
        for column in reversed(MODEL_COLUMNS):
            if column in ev.models:
                return column, ev.models[column]
        return None


def _fmt_score(value: Optional[float], se: Optional[float], percent: bool) -> str:
    if value is None:
        return "-"
    scale = 100 if percent else 1
    text = f"{scale * value:.1f}" if percent else format_number(value)
    return text + (f" ± {scale * se:.1f}" if se is not None and percent else "")


def _task_names(variants: list[Variant]) -> list[str]:
    names: list[str] = []
    for v in variants:
        if v.final:
            names += [t for t in v.final[1].tasks if t not in names]
    return names


def _val_kl(distill: Optional[TrainResult]) -> str:
    """The held-out KL at the end; from a teacher cache it is the bucketed KL (top k + tail, a
    lower bound of the full one), so it says so rather than sit beside full KLs unmarked."""
    if distill is None or distill.val_kl_end is None:
        return "-"
    if distill.teacher_placement == "cached":
        return f"{format_number(distill.val_kl_end)} (top {distill.cache_k} + tail)"
    return format_number(distill.val_kl_end)


def _domains(variants: list[Variant]) -> list[str]:
    """The held-out corpora the variants measured (the first is `ModelScores.perplexity`)."""
    for v in variants:
        ev: Optional[EvaluateResult] = v.result("evaluate")
        if ev is not None and ev.perplexity_data:
            return list(ev.perplexity_data)
    return []


def _perplexities(final: ModelScores, domains: list[str]) -> list[tuple[str, Optional[float]]]:
    """(corpus, perplexity) of a final model on each held-out corpus."""
    if not domains:
        return [("held-out", final.perplexity)]
    more = final.more_perplexity
    return [(domains[0], final.perplexity)] + [(d, more[d].perplexity if d in more else None) for d in domains[1:]]


def _summary_table(doc: Doc, variants: list[Variant]) -> None:
    tasks = _task_names(variants)
    domains = _domains(variants)
    header = ["variant", "changes", "params", "distill val loss", "val KL", "final model"]
    header += [f"perplexity ({d})" for d in domains] if len(domains) > 1 else ["perplexity"]
    header += [f"{t} % (± se)" for t in tasks]
    rows = []
    for v in variants:
        prune: Optional[PruneResult] = v.result("prune")
        distill: Optional[TrainResult] = v.result("distill")
        final = v.final
        row = [v.name, "; ".join(v.changes) or "(as written)",
               f"{prune.params_after:,}" if prune else "-",
               f"{format_number(distill.val_loss_start)} -> {format_number(distill.val_loss_end)}" if distill else "-",
               _val_kl(distill),
               final[0] if final else "-"]
        row += [format_number(p) if p is not None else "-" for _, p in _perplexities(final[1], domains)] if final \
            else ["-"] * max(1, len(domains))
        for t in tasks:
            score = final[1].tasks.get(t) if final else None
            row.append(_fmt_score(score.values.get(score.primary), score.stderr.get(score.primary), True)
                       if score else "-")
        rows.append(row)
    doc.table(header, rows, align="ll" + "r" * (len(header) - 2))


def differences(reference: Variant, other: Variant) -> list[tuple[str, Difference]]:
    """(metric, other - reference) between the two variants' final models."""
    if not reference.final or not other.final:
        return []
    return score_differences(reference.final[1], other.final[1])


def _differences_table(doc: Doc, variants: list[Variant]) -> None:
    reference = variants[0]
    rows = []
    for v in variants[1:]:
        for metric, d in differences(reference, v):
            rows.append([v.name, metric, format_difference(metric, d), d.method, verdict(metric, d)])
    if rows:
        doc.p(f"Each variant's final model against `{reference.name}`'s (95% intervals):")
        doc.table(["variant", "metric", f"difference to {reference.name}", "test", "verdict"], rows, align="lllll")
    else:
        doc.muted("no evaluation to compare")


def claim_outcome(claim: Expectation, by_name: dict[str, Variant]) -> tuple[Optional[str], Optional[Difference], str]:
    """(metric, winner - loser, outcome) of one `expect`: "holds" when the 95% interval shows
    the winner better (lower perplexity, higher accuracy), "does not hold: the opposite is
    measured" when it shows it worse, "not shown: not significant at 95%" otherwise."""
    if claim.speed is not None:
        return _speed_claim(claim, by_name)
    found = differences(by_name[claim.loser], by_name[claim.winner])
    if claim.task is not None:
        match = [(m, d) for m, d in found if m.startswith(f"{claim.task} ")]
    else:
        key = PERPLEXITY_RATIO if claim.data is None else f"{PERPLEXITY_RATIO} ({claim.data})"
        match = [(m, d) for m, d in found if m == key]
    if not match:
        return None, None, "not measured"
    metric, d = match[0]
    if math.isnan(d.low):
        return metric, d, "no interval"
    if claim.task is None:
        better, worse = d.high < 1, d.low > 1
    else:
        better, worse = d.significant and d.delta > 0, d.significant and d.delta < 0
    outcome = "holds" if better else "does not hold: the opposite is measured" if worse else \
        "not shown: not significant at 95%"
    return metric, d, outcome


def _speed_claim(claim: Expectation, by_name: dict[str, Variant]) -> tuple[Optional[str], Optional[Difference], str]:
    """`expect A beats B on decode_speed`: A's student's speed-up over the teacher divided by B's.
    From `pdc bench` on the comparison when it measured both (one session, paired by round), else
    from the two variants' evaluations (`speed=true`, each interleaved with the teacher)."""
    bench = read_speed(by_name[claim.winner].out.parent)
    labels = [variant_student(bench, n) for n in (claim.winner, claim.loser)] if bench else [None]
    if all(labels):
        d = paired_ratio(bench, labels[0], labels[1], claim.speed)
    else:
        speeds = [getattr(by_name[n].result("evaluate"), "speed", None) for n in (claim.winner, claim.loser)]
        d = speedup_ratio(speeds[0], speeds[1], claim.speed) if all(speeds) else None
    if d is None:
        return None, None, "not measured"
    metric = f"{SPEED_RATIO} ({claim.speed})"
    outcome = "holds" if d.low > 1 else "does not hold: the opposite is measured" if d.high < 1 else \
        "not shown: not significant at 95%"
    return metric, d, outcome


def _claims_table(doc: Doc, variants: list[Variant], claims: tuple[Expectation, ...]) -> None:
    by_name = {v.name: v for v in variants}
    rows = []
    for claim in claims:
        metric, d, outcome = claim_outcome(claim, by_name)
        shown = format_difference(metric, d) if d is not None else "-"
        rows.append([claim.text, shown, d.method if d is not None else "-", f"**{outcome}**"])
    doc.p("Each `expect` of the spec, tested on the winner's final model against the loser's (95% intervals):")
    doc.table(["claim", "winner vs loser", "test", "outcome"], rows, align="llll")


def _saliency_series(variants: list[Variant]) -> list[tuple[str, SaliencyResult]]:
    out = []
    for v in variants:
        prune: Optional[PruneResult] = v.result("prune")
        if prune is not None and prune.saliency is not None and prune.saliency.candidates:
            out.append((v.name, prune.saliency))
    return out


def _layers_label(layers: tuple[int, ...]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def _accuracy_se(sal: SaliencyResult, p: float) -> Optional[float]:
    """One standard error of a candidate's accuracy (binomial over the items scored)."""
    return math.sqrt(max(p * (1 - p), 0.0) / sal.items) if sal.items else None


def _was_dropped(sal: SaliencyResult, layers: tuple[int, ...]) -> bool:
    """The chosen candidates: the dropped block, or each dropped single layer."""
    return tuple(layers) == tuple(sal.dropped_layers) or (len(layers) == 1 and layers[0] in sal.dropped_layers)


def _saliency_cell(sal: SaliencyResult, value: float) -> str:
    if sal.metric == "accuracy":
        return _fmt_score(value, _accuracy_se(sal, value), percent=True)
    return f"{value:.4g}"


def _saliency_section(doc: Doc, variants: list[Variant]) -> None:
    """Each depth-pruning variant's metric per removed candidate (what Figs. 7 and 8 plot), and
    which candidates cost the most and the least -- ranked, with each accuracy's standard error."""
    series = _saliency_series(variants)
    if not series:
        return
    doc.h(2, "Depth saliency")
    for name, sal in series:
        # costliest first: the highest loss, or the lowest accuracy, with the candidate removed
        ranked = sorted(sal.candidates, key=lambda c: c.value if sal.better == "lower" else -c.value, reverse=True)
        what = "layer" if all(len(c.layers) == 1 for c in sal.candidates) else "block"
        full = f"; the full model: {_saliency_cell(sal, sal.baseline)}" if sal.baseline is not None else ""
        on = f" on {sal.items} items of {sal.task}" if sal.items else ""
        most = ", ".join(f"{_layers_label(c.layers)} ({_saliency_cell(sal, c.value)})" for c in ranked[:3])
        least = ", ".join(f"{_layers_label(c.layers)} ({_saliency_cell(sal, c.value)})" for c in ranked[::-1][:3])
        doc.p(f"`{name}` ({sal.metric}{on}, {sal.better} is better{full}): removing {what} {most} costs "
              f"the most; {least} the least. Dropped: {list(sal.dropped_layers)}.")
    starts = sorted({c.layers[0] for _, sal in series for c in sal.candidates})
    header = ["first removed layer"] + [f"{name}: {sal.metric}" for name, sal in series]
    rows = []
    for start in starts:
        row = [str(start)]
        for _, sal in series:
            c = next((c for c in sal.candidates if c.layers[0] == start), None)
            mark = " (dropped)" if c is not None and _was_dropped(sal, c.layers) else ""
            row.append(_saliency_cell(sal, c.value) + mark if c is not None else "-")
        rows.append(row)
    doc.table(header, rows, align="l" + "r" * len(series))


def _plot_losses(variants: list[Variant], png: Path) -> bool:
    """The distillation's training loss per variant and, where it validated every N steps, the
    student's held-out LM loss (solid) beside its teacher's (dashed: flat for a frozen teacher,
    falling for one corrected concurrently) -- the paper's Figure 3."""
    curves = []
    for v in variants:
        distill: Optional[TrainResult] = v.result("distill")
        name = next((n for n, r in v.records.items() if r.kind == "distill"), None)
        if distill is None or name is None:
            continue
        log = read_log_records(v.out / name / distill.log)
        if log:
            key = "kl" if all("kl" in r for r in log) else "loss"
            val = [(r["step"], r["val_loss"], r.get("val_teacher_loss")) for r in log if "val_loss" in r]
            if distill.val_loss_start is not None:
                val.insert(0, (0, distill.val_loss_start, distill.teacher_val_loss_start or distill.teacher_val_loss))
            curves.append((v.name, [r["step"] for r in log], [r[key] for r in log], key, val))
    if not curves:
        return False
    plt = pyplot()
    held_out = any(len(c[4]) > 2 for c in curves)
    fig, axes = plt.subplots(1, 2 if held_out else 1, figsize=(13 if held_out else 7, 4), squeeze=False)
    ax = axes[0][0]
    for i, (name, steps, values, key, _) in enumerate(curves):
        ax.plot(steps, values, lw=1.5, color=f"C{i}", label=f"{name} ({'KL' if key == 'kl' else 'loss'})")
    ax.set(xlabel="optimizer step", ylabel="training loss (nats/token)", title="distillation, per variant")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if held_out:
        ax = axes[0][1]
        for i, (name, _, _, _, val) in enumerate(curves):
            ax.plot([p[0] for p in val], [p[1] for p in val], lw=1.5, marker="o", ms=3, color=f"C{i}",
                    label=f"{name}: student")
            teacher = [(p[0], p[2]) for p in val if p[2] is not None]
            if teacher:
                ax.plot([p[0] for p in teacher], [p[1] for p in teacher], lw=1, ls="--", color=f"C{i}",
                        label=f"{name}: teacher")
        ax.set(xlabel="optimizer step", ylabel="held-out LM loss (nats/token)",
               title="held-out LM loss on the distillation data")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png)
    return True


def _plot_scores(variants: list[Variant], png: Path) -> bool:
    metrics = []  # (label, [(variant, value, err)])
    for i, domain in enumerate(_domains(variants) or ["held-out"]):
        ppl = [(v.name, dict(_perplexities(v.final[1], _domains(variants)))[domain], None)
               for v in variants if v.final]
        ppl = [p for p in ppl if p[1]]
        if ppl:
            metrics.append((f"perplexity on {domain} (lower is better)", ppl))
    for task in _task_names(variants):
        bars = []
        for v in variants:
            score = v.final[1].tasks.get(task) if v.final else None
            if score is not None:
                bars.append((v.name, 100 * score.values[score.primary],
                             100 * score.stderr[score.primary] if score.primary in score.stderr else None))
        if bars:
            metrics.append((f"{task} {score.primary if score else ''} % (± 1 se)", bars))
    if not metrics:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.8), squeeze=False)
    for ax, (label, bars) in zip(axes[0], metrics):
        names = [b[0] for b in bars]
        ax.bar(names, [b[1] for b in bars], yerr=[b[2] or 0 for b in bars], capsize=4,
               color=[f"C{i}" for i in range(len(bars))])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, png)
    return True


def _plot_saliency(variants: list[Variant], png: Path) -> bool:
    """Each depth-pruning variant's saliency against the (first) removed layer, one panel per
    metric, with the unpruned model as a dotted line and, for task accuracy, one standard error
    (binomial, over the items scored) as a band -- the paper's Figures 7 and 8."""
    series = [(name, sal, [c.layers[0] for c in sal.candidates], [c.value for c in sal.candidates])
              for name, sal in _saliency_series(variants)]
    if not series:
        return False
    plt = pyplot()
    by_metric: dict[str, list] = {}
    for s in series:
        by_metric.setdefault(s[1].metric, []).append(s)
    fig, axes = plt.subplots(1, len(by_metric), figsize=(6 * len(by_metric), 3.8), squeeze=False)
    for ax, (metric, group) in zip(axes[0], by_metric.items()):
        for name, sal, starts, values in group:
            line, = ax.plot(starts, values, marker="o", ms=3, lw=1.2,
                            label=f"{name}: drops {list(sal.dropped_layers)}")
            if sal.items and metric == "accuracy":
                se = [_accuracy_se(sal, p) for p in values]
                ax.fill_between(starts, [p - e for p, e in zip(values, se)], [p + e for p, e in zip(values, se)],
                                color=line.get_color(), alpha=0.15, lw=0)
            if sal.baseline is not None:
                ax.axhline(sal.baseline, color=line.get_color(), ls=":", lw=1)
            rings = [k for k, c in enumerate(sal.candidates) if _was_dropped(sal, c.layers)]
            ax.scatter([starts[k] for k in rings], [values[k] for k in rings], s=70, facecolors="none",
                       edgecolors=line.get_color(), lw=1.5)
        single = all(len(c.layers) == 1 for _, sal, _, _ in group for c in sal.candidates)
        ax.set(xlabel="removed layer" if single else "first removed layer", ylabel=metric,
               title=f"depth saliency ({metric}; dotted: no layer removed"
                     + ("; band: ± 1 se" if metric == "accuracy" and any(s[1].items for s in group) else "") + ")")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, png)
    return True


def build_comparison_doc(build_dir: Path, comparison: Comparison) -> Doc:
    variants = [Variant(v.name, v.changes, build_dir / v.name) for v in comparison.variants]
    doc = Doc()
    doc.h(1, f"pdc comparison: {comparison.name}")
    doc.p(f"{len(variants)} variants of `{build_dir.name}`; each variant's own report is "
          + ", ".join(f"`{v.name}/report.md`" for v in variants) + ".")
    doc.h(2, "Variants")
    _summary_table(doc, variants)
    doc.h(2, "Differences")
    _differences_table(doc, variants)
    if comparison.expects:
        doc.h(2, "Claims")
        _claims_table(doc, variants, comparison.expects)
    _saliency_section(doc, variants)
    if read_speed(build_dir) is not None:  # `pdc bench` on the comparison: every variant's student at once
        speed_section(doc, build_dir, None)
    doc.h(2, "Plots")
    drawn = False
    for png, fn, alt in ((LOSSES_PNG, _plot_losses, "distillation curves per variant"),
                         (SCORES_PNG, _plot_scores, "final scores per variant"),
                         (SALIENCY_PNG, _plot_saliency, "depth saliency per variant")):
        if fn(variants, build_dir / png):
            doc.img(build_dir / png, png, alt)
            drawn = True
    if not drawn:
        doc.muted("nothing to plot yet")
    return doc


def write_comparison_report(build_dir: Path, comparison: Comparison) -> tuple[Path, Path]:
    """Write `comparison.md` and `comparison.html` into `build_dir`; returns both paths."""
    build_dir = Path(build_dir)
    doc = build_comparison_doc(build_dir, comparison)
    md, html_path = build_dir / "comparison.md", build_dir / "comparison.html"
    write_text(md, render_markdown(doc))
    write_text(html_path, render_html(doc, f"pdc comparison: {comparison.name}"))
    return md, html_path
