"""The dry-run plan: what a checked spec will do, computed from configs alone (no weights).

`build_plan(spec)` returns a JSON-able dict (written as `plan.json` in the build directory);
`render_plan(plan)` prints it as tables. Token budgets become optimizer steps by
`TrainConfig.total_steps`; parameter counts are exact, from the config each stage emits
instantiated on the meta device (`pdc.plan.counts`; non-embedding excludes the input embedding
and the output head, as in the paper's Table 3).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from pdc.arch import Arch
from pdc.lang.checked import (
    CheckedSpec,
    CorrectStage,
    DistillStage,
    EvaluateStage,
    PruneStage,
)
from pdc.lang.diagnostics import DiagnosticSink, SpecError
from pdc.lang.settings import EMIT_OUTPUTS, TrainConfig
from pdc.plan.counts import ConfigError, Counts, count, count_arch, flops_per_token, nearest_valid, representable
from pdc.plan.memory import memory_plan, render_memory
from pdc.plan.prune_host import streamed_prune_host
from pdc.plan.search_plan import render_search, search_entry
from pdc.plan.training import cache_bytes_per_token

DEFAULT_FLOPS_SEQ_LEN = 4096
MOE_AXES = (("experts", "experts"), ("top_k", "top_k"), ("expert_mlp", "expert_mlp"), ("shared_mlp", "shared_mlp"))
AXES = (("hidden", "hidden"), ("mlp", "mlp"), ("heads", "heads"), ("kv_heads", "kv_heads"),
        ("depth", "layers"), ("head_dim", "head_dim"))


def human_count(n: float) -> str:
    """4_512_746_496 -> '4.5B', 134_515_008 -> '134.5M'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


def arch_summary(arch: Arch, counts: Counts) -> dict[str, Any]:
    return {
        "model_type": arch.model_type,
        **{axis: getattr(arch, attr) for axis, attr in AXES + (MOE_AXES if arch.experts else ())},
        "vocab": arch.vocab,
        "tied_embeddings": arch.tied,
        "params_total": counts.total,
        "params_non_embedding": counts.non_embedding,
        "params_active": counts.active,
    }


def train_steps(train: TrainConfig) -> tuple[int, int]:
    """(steps, tokens): a token budget rounded up to whole steps, or a step budget's tokens."""
    steps = train.total_steps()
    return steps, train.tokens if train.tokens is not None else steps * train.tokens_per_step


def _train_dict(train: TrainConfig, kind: str) -> dict[str, Any]:
    steps, tokens = train_steps(train)
    out = {
        "tokens": tokens,
        "steps": steps,
        "tokens_per_step": train.global_batch * train.seq_len,
        "budget_given_as": "tokens" if train.tokens is not None else "steps",
        "lr": train.lr, "min_lr": train.min_lr, "warmup": train.warmup, "schedule": train.schedule,
        "global_batch": train.global_batch, "micro_batch": train.micro_batch,
        "seq_len": train.seq_len, "zero": train.zero, "precision": train.precision,
        "weight_decay": train.weight_decay, "seed": train.seed,
    }
    if kind == "correct":
        out.update(method=train.method)
        if train.method == "lora":
            out.update(lora_rank=train.lora_rank)
    else:
        out.update(loss=train.loss, temperature=train.temperature, ce_weight=train.ce_weight,
                   top_k=train.top_k, cache_k=train.cache_k)
    if train.val_every:
        out.update(val_every=train.val_every)
    return out


def _counts(spec: CheckedSpec) -> dict[str, Counts]:
    """Counts of the source and of every prune stage's target, each from the config pdc will
    emit instantiated on the meta device. Targets that config cannot represent are spec errors at
    the setting that asked for them, all reported at once."""
    sink = DiagnosticSink(spec.text)
    out: dict[str, Counts] = {}
    try:
        out["source"] = count(spec.source_config)
    except ConfigError as exc:
        raise SpecError.single(f"cannot build the source model: {exc.message}", spec.source_span, spec.text) from None
    for st in spec.prune_stages():
        before = st.source_arch or spec.source_arch
        if st.kind == "search":  # the shape is chosen at run time; search_entry checks the budgets
            out[st.name] = count_arch(spec.source_config, before)
            continue
        reason = representable(spec.source_config, st.target_arch)
        if reason is None:
            out[st.name] = count_arch(spec.source_config, st.target_arch)
            continue
        changed = [a for a in ("hidden", "mlp", "heads", "kv_heads", "layers")
                   if getattr(st.target_arch, a) != getattr(before, a)]
        axis = next((a for a in changed if a in st.setting_spans), changed[0] if changed else None)
        key = "depth" if axis == "layers" else axis
        span = st.setting_spans.get(key, st.span)
        nearest = nearest_valid(spec.source_config, st.target_arch, axis, getattr(before, axis)) if axis else []
        hint = f"; nearest valid: {' or '.join(map(str, nearest))}" if nearest else ""
        value = f"{key}={getattr(st.target_arch, axis)} " if axis else ""
        sink.error(f"{value}cannot be represented by the emitted {st.target_arch.model_type} config: "
                   f"{reason}{hint}", span)
    sink.raise_if_errors()
    return out


def build_plan(spec: CheckedSpec, gpu_mem: int | None = None) -> dict[str, Any]:
    """The JSON-able plan of `spec`: source architecture, each stage in order, final student,
    and for a comparison each variant's plan; with `gpu_mem` (bytes), each stage's memory per GPU
    and the fewest GPUs that fit. Raises `SpecError` (every problem of the recipe and its variants
    at once) when a target cannot be represented by the config pdc would emit."""
    if spec.comparison is None:
        return _recipe_plan(spec, gpu_mem)
    diagnostics: list = []
    plans: dict[str, Any] = {}
    for recipe in (spec, *(v.spec for v in spec.comparison.variants)):
        try:
            plans[id(recipe)] = _recipe_plan(recipe, gpu_mem)
        except SpecError as exc:
            diagnostics += [d for d in exc.diagnostics if d not in diagnostics]
    if diagnostics:
        raise SpecError(diagnostics, spec.text)
    plan = plans[id(spec)]
    plan["comparison"] = {
        "name": spec.comparison.name,
        "variants": [{"name": v.name, "changes": list(v.changes), **plans[id(v.spec)]}
                     for v in spec.comparison.variants],
    }
    return plan


def _recipe_plan(spec: CheckedSpec, gpu_mem: int | None) -> dict[str, Any]:
    counts = _counts(spec)
    distill = next((s for s in spec.stages if isinstance(s, DistillStage)), None)
    flops_seq = distill.train.seq_len if distill else DEFAULT_FLOPS_SEQ_LEN
    source = spec.source_arch
    stages: list[dict[str, Any]] = []
    previous = "source"
    for st in spec.stages:
        if isinstance(st, CorrectStage):
            stages.append({"name": st.name, "kind": "correct", "model": st.model, "data": st.data,
                           "order": st.order, **_train_dict(st.train, "correct")})
        elif isinstance(st, PruneStage):
            before, after = st.source_arch or source, st.target_arch
            c0, c1 = counts[previous], counts[st.name]
            entry: dict[str, Any] = {
                "name": st.name, "kind": "prune", "prune": st.kind, "data": st.data,
                "axes": {axis: [getattr(before, a), getattr(after, a)]
                         for axis, a in AXES + (MOE_AXES if before.experts else ())},
                "params_total": [c0.total, c1.total],
                "params_non_embedding": [c0.non_embedding, c1.non_embedding],
                "params_active": [c0.active, c1.active],
                "flops_per_token_ratio": flops_per_token(c1, after, flops_seq) / flops_per_token(c0, before, flops_seq),
                "target": arch_summary(after, c1),
            }
            # streamed: the first stage's width cut, or its depth cut scored by loss (task and
            # cosine saliency load the source)
            streamable = st.kind == "width" or (st.kind == "depth" and st.depth.saliency.kind == "loss")
            host = streamed_prune_host(spec.source_config, c0.total, c1.total, after.vocab, after.hidden) \
                if previous == "source" and streamable else None
            if host:  # only a streamed source: plans of loaded ones are unchanged
                entry["host_memory"] = host
            if st.emit != EMIT_OUTPUTS:
                entry["not_emitted"] = st.not_emitted
            if st.kind == "search":
                entry["importance"] = asdict(st.importance)
                entry["search"] = search_entry(spec, st)
            elif st.kind == "width":
                entry["importance"] = asdict(st.importance)
                if st.reconstruct is not None:
                    entry["reconstruct"] = asdict(st.reconstruct)
            else:
                entry["saliency"] = asdict(st.depth.saliency)
                entry["contiguous"] = st.depth.contiguous
            stages.append(entry)
            previous = st.name
        elif isinstance(st, DistillStage):
            stages.append({"name": st.name, "kind": "distill", "teacher": st.teacher, "data": st.data,
                           **_train_dict(st.train, "distill")})
            if st.teacher_correction is not None:
                stages[-1]["teacher_correction"] = _train_dict(st.teacher_correction, "correct")
        elif isinstance(st, EvaluateStage):
            stages.append({
                "name": st.name, "kind": "evaluate", "harness": st.harness,
                "tasks": [{"name": t.name, "shots": t.shots} for t in st.eval.tasks],
                "perplexity_data": list(st.eval.perplexity_data), "limit": st.eval.limit,
                "seq_len": st.eval.seq_len, "tasks_dir": st.tasks_dir,
                **({"speed": True} if st.eval.speed else {}),  # only when asked: existing plans unchanged
            })
    final = spec.final_arch
    c_src, c_fin = counts["source"], counts[previous]
    memory = {"memory": memory_plan(spec, gpu_mem, lambda a: count_arch(spec.source_config, a).total)} if gpu_mem else {}
    return {
        "spec": str(spec.path),
        "source_model": spec.source_model,
        "source_ref": {"kind": spec.models[spec.source_model].kind, "ref": spec.models[spec.source_model].ref},
        "source": arch_summary(source, c_src),
        "final": arch_summary(final, c_fin),
        "flops_seq_len": flops_seq,
        "flops_per_token_ratio": flops_per_token(c_fin, final, flops_seq) / flops_per_token(c_src, source, flops_seq),
        "stages": stages,
        **memory,
    }


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt_row(header), "  ".join("-" * w for w in widths)] + [fmt_row(r) for r in rows]


def _params_row(label: str, pair: list[int]) -> list[str]:
    a, b = pair
    return [label, f"{human_count(a)} ({a:,})", f"{human_count(b)} ({b:,})", f"{b / a:.3f}x"]


def render_plan(plan: dict[str, Any]) -> str:
    text = _render_recipe(plan)
    comparison = plan.get("comparison")
    if not comparison:
        return text
    rows = [[v["name"], "; ".join(v["changes"]) or "(as written)", " -> ".join(s["name"] for s in v["stages"]),
             f"{human_count(v['final']['params_total'])} ({v['final']['params_total']:,})",
             f"{v['flops_per_token_ratio']:.3f}x"] for v in comparison["variants"]]
    lines = ["", f"compare {comparison['name']}: {len(rows)} variants"]
    lines += ["    " + line for line in _table(rows, ["variant", "changes", "stages", "final params", "flops/token"])]
    return text + "\n" + "\n".join(lines)


def _teacher_line(st: dict[str, Any], source: dict[str, Any]) -> str:
    """Where a distillation's teacher logits come from, and what a cache of them costs."""
    if st["loss"] == "ce":
        return "no teacher: next-token cross-entropy on the text"
    if st.get("cache_k") is None:
        return "teacher online: its forward pass runs in every step"
    per_token = cache_bytes_per_token(st["cache_k"], source["vocab"], st["seq_len"])
    return (f"teacher logits cached: top {st['cache_k']} + tail per token ({per_token:.0f} bytes/token, "
            f"{human_count(per_token * st['tokens'])}B for the training tokens), computed once by stage "
            "teacher_logits and shared by every student that reads the same blocks")


def _render_recipe(plan: dict[str, Any]) -> str:
    src = plan["source"]
    ref = plan["source_ref"]
    out = [
        f"plan for {plan['spec']}",
        f"source model '{plan['source_model']}' = {ref['kind']}(\"{ref['ref']}\"): {src['model_type']}, "
        f"{human_count(src['params_total'])} params ({src['params_total']:,}), "
        f"{human_count(src['params_non_embedding'])} non-embedding",
        "",
        "stages: " + " -> ".join(s["name"] for s in plan["stages"]) if plan["stages"] else "stages: (none)",
    ]
    for i, st in enumerate(plan["stages"], 1):
        out.append("")
        kind = st["kind"]
        if kind == "prune":
            out.append(f"[{i}] {st['name']}: prune {st['prune']}"
                       + (f" (calibration data '{st['data']}')" if st.get("data") and (
                           st["prune"] != "depth" or st["saliency"]["kind"] != "task") else ""))
            if st["prune"] != "search":  # a search's shape is chosen when it runs
                rows = [[axis, str(a), str(b), f"{b / a:.3f}x" if a else "-"] for axis, (a, b) in st["axes"].items()]
                rows.append(_params_row("params", st["params_total"]))
                rows.append(_params_row("non-embedding", st["params_non_embedding"]))
                if st["params_active"] != st["params_total"]:
                    rows.append(_params_row("active per token", st["params_active"]))
                rows.append(["flops/token", "1", f"{st['flops_per_token_ratio']:.3f}", f"{st['flops_per_token_ratio']:.3f}x"])
                out.extend("    " + line for line in _table(rows, ["axis", "source", "target", "ratio"]))
            if st.get("host_memory"):
                mem = st["host_memory"]
                out.append(f"    host memory: {mem['total'] / 2**30:.1f} GiB peak, the source streamed from its files "
                           f"(student {mem['student'] / 2**30:.1f} + output head widened {mem['widened head'] / 2**30:.1f}"
                           f" + fingerprint logits {mem['fingerprint logits'] / 2**30:.1f} + process "
                           f"{mem['process'] / 2**30:.1f} GiB)")
            if st.get("not_emitted"):
                out.append(f"    not emitted (nor verified): {', '.join(st['not_emitted'])}")
            if st["prune"] == "search":
                out.extend(render_search(st))
            if st["prune"] in ("width", "search"):
                imp = st["importance"]
                experts = f", experts={imp['expert_score']}" if st["axes"].get("experts") and imp.get("expert_score") else ""
                out.append(f"    importance: {imp['method']} (samples={imp['samples']}, seq_len={imp['seq_len']}, "
                           f"batch={imp['batch_agg']}, seq={imp['seq_agg']}{experts})")
                if st.get("reconstruct"):
                    rec = st["reconstruct"]
                    out.append(f"    reconstruct: {rec['method']}(damp={rec['damp']:g}): the projections reading cut "
                               f"units refit from the calibration pass's moments")
            else:
                sal = st["saliency"]
                what = f"task {sal['task']} ({sal['shots']}-shot)" if sal["kind"] == "task" else f"{sal['kind']} on '{sal['data']}'"
                out.append(f"    saliency: {what}, contiguous={str(st['contiguous']).lower()}")
        elif kind in ("correct", "distill"):
            who = f"correct '{st['model']}'" if kind == "correct" else f"distill from '{st['teacher']}'"
            extra = f", method={st['method']}, order={st['order']}" if kind == "correct" else \
                f", loss={st['loss']}" + ("" if st["loss"] == "ce" else f", T={st['temperature']:g}")
            out.append(f"[{i}] {st['name']}: {who} on '{st['data']}'{extra}")
            if kind == "distill":
                out.append("    " + _teacher_line(st, plan["source"]))
                tc = st.get("teacher_correction")
                if tc:
                    out.append(f"    teacher corrected concurrently (order=concurrent): {tc['method']}, its first "
                               f"{tc['steps']:,} steps on the same batches, lr={tc['lr']:g} -> min_lr={tc['min_lr']:g}, "
                               f"{tc['schedule']}, warmup={tc['warmup']}; deepspeed zero={tc['zero']} {tc['precision']}")
            out.append(f"    {human_count(st['tokens'])} tokens ({st['tokens']:,}) = {st['steps']:,} steps x "
                       f"{st['tokens_per_step']:,} tokens/step (global_batch={st['global_batch']} x "
                       f"seq_len={st['seq_len']}, rounded up)")
            out.append(f"    lr={st['lr']:g} -> min_lr={st['min_lr']:g}, {st['schedule']}, warmup={st['warmup']}; "
                       f"deepspeed zero={st['zero']} {st['precision']}"
                       + (f"; validation every {st['val_every']} steps" if st.get("val_every") else ""))
        elif kind == "evaluate":
            tasks = ", ".join(f"{t['name']}({t['shots']}-shot)" for t in st["tasks"])
            if st["perplexity_data"]:
                on = ", ".join(f"'{d}'" for d in st["perplexity_data"])
                tasks = ", ".join(x for x in (tasks, f"perplexity on {on}") if x)
            out.append(f"[{i}] {st['name']}: {st['harness']}: {tasks}"
                       + (f", limit={st['limit']}" if st["limit"] else "")
                       + ("; inference speed, teacher against student" if st.get("speed") else ""))
    fin = plan["final"]
    if any(s.get("prune") == "search" for s in plan["stages"]):
        out += ["", "final student: the shape the search chooses when it runs"]
    else:
        out += [
            "",
            f"final {'student' if any(s['kind'] == 'prune' for s in plan['stages']) else 'model'}: {fin['model_type']} "
            + " ".join(f"{axis}={fin[axis]}" for axis, _ in AXES + MOE_AXES if axis in fin and axis != "head_dim")
            + f" head_dim={fin['head_dim']}",
            f"    {human_count(fin['params_total'])} total ({fin['params_total']:,}), "
            f"{human_count(fin['params_non_embedding'])} non-embedding ({fin['params_non_embedding']:,}), "
            + (f"{human_count(fin['params_active'])} active per token ({fin['params_active']:,}), "
               if fin["params_active"] != fin["params_total"] else "")
            + f"{plan['flops_per_token_ratio']:.3f}x the source's FLOPs/token at seq_len {plan['flops_seq_len']}",
        ]
    if "memory" in plan:
        out += ["", render_memory(plan["memory"])]
    return "\n".join(out)
