"""Width pruning end to end: export -> importance (one calibration pass) -> slice -> emit.

    program = export_dir(model_dir)                    # the one trace of the source (meta weights)
    program, report = prune_program(program, calib, target, importance)
    emitted = emit_pruned(program, out_dir, ...)       # checkpoint, .pt2, ONNX, fingerprint

`prune_width(...)` does all of it into the stage's directory. Invariants: keeping every unit
reproduces the source logits exactly; the emitted checkpoint and files reproduce the rewritten
graph's logits; its parameter count is that of its emitted config (`pdc.plan.counts`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from pdc.arch import Arch
from pdc.emit.checkpoint import source_dtype
from pdc.emit.fingerprint import prune_inputs
from pdc.emit.pruned import emit_pruned
from pdc.errors import PdcError
from pdc.files import write_json
from pdc.graph import importance as imp_mod
from pdc.graph.export import export_dir, materialize, source_arch
from pdc.graph.manager import PassManager
from pdc.graph.program import STAGE, Program
from pdc.graph.rewrite import materialize_sliced
from pdc.graph.storage import compute_in_fp32, return_freed_memory
from pdc.graph.structure import structure_of
from pdc.inputs.shards import Blocks
from pdc.lang.settings import ImportanceConfig, ReconstructConfig, WidthTarget
from pdc.passes.reconstruct_outputs import ReconstructOutputs
from pdc.passes.recompute_buffers import RecomputeBuffers
from pdc.passes.slice_heads import SliceHeads
from pdc.passes.slice_hidden import SliceHidden
from pdc.passes.slice_expert_mlp import SliceExpertMlp
from pdc.passes.slice_experts import SliceExperts
from pdc.passes.slice_mlp import SliceMlp
from pdc.passes.slice_shared_mlp import SliceSharedMlp
from pdc.plan.counts import count_arch
from pdc.plan.prune_host import streams
from pdc.plan.results import PruneResult, encode
from pdc.plotting import pyplot, save_figure
from pdc.stages.ranks import run_in_ranks


def check_target(arch: Arch, target: WidthTarget) -> tuple[int, int]:
    """Raise a one-line `PdcError` if `target` cannot be cut from `arch` (checked before any
    expensive work). Returns the (heads, kv_heads) the pruned model will have."""
    units = {"hidden": "hidden channels", "mlp": "MLP neurons", "heads": "query heads", "kv_heads": "kv heads",
             "experts": "experts per layer", "expert_mlp": "neurons per expert",
             "shared_mlp": "shared-expert neurons"}
    for axis, unit in units.items():
        want, have = getattr(target, axis), getattr(arch, axis)
        if want is not None and not 1 <= want <= have:
            raise PdcError(f"cannot keep {want} {unit}: the source has {have}", STAGE)
    if target.experts is not None and target.experts < arch.top_k:
        raise PdcError(f"cannot keep {target.experts} experts: the router picks {arch.top_k} per token", STAGE)
    new_kv = target.kv_heads if target.kv_heads is not None else arch.kv_heads
    rep = arch.heads // arch.kv_heads
    new_heads = target.heads if target.heads is not None else (
        new_kv * rep if target.kv_heads is not None else arch.heads)  # kv only: keep heads per group
    if new_heads % new_kv:
        raise PdcError(f"heads {new_heads} must be a multiple of kv_heads {new_kv}", STAGE)
    if new_heads // new_kv > rep:
        raise PdcError(f"cannot keep {new_heads // new_kv} query heads per kv group: the source has {rep}", STAGE)
    return new_heads, new_kv


def plan_passes(program: Program, scores: "imp_mod.Importance", target: WidthTarget,
                reconstruct: Optional[ReconstructConfig] = None) -> list:
    """Turn scores and target sizes into configured passes (hidden, mlp, heads); with
    `reconstruct`, the refit of the projections reading the cut units goes first (it needs their
    unsliced columns)."""
    arch = program.arch
    structure = structure_of(program)
    passes = []
    if target.hidden is not None and target.hidden != arch.hidden:
        passes.append(SliceHidden(imp_mod.top_k(scores.hidden, target.hidden)))
    if target.mlp is not None and target.mlp != arch.mlp:
        passes.append(SliceMlp({l.index: imp_mod.top_k(scores.mlp[l.index], target.mlp) for l in structure.layers
                                if l.mlp is not None}))
    new_heads, new_kv = check_target(arch, target)
    if (new_heads, new_kv) != (arch.heads, arch.kv_heads):
        keep_h, keep_kv = {}, {}
        for layer in structure.layers:
            a = layer.attn
            keep_h[layer.index], keep_kv[layer.index] = imp_mod.select_heads(
                scores.heads[layer.index], scores.kv_heads[layer.index], a.heads, a.kv_heads, new_heads, new_kv)
        passes.append(SliceHeads(keep_h, keep_kv))
    passes += _expert_passes(structure, scores, target)
    if reconstruct is not None:
        passes = _reconstruct_pass(passes, scores, reconstruct) + passes
    if passes:  # buffers derived from the config (Gemma's sqrt(hidden) scale) follow the new sizes
        passes.append(RecomputeBuffers())
    return passes


def _reconstruct_pass(passes: list, scores: "imp_mod.Importance", config: ReconstructConfig) -> list:
    """The refit of every projection whose input units a slicing pass in `passes` cuts."""
    keep = {}
    for p in passes:
        if isinstance(p, SliceMlp):
            keep.update({("mlp", i): k for i, k in p.keep.items()})
        elif isinstance(p, SliceHeads):
            keep.update({("heads", i): k for i, k in p.keep_heads.items()})
        elif isinstance(p, SliceSharedMlp):
            keep.update({("shared_mlp", i): k for i, k in p.keep.items()})
    return [ReconstructOutputs(keep, scores.grams, config.damp)] if keep else []


def _expert_passes(structure, scores: "imp_mod.Importance", target: WidthTarget) -> list:
    """Experts first (each layer keeps its best `experts`), then each kept expert's own best
    `expert_mlp` neurons, then the shared experts' neurons."""
    moe = structure.moe_layers()
    passes = []
    kept = {l.index: torch.arange(l.moe.experts) for l in moe}
    if target.experts is not None and any(l.moe.experts != target.experts for l in moe):
        kept = {l.index: imp_mod.top_k(scores.experts[l.index], target.experts) for l in moe}
        passes.append(SliceExperts(kept))
    if target.expert_mlp is not None and any(l.moe.size != target.expert_mlp for l in moe):
        passes.append(SliceExpertMlp({
            l.index: torch.stack([imp_mod.top_k(row, target.expert_mlp) for row in scores.expert_mlp[l.index][kept[l.index]]])
            for l in moe}))
    shared = [l for l in moe if l.moe.shared is not None]
    if target.shared_mlp is not None and any(l.moe.shared.size != target.shared_mlp for l in shared):
        passes.append(SliceSharedMlp({l.index: imp_mod.top_k(scores.shared_mlp[l.index], target.shared_mlp)
                                      for l in shared}))
    return passes


def prune_program(program: Program, calib: Optional[torch.Tensor], target: WidthTarget,
                  importance: ImportanceConfig, progress: bool = True, batch_size: int = 8,
                  scores: Optional["imp_mod.Importance"] = None,
                  reconstruct: Optional[ReconstructConfig] = None,
                  dtype: torch.dtype = torch.float32) -> tuple[Program, dict]:
    """Rank (unless `scores` were computed elsewhere: several ranks), (with `reconstruct`) refit,
    slice and (for meta sources) read the kept weights, stored as `dtype` (narrower than fp32:
    computed in fp32 all the same, `pdc.graph.storage`). Returns the program (rewritten in place)
    and a report {"importance": Importance, "passes": [...], "seconds": {...}}."""
    seconds = {}
    if importance.method == "activation" and calib is None:
        raise PdcError("activation importance needs calibration blocks", STAGE)
    if scores is None:
        scores = imp_mod.compute(program, calib, importance, batch_size=batch_size, progress=progress,
                                 grams=reconstruct is not None)
    seconds["importance"] = scores.seconds
    if reconstruct is not None:
        seconds["reconstruct_moments"] = scores.gram_seconds  # inside the importance pass's time
    start = time.perf_counter()
    passes = plan_passes(program, scores, target, reconstruct)
    manager = PassManager(passes, progress=progress)
    results = manager.run(program)
    seconds["slicing"] = time.perf_counter() - start
    for r in results:
        if r.name == ReconstructOutputs.name:
            seconds["reconstruct_solve"] = r.seconds
    if program.on_meta():
        start = time.perf_counter()
        materialize_sliced(program, dtype=dtype, progress=progress)
        compute_in_fp32(program)
        seconds["read_weights"] = time.perf_counter() - start
    return program, {"importance": scores, "passes": results, "seconds": seconds}


def prune_width(model_dir: Path, calib: Optional[Blocks | torch.Tensor], target: WidthTarget,
                importance: ImportanceConfig, out_dir: Path, progress: bool = True,
                stream_weights: Optional[bool] = None, batch_size: int = 8, deploy: bool = True, pt2: bool = True, onnx: bool = True,
                nproc: int = 1, work_dir: Optional[Path] = None,
                reconstruct: Optional[ReconstructConfig] = None) -> PruneResult:
    """Prune the checkpoint in `model_dir` to `target` and write into `out_dir` (the caller's
    staging directory): model/, kept_indices.json, importance.json, importance.png and, with
    `deploy`, program.pt2 (with `pt2`) and model.onnx (with `onnx`), each verified (the checkpoint too). `stream_weights` (default: only for checkpoints over
    4 GiB) keeps the source weights on disk during calibration and reads each one per use, and
    keeps the student's weights in the source's precision (bf16 stays bf16). With
    `nproc` > 1, activation importance runs on that many ranks of this node
    (`pdc.stages.prune_ranks`, job files in `work_dir`). `reconstruct` refits the projections
    reading the cut units from moments summed in the same calibration pass."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    shards = calib if isinstance(calib, Blocks) else None
    if shards is not None:
        calib = shards.read()
    in_ranks = nproc > 1 and importance.method == "activation"
    if in_ranks and (shards is None or work_dir is None):
        raise PdcError("importance on several processes needs a work directory and token shards", STAGE)
    seconds = {}
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise PdcError(f"no config.json in {model_dir}", STAGE)
    check_target(source_arch(json.loads(config_path.read_text())), target)  # fail before exporting
    start = time.perf_counter()
    program = export_dir(model_dir, progress=progress)
    structure_of(program)  # a graph pdc cannot classify fails here, before any weight is read
    seconds["export"] = time.perf_counter() - start
    arch_before = program.arch
    if stream_weights is None:
        stream_weights = streams(model_dir)
    if stream_weights:
        return_freed_memory()  # weights read one at a time must not pile up in malloc's heap
    scores = None
    if in_ranks:
        start = time.perf_counter()
        job = {"kind": "importance", "model": str(model_dir.resolve()), "calibration": shards.to_json(),
               "config": encode(importance), "batch_size": batch_size, "stream": bool(stream_weights)}
        if reconstruct is not None:
            job.update(grams=True, work_dir=str(Path(work_dir).resolve()))
        got = run_in_ranks("pdc.stages.prune_ranks", job, nproc, work_dir, STAGE, "activation importance")
        scores = imp_mod.Importance.from_json(got["scores"], got["tokens"])
        if reconstruct is not None:  # rank 0 saved the all-reduced moments beside the job
            scores.grams = torch.load(Path(got["grams"]), weights_only=True)
        scores.seconds = time.perf_counter() - start
    elif not stream_weights and importance.method == "activation":
        start = time.perf_counter()
        materialize(program, progress=progress)
        seconds["load_weights"] = time.perf_counter() - start
    # a streamed (large) source's student keeps its precision; small ones stay fp32 as before
    dtype = source_dtype(program.hf_config) if stream_weights else torch.float32
    program, report = prune_program(program, calib, target, importance, progress, batch_size, scores, reconstruct,
                                    dtype)
    seconds.update(report["seconds"])
    params_after = program.num_params()  # emit_pruned checks it against the emitted config
    emitted = emit_pruned(program, out_dir, model_dir, calib, deploy=deploy, pt2=pt2, onnx=onnx, progress=progress)
    seconds.update(emitted.seconds)
    scores = report["importance"]
    write_json(out_dir / "importance.json", scores.to_json(), indent=None)
    plot_importance(scores, program.kept, out_dir / "importance.png")
    start = time.perf_counter()
    inputs = prune_inputs(model_dir, calib, program.probe)
    seconds["hash_inputs"] = time.perf_counter() - start
    result = PruneResult(
        kind="width", params_before=count_arch(program.hf_config, arch_before).total, params_after=params_after,
        arch_before=arch_before.sizes(), arch_after=program.arch.sizes(), kept=program.kept,
        seconds={k: round(v, 3) for k, v in seconds.items()}, inputs=inputs, fingerprint=emitted.fingerprint,
        importance=importance.method, calibration_tokens=scores.tokens, artifacts=emitted.artifacts,
        plot="importance.png", reconstruct=_reconstruct_record(reconstruct, program),
    )
    if progress:
        print(format_summary(result))
    return result


def _reconstruct_record(config: Optional[ReconstructConfig], program: Program) -> Optional[dict]:
    """What the lock and stage.json record of a reconstruction: the method, its damping and the
    mean relative output error on the calibration tokens per projection kind, plain and refit."""
    if config is None:
        return None
    return {"method": config.method, "damp": config.damp, "error": program.meta.get("reconstruct", {})}


def format_summary(result: PruneResult) -> str:
    rows = [("params before", f"{result.params_before:,}"), ("params after", f"{result.params_after:,}")]
    rows += [(f"time {k}", f"{v:.2f} s") for k, v in result.seconds.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:>16}" for k, v in rows)


def plot_importance(scores: "imp_mod.Importance", kept: dict, path: Path) -> None:
    """Hidden channels sorted with the cut line; per-layer sorted MLP neuron scores with the cut;
    per-layer head scores (kept heads filled)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 4 if scores.experts else 3, figsize=(20 if scores.experts else 15, 4))
    h = scores.hidden.sort(descending=True).values
    axes[0].plot(h.numpy())
    axes[0].axvline(len(kept["hidden"]) - 0.5, color="red", ls="--", label=f"keep {len(kept['hidden'])}")
    axes[0].set(title="hidden channels (sorted)", xlabel="rank", ylabel="importance", yscale="log")
    axes[0].legend()
    cmap = plt.get_cmap("viridis")
    n = max(1, len(scores.mlp))
    for i, s in sorted(scores.mlp.items()):
        axes[1].plot(s.sort(descending=True).values.numpy(), color=cmap(i / n), lw=0.8)
    keep_mlp = len(next(iter(kept["layers"].values()))["mlp"]) if kept["layers"] else 0
    axes[1].axvline(keep_mlp - 0.5, color="red", ls="--", label=f"keep {keep_mlp}")
    axes[1].set(title="MLP neurons per layer (sorted; colour = depth)", xlabel="rank", yscale="log")
    axes[1].legend()
    if scores.heads:
        grid = torch.stack([scores.heads[i] for i in sorted(scores.heads)])
        im = axes[2].imshow(grid.numpy(), aspect="auto", cmap="magma")
        fig.colorbar(im, ax=axes[2])
        for li, key in enumerate(sorted(kept["layers"], key=int)):
            if li < grid.shape[0]:
                for hd in kept["layers"][key]["heads"]:
                    axes[2].plot(hd, li, "c.", ms=3)
        axes[2].set(title="head importance (dots = kept)", xlabel="head", ylabel="layer")
    if scores.experts:
        grid = torch.stack([scores.experts[i] for i in sorted(scores.experts)])
        im = axes[3].imshow(grid.numpy(), aspect="auto", cmap="magma")
        fig.colorbar(im, ax=axes[3])
        keys = [k for k in sorted(kept["layers"], key=int) if "experts" in kept["layers"][k]]
        for li, key in enumerate(keys[: grid.shape[0]]):
            for e in kept["layers"][key]["experts"]:
                axes[3].plot(e, li, "c.", ms=5)
        axes[3].set(title=f"expert importance ({scores.expert_score or scores.method}; dots = kept)",
                    xlabel="expert", ylabel="layer")
    fig.suptitle(f"{scores.method} importance")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
