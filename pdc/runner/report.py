"""The run report: one Markdown and one self-contained HTML page summarising a build directory.

`write_report(build_dir)` only *reads* what the stages left behind (layout in
docs/architecture.md) and never fails because a stage has not run: each missing part becomes a
short "not run" line. The page holds the spec, the architecture before/after with parameter
counts, time per stage, the pruning plots (importance, depth saliency), the training curves
(teacher correction and distillation, drawn together into `report_losses.png`) and the
evaluation table teacher / pruned / distilled; with validation every N steps, the held-out loss
as a curve over training; a cached teacher's pass (blocks, bytes per token, top-k mass).

Both files are written next to each other in `build_dir` through temporary files and renamed
at the end, so a crash never leaves a half-written report. The HTML embeds every image as a
base64 PNG so it can be mailed or archived on its own; the Markdown links the PNGs relatively
(the document model and both renderers: `pdc.runner.report_doc`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pdc.errors import PdcError
from pdc.files import write_text
from pdc.lang.checked import STAGE_KINDS
from pdc.plan.dry_run import human_count
from pdc.plan.results import (
    EvaluateResult,
    PruneResult,
    StageRecord,
    TeacherLogitsResult,
    TrainResult,
    read_record,
)
from pdc.plotting import pyplot, save_figure
from pdc.runner.build_inputs import DATA_FILE
from pdc.runner.stats import format_difference, score_differences, verdict
from pdc.runner.report_doc import Doc, render_html, render_markdown
from pdc.runner.speed_table import SPEED_PNG, absolute_table, plot_speed, read_speed, setup_line, speedup_table
from pdc.stages.evaluate import comparison_rows

STAGE = "report"
LOSS_PNG = "report_losses.png"
NOT_RUN = "not run"


# --------------------------------------------------------------------------------------------
# Reading the build directory


def _json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing or unreadable (a report never fails on it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_log_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line of a killed run
        if isinstance(rec, dict) and all(_is_number(rec.get(k)) for k in ("step", "loss")) \
                and ("kl" not in rec or _is_number(rec["kl"])):
            out.append(rec)
    return out


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def format_number(x: Any, digits: int = 4) -> str:
    if isinstance(x, bool) or x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return "-" if not math.isfinite(x) else f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 90:
        return f"{s:.1f} s"
    return f"{int(s // 60)} min {s % 60:02.0f} s" if s < 3600 else f"{s / 3600:.2f} h"


# --------------------------------------------------------------------------------------------
# Sections


def _spec_section(doc: Doc, build: Path, plan: dict | None):
    doc.h(2, "Spec")
    text = None
    candidates = [build / "spec.pds"]
    if plan and plan.get("spec"):
        candidates.append(Path(plan["spec"]))
    for c in candidates:
        try:
            text = c.read_text()
            break
        except OSError:
            continue
    if text is None:
        doc.muted("spec text not found (no spec.pds in the build directory)")
    else:
        doc.pre(text)


def _data_section(doc: Doc, build: Path):
    """The generated and mixed corpora the build read (`data.json`, written when they are made)."""
    made = _json(build / DATA_FILE)
    if not isinstance(made, dict) or not made:
        return
    doc.h(2, "Data made for this build")
    rows = []
    for name, entry in made.items():
        meta = entry.get("generated") or {}
        what = (f"{meta.get('new_tokens', '?'):,} new tokens, {meta.get('samples', '?')} samples from "
                f"{meta.get('prompts', '?')} prompts, {meta.get('settings', {})}" if meta else "mixture")
        rows.append([name, entry.get("kind", "?"), what, entry.get("corpus", "?")])
    doc.table(["data", "kind", "what", "corpus"], rows)


ARCH_ROWS = (("hidden", "hidden size"), ("mlp", "MLP size"), ("heads", "attention heads"),
             ("kv_heads", "KV heads"), ("head_dim", "head dim"), ("depth", "layers"), ("vocab", "vocabulary"))


def _arch_section(doc: Doc, plan: dict | None, prune: PruneResult | None):
    doc.h(2, "Architecture")
    if not plan or "source" not in plan or "final" not in plan:
        doc.muted("no plan.json: architecture " + NOT_RUN)
        return
    src, fin = plan["source"], plan["final"]

    def ratio(a, b):
        return f"{b / a:.3f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else "-"

    rows = []
    for key, label in ARCH_ROWS:
        if key in src or key in fin:
            a, b = src.get(key), fin.get(key)
            rows.append([label, format_number(a), format_number(b), ratio(a, b)])
    for key, label in (("params_total", "parameters"), ("params_non_embedding", "non-embedding parameters")):
        a, b = src.get(key), fin.get(key)
        if a is not None and b is not None:
            rows.append([label, f"{human_count(a)} ({a:,})", f"{human_count(b)} ({b:,})", ratio(a, b)])
    if plan.get("flops_per_token_ratio") is not None:
        rows.append([f"FLOPs/token (seq {plan.get('flops_seq_len', '?')})", "1", f"{plan['flops_per_token_ratio']:.3f}",
                     f"{plan['flops_per_token_ratio']:.3f}x"])
    ref = plan.get("source_ref") or {}
    doc.p(f"Source `{plan.get('source_model', 'teacher')}` = {ref.get('kind', '?')}(\"{ref.get('ref', '?')}\"), "
          f"{src.get('model_type', '?')} family.")
    doc.table(["", "source", "final student", "ratio"], rows)
    if prune is not None and fin.get("params_total") is not None:
        verdict = "matches the plan" if prune.params_after == fin["params_total"] else \
            f"the plan's final student has {fin['params_total']:,}"
        doc.p(f"The pruned checkpoint has {prune.params_after:,} parameters ({verdict}).")


def _planned_stages(plan) -> list[dict]:
    """The plan's stage entries that are objects (a damaged plan.json yields none)."""
    stages = plan.get("stages") if isinstance(plan, dict) else None
    return [s for s in stages if isinstance(s, dict)] if isinstance(stages, list) else []


def _stages_section(doc: Doc, build: Path, plan: dict | None, records: dict[str, StageRecord]):
    doc.h(2, "Time per stage")
    planned = [s["name"] for s in _planned_stages(plan) if isinstance(s.get("name"), str)]
    status = _json(build / "stages.json")
    status = status if isinstance(status, dict) else {}
    if not records and not planned:
        doc.muted("no stage has run yet")
        return
    names = sorted(dict.fromkeys(planned + list(records)),
                   key=lambda n: STAGE_KINDS.index(records[n].kind) if n in records else len(STAGE_KINDS))
    rows, total = [], 0.0
    for name in names:
        rec = records.get(name)
        state = status.get(name) if isinstance(status.get(name), dict) else {}
        if state.get("status") == "failed":  # the last run stopped here (an older output may remain)
            rows.append([name, f"failed: {state.get('message') or 'see the run output'}", "-"])
            continue
        if rec is None:
            # A stage builds in `<stage>.tmp/`: present without a record means it is running now
            # or was interrupted.
            started = (build / f"{name}.tmp").exists() or state.get("status") in ("running", "interrupted")
            rows.append([name, "started, not finished" if started else NOT_RUN, "-"])
            continue
        total += rec.seconds
        skipped = state.get("status") == "skipped"
        rows.append([name, "skipped (up to date; time of the run that built it)" if skipped else "done",
                     format_seconds(rec.seconds)])
    rows.append(["total", "", format_seconds(total)])
    doc.table(["stage", "status", "time"], rows, align="llr")


def _prune_section(doc: Doc, build: Path, name: str, prune: PruneResult | None):
    doc.h(2, "Pruning" if name == "prune" else f"Pruning ({name})")
    if prune is None:
        doc.muted(f"{name} " + NOT_RUN)
        return
    stage = build / name
    if prune.kind == "depth":
        sal = prune.saliency
        doc.p(f"Depth pruning: {prune.arch_before['layers']} -> {prune.arch_after['layers']} layers; "
              f"dropped layers {list(sal.dropped_layers)} ({'one contiguous block' if sal.contiguous else 'any layers'}).")
        what = f"task `{sal.task}` ({sal.shots}-shot)" if sal.kind == "task" else sal.kind
        better = "higher" if sal.better == "higher" else "lower"
        rows = [["saliency", what], ["metric", f"{sal.metric} ({better} is better)"],
                ["metric, full model", format_number(sal.baseline)],
                ["metric, chosen layers removed", format_number(sal.chosen)],
                ["candidates scored", str(len(sal.candidates))]]
        doc.table(["", "value"], rows, align="ll")
        if (stage / sal.plot).exists():
            doc.img(stage / sal.plot, f"{name}/{sal.plot}", "depth saliency per candidate")
        else:
            doc.muted("saliency plot not written")
    else:
        if prune.kind == "search":
            s = prune.search
            doc.p(f"Architecture search: {s['space_size']} shapes, {len(s['candidates'])} ranked; chose "
                  + ", ".join(f"{k}={v}" for k, v in s["chosen_sizes"].items())
                  + f" (rank {s['chosen_cheap_rank']} by LM loss without training; short distillation "
                  + ("reordered" if s["reordered"] else "kept") + " the top candidates' order).")
        doc.p("Width pruning to " + ", ".join(f"{k}={v}" for k, v in prune.arch_after.items()) +
              f" with {prune.importance} importance on {format_number(prune.calibration_tokens)} calibration tokens.")
        if prune.seconds:
            doc.table(["step", "time"], [[k, format_seconds(v)] for k, v in prune.seconds.items()], align="lr")
        if prune.plot and (stage / prune.plot).exists():
            doc.img(stage / prune.plot, f"{name}/{prune.plot}", "importance scores, kept vs pruned")
        else:
            doc.muted("importance plot not written")
    if prune.artifacts:
        doc.table(["artifact", "size", "verified against the program"],
                  [[f"`{name}/{a.path}`", f"{a.bytes / 2**20:.1f} MiB", f"max |diff| {a.max_abs_diff:.2g} <= {a.tolerance:.2g}"]
                   for a in prune.artifacts.values()], align="lrl")


def _train_table(correct: TrainResult | None, distill: TrainResult | None) -> tuple[list[str], list[list[str]]]:
    keys = [("steps", "steps"), ("tokens", "tokens"), ("global_batch", "global batch"), ("seq_len", "seq len"),
            ("precision", "precision"), ("tokens_per_s", "tokens/s (median)"), ("wall_s", "wall time")]
    cols = [(n, m) for n, m in (("correct", correct), ("distill", distill)) if m]
    rows = [[label] + [format_seconds(m.wall_s) if key == "wall_s" else format_number(getattr(m, key)) for _, m in cols]
            for key, label in keys]
    if correct:
        rows.append(["teacher val LM loss before -> after",
                     f"{format_number(correct.val_loss_start)} -> {format_number(correct.val_loss_end)}"] + (["-"] if distill else []))
    if distill:
        lead = ["-"] if correct else []
        rows.append(["student val LM loss start -> end", *lead,
                     f"{format_number(distill.val_loss_start)} -> {format_number(distill.val_loss_end)}"])
        rows.append(["student val KL start -> end", *lead,
                     f"{format_number(distill.val_kl_start)} -> {format_number(distill.val_kl_end)}"])
        rows.append(["teacher val LM loss", *lead, format_number(distill.teacher_val_loss)])
        rows.append(["loss", *lead, loss_name(distill)])
    if any(m.val_every for _, m in cols):
        rows.append(["validation every"] + [f"{m.val_every} steps" if m.val_every else "start and end" for _, m in cols])
    return [""] + [n for n, _ in cols], rows


def loss_name(distill: TrainResult) -> str:
    """What the distillation minimised, in words."""
    if distill.loss == "ce":
        return "next-token cross-entropy (no teacher)"
    kl = {"kl_forward": "forward KL", "kl_reverse": "reverse KL"}.get(distill.loss or "", distill.loss or "?")
    if distill.teacher_placement == "cached":
        return f"{kl}, logits only, from the teacher's cached top {distill.cache_k} + tail"
    return f"{kl}, logits only, teacher online"


def _teacher_logits_table(result: TeacherLogitsResult) -> list[list[str]]:
    computed = f"{result.blocks_computed:,} now" if result.blocks_computed else "none (all cached)"
    return [["blocks the distillation reads", f"{result.blocks:,} x {result.seq_len} tokens"],
            ["computed by this run", computed],
            ["teacher tokens/s", format_number(result.tokens_per_s)],
            ["k (logits kept per token)", str(result.k)],
            ["teacher probability inside the top k", f"{result.topk_mass:.1%}"],
            ["bytes per token on disk", f"{result.bytes_per_token:.0f}"],
            ["cache on disk (every block it holds)", f"{result.cache_bytes / 2**20:,.1f} MiB"],
            ["cache", f"`{result.cache_dir}`"]]


def _moving_average(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(correct_log: list[dict], correct: TrainResult | None, distill_log: list[dict],
                distill: TrainResult | None, png: Path) -> bool:
    """One PNG with a panel per training stage that logged steps. Correction: the teacher's train
    loss with its validation loss before/after (uncorrected vs corrected). Distillation: the
    student's KL (its LM loss for loss=ce) with its validation loss at start/end and the
    teacher's validation loss. A stage that validated every N steps (`val_every`) also gets its
    held-out LM loss (and KL) as curves from step 0. Returns False (and writes nothing) when
    neither stage logged a step."""
    panels = [p for p in (("correct", correct_log, correct), ("distill", distill_log, distill)) if p[1]]
    if not panels:
        return False
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4), squeeze=False)
    for ax, (name, log, metrics) in zip(axes[0], panels):
        steps = [r["step"] for r in log]
        key = "kl" if name == "distill" and all("kl" in r for r in log) else "loss"
        values = [float(r[key]) for r in log]
        label = "student KL (train)" if key == "kl" else ("teacher LM loss (train)" if name == "correct"
                                                           else "student LM loss (train)")
        window = max(1, len(values) // 20)
        ax.plot(steps, values, color="tab:blue", alpha=0.3 if window > 1 else 1.0, lw=1,
                label=label if window == 1 else None)
        if window > 1:
            ax.plot(steps, _moving_average(values, window), color="tab:blue", lw=2,
                    label=f"{label}, moving avg {window}")
        hlines = []
        if name == "correct":
            hlines = [("uncorrected teacher val loss", metrics and metrics.val_loss_start, "tab:red", "--"),
                      ("corrected teacher val loss", metrics and metrics.val_loss_end, "tab:green", "--")]
            ax.set_title("teacher correction")
        else:
            hlines = [("teacher val loss", metrics and metrics.teacher_val_loss, "tab:green", "--")]
            if not _val_curve(log, "val_loss"):
                hlines += [("student val loss, start", metrics and metrics.val_loss_start, "tab:red", ":"),
                           ("student val loss, end", metrics and metrics.val_loss_end, "tab:purple", ":")]
            if correct and correct.val_loss_start is not None:
                hlines.append(("uncorrected teacher val loss", correct.val_loss_start, "tab:orange", "--"))
            ax.set_title(f"distillation: {loss_name(metrics)}" if metrics else "distillation", fontsize=9)
        start = (metrics.val_loss_start, metrics.val_kl_start) if metrics else (None, None)
        for val_key, first, color, lab in (("val_loss", start[0], "tab:purple", "held-out LM loss"),
                                           ("val_kl", start[1], "tab:brown", "held-out KL")):
            curve = _val_curve(log, val_key)
            if curve:
                if isinstance(first, (int, float)) and math.isfinite(first):
                    curve = [(0, first)] + curve
                ax.plot([c[0] for c in curve], [c[1] for c in curve], color=color, marker="o", ms=3, lw=1.5,
                        label=f"{lab}: {curve[-1][1]:.3f} at step {curve[-1][0]}")
        for lab, y, color, style in hlines:
            if isinstance(y, (int, float)) and math.isfinite(y):
                ax.axhline(y, color=color, ls=style, lw=1.3, label=f"{lab}: {y:.3f}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, png, dpi=110)
    return True


def _val_curve(log: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of the steps that logged a validation value `key`."""
    return [(int(r["step"]), float(r[key])) for r in log if _is_number(r.get(key))]


def _training_section(doc: Doc, build: Path, records: dict[str, StageRecord]):
    doc.h(2, "Training")
    results = {r.kind: (name, r.result) for name, r in records.items() if isinstance(r.result, TrainResult)}
    correct = results.get("correct", (None, None))[1]
    distill = results.get("distill", (None, None))[1]
    if not correct and not distill:
        doc.muted("teacher correction and distillation " + NOT_RUN)
        return
    if not correct:
        doc.muted("teacher correction " + NOT_RUN)
    if not distill:
        doc.muted("distillation " + NOT_RUN)
    header, rows = _train_table(correct, distill)
    doc.table(header, rows)
    cache = next((r.result for r in records.values() if isinstance(r.result, TeacherLogitsResult)), None)
    if cache is not None:
        doc.p("Teacher logits, computed once (the `teacher_logits` stage) and read by the distillation:")
        doc.table(["", "value"], _teacher_logits_table(cache), align="ll")
    logs = {kind: read_log_records(build / name / result.log) for kind, (name, result) in results.items()}
    png = build / LOSS_PNG
    if plot_losses(logs.get("correct", []), correct, logs.get("distill", []), distill, png):
        doc.img(png, LOSS_PNG, "training loss curves")


def _eval_section(doc: Doc, result: EvaluateResult | None):
    doc.h(2, "Evaluation")
    if result is None or not result.models:
        doc.muted("evaluation " + NOT_RUN)
        return
    columns, rows = comparison_rows(result)
    if not rows:
        doc.muted("the evaluation measured no metric")
        return
    doc.table(["metric"] + columns, rows)
    items = sorted({t.items for m in result.models.values() for t in m.tasks.values() if t.items})
    has_tasks = any(m.tasks for m in result.models.values())
    notes = []
    if has_tasks and (result.limit or items):
        counted = f"{', '.join(map(str, items))} items per task" if items else f"the first {result.limit} items of each task"
        notes.append(f"task scores in % on {counted} (± one standard error)")
    if result.perplexity_tokens:
        notes.append(f"perplexity over {result.perplexity_tokens:,} held-out tokens")
    doc.muted("; ".join(notes + [f"models scored in {result.precision}"]))
    # Each model against the first column (the teacher), on the same blocks and items.
    reference = columns[0]
    diff_rows = [[column, metric, format_difference(metric, d), d.method, verdict(metric, d)]
                 for column in columns[1:]
                 for metric, d in score_differences(result.models[reference], result.models[column])]
    if diff_rows:
        doc.p(f"Against the {reference} (95% intervals; a difference whose interval includes no change "
              "is not significant):")
        doc.table(["model", "metric", f"difference to {reference}", "test", "verdict"], diff_rows, align="lllll")


def speed_section(doc: Doc, build: Path, result: EvaluateResult | None):
    """The students' speed-ups over the teacher: `pdc bench`'s last measurement, else the
    evaluation's (`speed=true`). The comparison report shows it for all variants' students."""
    doc.h(2, "Speed")
    speed = read_speed(build) or (result.speed if result is not None else None)
    if speed is None:
        doc.muted("inference speed not measured: `pdc bench SPEC`, or `speed=true` in evaluate")
        return
    doc.p(f"Each student against the teacher, measured interleaved ({setup_line(speed)}). A speed-up is the "
          "median over rounds of the teacher's seconds over the student's in the same round; the ratios of "
          "parameters, FLOPs/token and peak memory (weights + KV cache) are student / teacher.")
    doc.table(*speedup_table(speed))
    doc.table(*absolute_table(speed))
    for note in speed.notes:
        doc.muted(note)
    png = build / SPEED_PNG
    if plot_speed(speed, png):
        doc.img(png, SPEED_PNG, "speed-up per measure")


# --------------------------------------------------------------------------------------------


def _records(build: Path) -> tuple[dict[str, StageRecord], dict[str, str]]:
    """Every finished stage's record, and a one-line problem for each record that cannot be read."""
    records, problems = {}, {}
    for path in sorted(build.iterdir()) if build.is_dir() else []:
        if path.is_dir() and not path.name.endswith((".tmp", ".work")):
            try:
                rec = read_record(path)
            except PdcError as exc:
                problems[path.name] = exc.message
                continue
            if rec is not None:
                records[path.name] = rec
    return records, problems


def build_doc(build_dir: Path) -> Doc:
    build = Path(build_dir)
    plan = _json(build / "plan.json")
    plan = plan if isinstance(plan, dict) else None
    records, problems = _records(build)
    prunes = [n for n, r in records.items() if r.kind == "prune"]
    last_prune = records[prunes[-1]].result if prunes else None
    evaluate = next((r.result for r in records.values() if r.kind == "evaluate"), None)
    doc = Doc()
    doc.h(1, f"pdc report: {build.resolve().name}")
    if plan and isinstance(plan.get("source"), dict) and isinstance(plan.get("final"), dict):
        a, b = plan["source"].get("params_total"), plan["final"].get("params_total")
        if isinstance(a, int) and isinstance(b, int) and a > 0:
            doc.p(f"{human_count(a)} -> {human_count(b)} parameters ({b / a:.1%} of the source); stages: "
                  + (" -> ".join(str(s.get("name", "?")) for s in _planned_stages(plan))
                     or "none") + ".")
    for name, message in problems.items():
        doc.muted(f"{name}: {message}")
    planned_prunes = [s["name"] for s in _planned_stages(plan) if s.get("kind") == "prune" and isinstance(s.get("name"), str)]
    sections = [
        ("Spec", lambda d: _spec_section(d, build, plan)),
        ("Data made for this build", lambda d: _data_section(d, build)),
        ("Architecture", lambda d: _arch_section(d, plan, last_prune)),
        ("Time per stage", lambda d: _stages_section(d, build, plan, records)),
        *[("Pruning", lambda d, n=n: _prune_section(d, build, n, records[n].result if n in records else None))
          for n in (planned_prunes or prunes or ["prune"])],
        ("Training", lambda d: _training_section(d, build, records)),
        ("Evaluation", lambda d: _eval_section(d, evaluate)),
        ("Speed", lambda d: speed_section(d, build, evaluate)),
    ]
    for title, fill in sections:
        part = Doc()
        try:
            fill(part)
        except (OSError, ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            # A damaged plan, plot or log: say so, keep the rest of the report.
            part = Doc()
            part.h(2, title)
            part.muted(f"could not read this part of the build ({type(exc).__name__}: {exc})")
        doc.blocks.extend(part.blocks)
    return doc


def write_report(build_dir: Path) -> tuple[Path, Path]:
    """Write `report.md` and `report.html` (self-contained) into `build_dir`; returns both paths.

    Reads only; a stage that has not run is reported as such. Raises `PdcError` only when
    `build_dir` itself is missing or not writable."""
    build = Path(build_dir)
    if not build.is_dir():
        raise PdcError(f"build directory {build} does not exist", STAGE)
    doc = build_doc(build)
    md_path, html_path = build / "report.md", build / "report.html"
    title = f"pdc report: {build.resolve().name}"
    try:
        for path, text in ((md_path, render_markdown(doc)), (html_path, render_html(doc, title))):
            write_text(path, text)
    except OSError as exc:
        raise PdcError(f"cannot write the report into {build}: {exc.strerror or exc}", STAGE) from exc
    return md_path, html_path
