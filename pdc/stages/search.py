"""`prune search`: choose the student's shape under budgets, then prune to it.

    result = prune_search(model_dir, calib, cfg, out_dir, distill=ShortDistill(...))

1. The space (`pdc.plan.search_space`): every combination of axis sizes with its exact counts;
   those within the budgets and near the parameter budget are ranked. A latency budget is
   checked on per-layer costs fitted to measured shapes (`pdc.stages.search_latency`).
2. One calibration pass: activation importance of every unit (as `prune width` computes it) and,
   when depth is searched, the loss saliency of each single layer (as `prune depth` scores it with
   contiguous=false); a candidate keeps the top units of each axis and drops its least salient
   layers. Cheap score: the candidate's LM loss on the calibration blocks, without training.
3. The top K by the cheap score are emitted and distilled `steps` steps each from the teacher's
   cached logits (one teacher pass fills the cache every student reads); the lowest validation
   loss wins. Both rankings and whether distillation reordered them go to `search.json`.
4. The winner is pruned and emitted as `prune width` would (model/, kept_indices.json, lock).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from pdc.emit.fingerprint import prune_inputs
from pdc.emit.pruned import emit_pruned
from pdc.errors import PdcError
from pdc.files import write_json
from pdc.graph import importance as imp_mod
from pdc.graph.export import export_dir, materialize
from pdc.graph.manager import PassManager
from pdc.graph.program import Program
from pdc.inputs.shards import Blocks
from pdc.lang.search_settings import SearchConfig
from pdc.lang.settings import DepthTarget, TrainConfig, WidthTarget
from pdc.passes.drop_layers import DropLayers
from pdc.plan.counts import count_arch
from pdc.plan.results import PruneResult
from pdc.plan.search_space import Candidate, arch_of, plan_space, source_sizes
from pdc.plan.training import Launch
from pdc.stages.depth_on_program import program_nll
from pdc.stages.distill import run_distill
from pdc.stages.prune_depth import choose, saliency_table
from pdc.stages.prune_width import plan_passes
from pdc.stages.search_plot import plot_pareto
from pdc.stages.teacher_logits import compute_teacher_logits

STAGE = "prune"


@dataclass
class ShortDistill:
    """What ranking by short distillation needs: the teacher, its blocks and the training
    settings of the recipe's distillation (steps replaced by the search's)."""

    teacher_dir: Path
    train: Blocks
    val: Blocks
    cfg: TrainConfig
    work_dir: Path
    launch: Launch = Launch()


def layer_order(program: Program, cfg: SearchConfig, blocks: torch.Tensor, progress: bool) -> dict:
    """Each single layer's saliency on `program` (the `prune depth` table with contiguous=false);
    `drop(n)` picks the n least salient as `prune depth` would."""
    n = program.arch.layers
    return saliency_table(program, DepthTarget(n - 1, cfg.saliency, contiguous=False), blocks, progress=progress)


def drop_for(table: Optional[dict], depth: int, layers: int) -> list[int]:
    if depth == layers:
        return []
    cands = [c["layers"] for c in table["candidates"]]
    return choose(cands, [c["value"] for c in table["candidates"]], table["kind"], layers - depth, False)


def cut(program: Program, scores, cand: Candidate, table: Optional[dict]) -> Program:
    """A copy of `program` cut to `cand`: its top units per axis, its least salient layers dropped."""
    out = program.clone()
    s = cand.sizes
    passes = plan_passes(out, scores, WidthTarget(hidden=s["hidden"], mlp=s["mlp"], heads=s["heads"]))
    drop = drop_for(table, s["depth"], program.arch.layers)
    if drop:
        passes.append(DropLayers(drop))
    PassManager(passes, progress=False).run(out)
    return out


def prune_search(model_dir: Path, calib: torch.Tensor, cfg: SearchConfig, out_dir: Path,
                 distill: Optional[ShortDistill] = None, latency: Optional[Callable] = None,
                 progress: bool = True, deploy: bool = True) -> PruneResult:
    """Search, rank and emit the chosen student into `out_dir` (see the module docstring).
    `latency(source_cfg, source, limit) -> LatencyFit` measures and fits when a latency budget
    is set. Hand-written recipes (`mark(...)`) get the cheap score too, for the Pareto plot."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    seconds: dict = {}
    source_cfg = json.loads((model_dir / "config.json").read_text())
    program = export_dir(model_dir, progress=progress)
    source = program.arch
    start = time.perf_counter()
    fit = None
    if cfg.limit("latency") is not None:
        if latency is None:
            raise PdcError("a latency budget needs latency measurements (none were given)", STAGE)
        fit = latency(source_cfg, source, cfg.limit("latency"))
        space, cands = plan_space(source_cfg, source, cfg, fit.predict, fit.predict(source))
    else:
        space, cands = plan_space(source_cfg, source, cfg)
    seconds["space"] = time.perf_counter() - start
    if not space.ranked:
        raise PdcError(f"no candidate of the {space.size} meets the budgets "
                       f"({', '.join(l.describe() for l in cfg.limits)})", STAGE)
    if progress:
        print(f"[pdc] {STAGE}: search space {space.size} shapes, {space.representable} representable, "
              f"{space.feasible} within the budgets, {len(space.ranked)} near the parameter budget ranked")
    start = time.perf_counter()
    materialize(program, progress=progress)
    scores = imp_mod.compute(program, calib, cfg.importance, progress=progress)
    seconds["importance"] = time.perf_counter() - start
    table = None
    start = time.perf_counter()
    if any(c.sizes["depth"] != source.layers for c in space.ranked):
        table = layer_order(program, cfg, calib[: cfg.samples], progress)
    seconds["saliency"] = time.perf_counter() - start
    blocks = calib[: cfg.samples]
    start = time.perf_counter()
    cheap = []
    for cand in tqdm(space.ranked, desc="cheap score (LM loss, no training)", disable=not progress):
        cheap.append(program_nll(cut(program, scores, cand, table), blocks))
    seconds["cheap_score"] = time.perf_counter() - start
    by_cheap = sorted(range(len(cheap)), key=lambda i: cheap[i])
    top = by_cheap[: cfg.top]
    distilled: dict[int, float] = {}
    if distill is not None and cfg.steps > 0:
        start = time.perf_counter()
        distilled = short_distill(program, scores, table, [space.ranked[i] for i in top], distill, cfg, out_dir,
                                  model_dir, calib, progress)
        distilled = {top[j]: v for j, v in distilled.items()}
        seconds["short_distill"] = time.perf_counter() - start
    chosen = min(top, key=lambda i: distilled[i]) if distilled else by_cheap[0]
    winner = space.ranked[chosen]
    start = time.perf_counter()
    final = cut(program, scores, winner, table)
    params_after = final.num_params()
    emitted = emit_pruned(final, out_dir, model_dir, calib, deploy=deploy, progress=progress)
    seconds.update(emitted.seconds, emit_chosen=time.perf_counter() - start)
    search = search_record(cfg, space, cheap, by_cheap, top, distilled, chosen, table, fit, source, source_cfg)
    search["hand"] = hand_scores(cfg, program, scores, table, space.ranked, search["candidates"], source_cfg, blocks,
                                 fit)
    write_json(out_dir / "search.json", search)
    plot_pareto(search, out_dir / "pareto.png", search["hand"])
    result = PruneResult(
        kind="search", params_before=count_arch(source_cfg, source).total, params_after=params_after,
        arch_before=source.sizes(), arch_after=final.arch.sizes(), kept=final.kept,
        seconds={k: round(v, 3) for k, v in seconds.items()}, inputs=prune_inputs(model_dir, calib, final.probe),
        fingerprint=emitted.fingerprint, importance=cfg.importance.method, calibration_tokens=scores.tokens,
        artifacts=emitted.artifacts, plot="pareto.png", search=search,
    )
    if progress:
        print(f"[pdc] {STAGE}: chose {winner.label} ({winner.params:,} params), cheap rank "
              f"{by_cheap.index(chosen) + 1}, reordered by distillation: {search['reordered']}")
    return result


def hand_scores(cfg: SearchConfig, program: Program, scores, table, ranked: list[Candidate], rows: list[dict],
                source_cfg: dict, blocks: torch.Tensor, fit) -> dict:
    """{name: {sizes, params, cheap_loss, distill_loss, latency}} of each `mark(...)` recipe;
    a recipe that is one of the ranked candidates takes that candidate's scores."""
    out = {}
    for name, given in cfg.hand:
        sizes = dict(source_sizes(program.arch), **dict(given))
        same = next((r for c, r in zip(ranked, rows) if c.sizes == sizes), None)
        if same is not None:
            out[name] = {k: same[k] for k in ("sizes", "params", "cheap_loss", "distill_loss", "latency")}
            continue
        cand = Candidate(sizes, arch_of(program.arch, sizes), count_arch(source_cfg, arch_of(program.arch, sizes)).total)
        out[name] = {"sizes": sizes, "params": cand.params, "cheap_loss": program_nll(cut(program, scores, cand, table), blocks),
                     "distill_loss": None, "latency": fit.predict(cand.arch) if fit else None}
    return out


def short_distill(program, scores, table, cands: list[Candidate], d: ShortDistill, cfg: SearchConfig, out_dir: Path,
                  model_dir: Path, calib: torch.Tensor, progress: bool) -> dict[int, float]:
    """Distill each candidate `cfg.steps` steps from one teacher-logit cache; {index: val loss}."""
    train = dataclasses.replace(d.cfg, steps=cfg.steps, tokens=None, checkpoint_every=max(cfg.steps, 1))
    cache = None
    if train.cache_k is not None:
        cache = compute_teacher_logits(d.teacher_dir, d.train, d.val, train, d.work_dir / "teacher_logits",
                                       progress=progress).cache_dir
    out = {}
    for j, cand in enumerate(cands):
        where = d.work_dir / f"candidate{j}"
        emit_pruned(cut(program, scores, cand, table), where / "pruned", model_dir, calib, deploy=False)
        res = run_distill(d.teacher_dir, where / "pruned" / "model", d.train, d.val, train, where / "work",
                          where / "distilled", progress=progress, launch=d.launch, teacher_cache=cache)
        out[j] = res.val_loss_end
    return out


def search_record(cfg, space, cheap, by_cheap, top, distilled, chosen, table, fit, source, source_cfg) -> dict:
    """Everything the choice depends on (the lock holds it): the space, every score, both ranks."""
    rows = []
    for i, cand in enumerate(space.ranked):
        rows.append({"sizes": cand.sizes, "params": cand.params, "memory": cand.memory,
                     "latency": cand.latency, "cheap_loss": cheap[i], "cheap_rank": by_cheap.index(i) + 1,
                     "distill_loss": distilled.get(i),
                     "distill_rank": (sorted(distilled, key=distilled.get).index(i) + 1) if i in distilled else None,
                     "dropped_layers": drop_for(table, cand.sizes["depth"], source.layers) if table else []})
    return {
        "limits": [dataclasses.asdict(l) for l in cfg.limits],
        "figures": space.figures,
        "axes": dict(cfg.axes), "keep": cfg.keep, "slack": cfg.slack, "top": cfg.top, "steps": cfg.steps,
        "space_size": space.size, "representable": space.representable, "feasible": space.feasible,
        "source": {"sizes": source_sizes(source), "params": count_arch(source_cfg, source).total},
        "candidates": rows,
        "chosen": chosen,
        "chosen_sizes": space.ranked[chosen].sizes,
        "chosen_cheap_rank": by_cheap.index(chosen) + 1,
        # distillation reordered the top K when its order differs from the cheap score's
        "reordered": bool(distilled) and sorted(top, key=lambda i: distilled[i]) != list(top),
        "layer_saliency": None if table is None else {"kind": table["kind"], "values": [c["value"] for c in table["candidates"]]},
        "latency_fit": None if fit is None else fit.to_json(),
    }
