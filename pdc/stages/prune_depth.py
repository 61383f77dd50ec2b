"""Depth pruning: score which decoder layers matter least, drop them from the exported program,
emit every output from it.

Every saliency kind is scored on the program itself (`pdc.stages.depth_on_program`): each
candidate is the program with `drop_layers` applied to a copy of its graph that shares the weights;
task saliency runs lm-eval on it through a thin model wrapper (`ProgramLM`). The choice is then
applied to the program by `pdc.passes.drop_layers.DropLayers` under the `PassManager`, and the
checkpoint, `program.pt2`, ONNX and the lock's fingerprints are all emitted from the rewritten
program (`pdc.emit.pruned`), exactly as for width pruning: one representation is scored, emitted
and locked. A source over 4 GiB scored by loss or cosine on one process is never loaded: exported
on the meta device, scored with its weights read per use from the safetensors files, cut, and only
the kept layers read (in the source's precision, as width pruning does).

Saliency kinds (`pdc.lang.settings.Saliency.kind`):

- `loss`: token-weighted mean next-token NLL on held-out blocks; lower after removal = less
  important. The paper's Figure 7 (LM loss against the start of the removed block).
- `task`: accuracy on an lm-eval / local multiple-choice task; higher after removal = less
  important. The paper's Figure 8 (per-layer accuracy drop).
- `cosine`: block influence, 1 - cos(hidden state entering the block, hidden state leaving it),
  averaged over tokens; from one pass of the *full* model (no removal needed). Lower = less
  important.

Candidates: with `contiguous=True`, every run of `drop = layers - depth` consecutive layers; the
best-scoring run is dropped. With `contiguous=False`, every single layer is scored on its own and
the `drop` least important are dropped together (the non-contiguous choice).

Invariants: the chosen layers are exactly the arg-best candidate of the written saliency table; the
emitted checkpoint computes what the rewritten program computes (the source with those layers'
residual updates skipped: same weights, layers renumbered 0..depth-1), and its config's
`num_hidden_layers` and per-layer lists follow.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import AutoTokenizer

from pdc.emit.checkpoint import source_dtype
from pdc.emit.fingerprint import prune_inputs
from pdc.emit.pruned import emit_pruned
from pdc.errors import PdcError
from pdc.files import write_json
from pdc.graph.export import export_dir, export_model
from pdc.graph.manager import PassManager
from pdc.graph.probe import default_probe
from pdc.graph.program import Program
from pdc.graph.rewrite import materialize_sliced
from pdc.graph.storage import compute_in_fp32, return_freed_memory
from pdc.inputs.data import take
from pdc.inputs.models import load_causal_lm
from pdc.inputs.shards import Blocks
from pdc.lang.settings import DepthTarget, Saliency
from pdc.passes.drop_layers import DropLayers
from pdc.plan.counts import count_arch
from pdc.plan.prune_host import streams
from pdc.plan.results import Candidate, PruneResult, SaliencyResult, decode, encode
from pdc.plotting import pyplot, save_figure
from pdc.stages.depth_on_program import (STAGE, check_saliency_inputs, measure, score_candidates, scoring_program,
                                         task_items_seen, without)
from pdc.stages.ranks import run_in_ranks, worker_main


_METRIC = {
    # kind: (metric name in tables, better when "lower"/"higher" for the model after removal)
    "loss": ("val_loss", "lower"),
    "task": ("accuracy", "higher"),
    "cosine": ("block_influence", "lower"),
}


# ---- candidates and saliency ---------------------------------------------------------------------
def candidates(n_layers: int, depth: int, contiguous: bool) -> list[list[int]]:
    """Layer sets to score: every run of `n_layers - depth` consecutive layers, or single layers."""
    if not 1 <= depth <= n_layers:
        raise PdcError(f"depth {depth} must be between 1 and the model's {n_layers} layers", STAGE)
    drop = n_layers - depth
    if drop == 0:
        return []
    if contiguous:
        return [list(range(s, s + drop)) for s in range(n_layers - drop + 1)]
    return [[i] for i in range(n_layers)]


def choose(cands: Sequence[Sequence[int]], values: Sequence[float], kind: str, n_drop: int, contiguous: bool) -> list[int]:
    """Layers to drop: the best contiguous candidate, or the `n_drop` best single layers.
    "Best" = the model loses least: lowest loss / influence, highest accuracy; ties go to the
    later layers (the paper observes the last layers but one are the most redundant)."""
    sign = -1.0 if _METRIC[kind][1] == "higher" else 1.0
    order = sorted(range(len(cands)), key=lambda c: (sign * values[c], -cands[c][0]))
    if contiguous:
        return list(cands[order[0]])
    return sorted(cands[c][0] for c in order[:n_drop])


def saliency_table(program: Program, target: DepthTarget, blocks=None, tokenizer=None, tasks_dir=None,
                   batch_size: int = 4, progress: bool = True, scorer: Callable | None = None) -> dict:
    """Score all candidates of `program` and choose; the JSON-able table written to
    `saliency.json`. `program` is the one candidates are scored on (`scoring_program`);
    `scorer(cands, blocks) -> (values, baseline)` replaces `score_candidates` in this process (the
    scores of several ranks)."""
    task_items_seen()  # counts from before this table are not its own
    n_layers = program.arch.layers
    cands = candidates(n_layers, target.depth, target.contiguous)
    n_drop = n_layers - target.depth
    sal = target.saliency
    if sal.kind not in _METRIC:
        raise PdcError(f"unknown depth saliency {sal.kind!r} (expected loss, task or cosine)", STAGE)
    if blocks is not None and sal.samples and len(blocks) > sal.samples:
        blocks = take(blocks, sal.samples)
    if not cands:
        values, baseline = [], None
    elif scorer is not None:
        values, baseline = scorer(cands, blocks)
    else:
        values, baseline = score_candidates(program, cands, sal, blocks, tokenizer, tasks_dir, batch_size, progress)
    chosen = choose(cands, values, sal.kind, n_drop, target.contiguous) if cands else []
    if not cands or sal.kind == "cosine":
        after = None
    elif target.contiguous:
        after = values[cands.index(chosen)]
    else:  # single layers were scored alone; measure them removed together
        after = measure(without(program, chosen), sal, blocks, tokenizer, tasks_dir, batch_size)
    items = task_items_seen()
    metric, better = _METRIC[sal.kind]
    return {
        "kind": sal.kind,
        "metric": metric,
        "better": better,  # for the model after removal; the chosen candidate is the best
        "contiguous": target.contiguous,
        "layers": n_layers,
        "depth": target.depth,
        "drop": n_drop,
        "baseline": baseline,
        "task": sal.task if sal.kind == "task" else None,
        "shots": sal.shots if sal.kind == "task" else None,
        # task items each candidate was scored on (one count when all agree): its standard error
        "items": items.pop() if sal.kind == "task" and len(items) == 1 else None,
        "blocks": None if blocks is None else list(blocks.shape),
        "candidates": [{"layers": list(c), "value": v} for c, v in zip(cands, values)],
        "dropped_layers": chosen,
        "after_drop": after,  # metric with all dropped layers removed (loss/task)
    }


def plot_saliency(table: dict, path: Path) -> Path:
    """PNG: metric against block start (contiguous) or per layer with the dropped ones marked."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    starts = [c["layers"][0] for c in table["candidates"]]
    values = [c["value"] for c in table["candidates"]]
    dropped = set(table["dropped_layers"])
    label = {"val_loss": "LM validation loss", "accuracy": "task accuracy", "block_influence": "block influence (1 - cos)"}[table["metric"]]
    if table["contiguous"]:
        ax.plot(starts, values, marker="o", lw=1.5, label=f"{table['drop']} layers removed")
        best = table["dropped_layers"][0] if table["dropped_layers"] else None
        if best is not None:
            ax.scatter([best], [values[starts.index(best)]], s=120, facecolors="none", edgecolors="red", lw=2,
                       label=f"chosen: layers {table['dropped_layers'][0]}-{table['dropped_layers'][-1]}", zorder=3)
        ax.set_xlabel("first removed layer (block start)")
    else:
        ax.plot(starts, values, marker="o", lw=1.5, label="one layer removed")
        marked = [s for s in starts if s in dropped]
        ax.scatter(marked, [values[starts.index(s)] for s in marked], s=120, color="tab:red", zorder=3,
                   label=f"dropped ({len(dropped)}): {sorted(dropped)}")
        ax.set_xlabel("removed layer")
    if table.get("baseline") is not None:
        ax.axhline(table["baseline"], color="gray", ls="--", lw=1, label="no layer removed")
    ax.set_ylabel(label)
    title = f"depth saliency: {table['kind']}" + (f" ({table['task']}, {table['shots']}-shot)" if table.get("task") else "")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return path


# ---- the stage -----------------------------------------------------------------------------------
def load_source(model_dir: Path, saliency: Saliency, progress: bool = False, streaming: bool = True):
    """(program, HF model or None, tokenizer or None, seconds) of the checkpoint in `model_dir`.
    Loaded and exported (the program shares the model's weights); with `streaming`, a source over
    4 GiB scored by loss or cosine is exported on the meta device instead and never loaded."""
    seconds = {}
    config = json.loads((model_dir / "config.json").read_text())
    if streaming and saliency.kind != "task" and streams(model_dir):
        start = time.perf_counter()
        program = export_dir(model_dir, progress=progress)
        seconds["export"] = time.perf_counter() - start
        return_freed_memory()
        return program, None, None, seconds
    start = time.perf_counter()
    model = load_causal_lm(model_dir, STAGE)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # loss/cosine saliency need no tokenizer; `task` reports it when needed
        tokenizer = None
    seconds["load_weights"] = time.perf_counter() - start
    start = time.perf_counter()
    program = export_model(model, default_probe(model.config.vocab_size, model_dir), hf_config=config)
    seconds["export"] = time.perf_counter() - start
    return program, model, tokenizer, seconds


def prune_depth(
    model_dir: Path,
    target: DepthTarget,
    blocks: torch.Tensor | None,
    out_dir: Path,
    tasks_dir: Path | None = None,
    progress: bool = True,
    batch_size: int = 4,
    deploy: bool = True,
    nproc: int = 1,
    work_dir: Path | None = None,
    pt2: bool = True,
    onnx: bool = True,
) -> PruneResult:
    """Score, choose and drop layers of the checkpoint in `model_dir`; write into `out_dir` (the
    caller's staging directory): `model/` (HF checkpoint + tokenizer), `kept_indices.json`,
    `saliency.json`, `saliency.png` and, with `deploy`, `program.pt2` (with `pt2`) and `model.onnx` (with `onnx`), each verified (the checkpoint too). With
    `nproc` > 1 the candidates are scored on that many ranks of this node (`pdc.stages.ranks`,
    job files in `work_dir`)."""
    model_dir = Path(model_dir)
    shards = blocks if isinstance(blocks, Blocks) else None
    if shards is not None:
        blocks = shards.read()
    if not (model_dir / "config.json").exists():
        raise PdcError(f"no Hugging Face checkpoint in {model_dir} (config.json missing)", STAGE)
    config = json.loads((model_dir / "config.json").read_text())
    program, model, tokenizer, seconds = load_source(model_dir, target.saliency, progress, streaming=nproc == 1)
    candidates(program.arch.layers, target.depth, target.contiguous)  # fail before any work
    check_saliency_inputs(target.saliency, blocks, tokenizer)
    arch_before = program.arch
    start = time.perf_counter()
    scoring = scoring_program(program, model, target.saliency)
    scorer = None
    if nproc > 1:
        if work_dir is None or (blocks is not None and shards is None):
            raise PdcError("depth saliency on several processes needs a work directory and token shards", STAGE)
        job = {"kind": "saliency", "model": str(model_dir.resolve()), "target": encode(target),
               "blocks": shards.to_json() if shards is not None else None,
               "tasks_dir": str(Path(tasks_dir).resolve()) if tasks_dir else None, "batch_size": batch_size}

        def scorer(cands, _blocks):
            got = run_in_ranks("pdc.stages.prune_depth", job, nproc, work_dir, STAGE, "depth saliency")
            return got["values"], got["baseline"]
    table = saliency_table(scoring, target, blocks, tokenizer, tasks_dir, batch_size, progress, scorer)
    del scoring
    seconds["saliency"] = time.perf_counter() - start
    dropped = table["dropped_layers"]
    start = time.perf_counter()
    PassManager([DropLayers(dropped)]).run(program)
    seconds["drop_layers"] = time.perf_counter() - start
    del model  # the program holds the surviving weights
    if program.on_meta():  # a streamed source: read the kept layers, in the source's precision
        start = time.perf_counter()
        materialize_sliced(program, dtype=source_dtype(config), progress=progress)
        compute_in_fp32(program)
        seconds["read_weights"] = time.perf_counter() - start
    params_after = program.num_params()  # emit_pruned checks it against the emitted config
    emitted = emit_pruned(program, out_dir, model_dir, blocks, deploy=deploy, pt2=pt2, onnx=onnx, progress=progress)
    seconds.update(emitted.seconds)
    write_json(out_dir / "saliency.json", table)
    plot_saliency(table, out_dir / "saliency.png")
    start = time.perf_counter()
    inputs = prune_inputs(model_dir, blocks, program.probe,
                          tasks_dir if target.saliency.kind == "task" else None)
    seconds["hash_inputs"] = time.perf_counter() - start
    saliency = SaliencyResult(
        kind=table["kind"], metric=table["metric"], better=table["better"], contiguous=table["contiguous"],
        task=table["task"], shots=table["shots"], baseline=table["baseline"], chosen=table["after_drop"],
        items=table["items"],
        candidates=tuple(Candidate(tuple(c["layers"]), c["value"]) for c in table["candidates"]),
        dropped_layers=tuple(dropped),
    )
    return PruneResult(
        kind="depth", params_before=count_arch(config, arch_before).total, params_after=params_after,
        arch_before=arch_before.sizes(), arch_after=program.arch.sizes(), kept=program.kept,
        seconds={k: round(v, 3) for k, v in seconds.items()}, inputs=inputs, fingerprint=emitted.fingerprint,
        saliency=saliency, artifacts=emitted.artifacts,
    )


# ---- the saliency ranks: `python -m pdc.stages.prune_depth --job FILE` (`pdc.stages.ranks`) ----
def _saliency_job(job: dict) -> dict:
    """Every rank exports the model as the stage does and scores its share of the candidates
    (loss, task) or of the blocks (cosine) on the program (`score_candidates`); rank 0 returns
    the values."""
    target = decode(DepthTarget, job["target"])
    program, model, tokenizer, _ = load_source(Path(job["model"]), target.saliency, streaming=False)
    program = scoring_program(program, model, target.saliency)
    blocks = Blocks.from_json(job["blocks"]).read() if job["blocks"] else None
    cands = candidates(program.arch.layers, target.depth, target.contiguous)
    tasks_dir = Path(job["tasks_dir"]) if job["tasks_dir"] else None
    values, baseline = score_candidates(program, cands, target.saliency, blocks, tokenizer, tasks_dir,
                                        job["batch_size"], progress=False)
    return encode({"values": values, "baseline": baseline})


def main(argv: Sequence[str] | None = None) -> int:
    return worker_main(argv, "pdc.stages.prune_depth", _saliency_job)


if __name__ == "__main__":
    sys.exit(main())
