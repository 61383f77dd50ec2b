"""Depth pruning: score which decoder layers matter least, drop them from the exported program,
emit every output from it.

Loss saliency (on one process) is scored on the program itself: each candidate is the program
with `drop_layers` applied to a copy of its graph that shares the weights
(`pdc.stages.depth_on_program`); a source over 4 GiB is then never loaded: exported on the meta
device, scored with its weights read per use from the safetensors files, cut, and only the kept
layers read (in the source's precision, as width pruning does). Task and cosine saliency, and
loss on several ranks, still load the checkpoint as a Hugging Face model (lm-eval's harness needs
one), trace it into a `Program` that shares its weights, and score the model with the candidate
layers *temporarily removed* (`layers_removed`: the decoder's ModuleList is swapped and the
KV-cache indices renumbered, no weights are copied). The choice is then applied to the program by `pdc.passes.drop_layers.DropLayers` under the `PassManager`, and
the checkpoint, `program.pt2`, ONNX and the lock's fingerprints are all emitted from the rewritten
program (`pdc.emit.pruned`), exactly as for width pruning.

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

import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from pdc.emit.checkpoint import source_dtype
from pdc.emit.fingerprint import prune_inputs
from pdc.emit.pruned import emit_pruned
from pdc.errors import PdcError
from pdc.files import write_json
from pdc.graph.export import export_dir, export_model, source_arch
from pdc.graph.manager import PassManager
from pdc.graph.probe import default_probe
from pdc.graph.rewrite import materialize_sliced
from pdc.graph.storage import compute_in_fp32, return_freed_memory
from pdc.inputs.data import take
from pdc.inputs.models import load_causal_lm
from pdc.inputs.shards import Blocks
from pdc.lang.settings import DepthTarget, Saliency
from pdc.arch import per_layer_lists
from pdc.passes.drop_layers import DropLayers
from pdc.plan.counts import count_arch
from pdc.plan.prune_host import streams
from pdc.plan.results import Candidate, PruneResult, SaliencyResult, decode, encode
from pdc.plotting import pyplot, save_figure
from pdc.stages.depth_on_program import loss_scores, program_nll, without
from pdc.stages.evaluate import EvalConfig, eval_dtype, mean_nll, task_accuracy_items
from pdc.stages.process_group import rank_device
from pdc.stages.ranks import eval_mode, local_only, rank_batches, rank_world, run_in_ranks, worker_main

STAGE = "prune"

_METRIC = {
    # kind: (metric name in tables, better when "lower"/"higher" for the model after removal)
    "loss": ("val_loss", "lower"),
    "task": ("accuracy", "higher"),
    "cosine": ("block_influence", "lower"),
}


# ---- temporary layer removal (saliency) ------------------------------------------------------
def _layer_list_owner(model) -> tuple[torch.nn.Module, str]:
    """(module, attribute) holding the decoder's layers: the one ModuleList with one entry per
    decoder layer of the config (`model.layers`, `gpt_neox.layers`, ...)."""
    n = source_arch(model.config.to_dict()).layers
    found = [(parent, name) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, torch.nn.ModuleList) and len(child) == n]
    if len(found) != 1:
        raise PdcError(f"{type(model).__name__}: found {len(found)} module lists of {n} layers, need exactly one "
                       "(the decoder layers) for depth pruning", STAGE)
    return found[0]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder's layer list of a causal LM."""
    parent, name = _layer_list_owner(model)
    return getattr(parent, name)


def _set_layer_indices(layers: Sequence[torch.nn.Module], indices: Sequence[int]) -> None:
    """Each attention module addresses the KV cache by `layer_idx`; renumber them."""
    for layer, idx in zip(layers, indices):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = idx


def _keep_list(n: int, drop: Sequence[int]) -> list[int]:
    bad = [i for i in drop if not 0 <= i < n]
    if bad:
        raise PdcError(f"cannot drop layers {bad}: the model has {n} layers", STAGE)
    keep = [i for i in range(n) if i not in set(drop)]
    if not keep:
        raise PdcError("cannot drop every decoder layer", STAGE)
    return keep


def _install(model, layers: Sequence[torch.nn.Module], n_layers: int, lists: dict) -> None:
    """Make `layers` the decoder's layers, with config and KV-cache indices to match."""
    parent, name = _layer_list_owner(model)
    setattr(parent, name, layers if isinstance(layers, torch.nn.ModuleList) else torch.nn.ModuleList(layers))
    model.config.num_hidden_layers = n_layers
    for key, value in lists.items():
        setattr(model.config, key, value)
    _set_layer_indices(getattr(parent, name), range(n_layers))


@contextlib.contextmanager
def layers_removed(model, drop: Sequence[int]) -> Iterator[None]:
    """Run `model` without decoder layers `drop` inside the block; restored exactly afterwards.

    Invariant: inside, the model computes what a checkpoint with those layers deleted computes
    (layer list, `config.num_hidden_layers`, per-layer config lists and KV-cache indices agree).
    """
    layers = decoder_layers(model)
    n = len(layers)
    keep = _keep_list(n, drop)
    saved_lists = {k: getattr(model.config, k) for k in per_layer_lists(model.config, range(n), n)}
    saved_n = model.config.num_hidden_layers
    try:
        _install(model, [layers[i] for i in keep], len(keep), per_layer_lists(model.config, keep, n))
        yield
    finally:
        _install(model, layers, saved_n, saved_lists)


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


@torch.no_grad()
def block_influence(model, blocks: torch.Tensor, runs: Sequence[Sequence[int]], batch_size: int = 4,
                    progress: bool = False) -> list[float]:
    """1 - cos(h entering run[0], h leaving run[-1]) averaged over all tokens, for each run of
    consecutive layers, from forward passes of the full model (hooks on the decoder layers).
    Split over ranks (`rank_batches`): each block is read by one rank; the float64 sums are
    all-reduced."""
    layers = decoder_layers(model)
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def pre_hook(idx):
        def hook(module, args, kwargs):
            inputs[idx] = args[0] if args else kwargs["hidden_states"]
        return hook

    def post_hook(idx):
        def hook(module, args, kwargs, output):
            outputs[idx] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
    sums = torch.zeros(len(runs), dtype=torch.float64)
    count = 0
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for rows in rank_batches(len(blocks), batch_size, "block influence", progress):
                ids = blocks[rows].to(device)
                model(input_ids=ids, use_cache=False)
                for c, run in enumerate(runs):
                    cos = torch.nn.functional.cosine_similarity(inputs[run[0]].double(), outputs[run[-1]].double(),
                                                                dim=-1)
                    sums[c] += float((1.0 - cos).sum())
                count += ids.numel()
                inputs.clear()
                outputs.clear()
    finally:
        for h in handles:
            h.remove()
    if rank_world()[1] > 1:
        both = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)])
        dist.all_reduce(both)
        sums, count = both[:-1], int(both[-1])
    return (sums / max(count, 1)).tolist()


def scoring_model(model, saliency: Saliency):
    """The model candidates are scored on: with `task(..., precision=bf16)` a bf16 copy where the
    device has bf16 (as the evaluation's `precision=bf16`; timedial 3x faster on this project's
    CPU), else `model` itself. The copy only scores; the pruned weights come from `model`."""
    if saliency.kind != "task" or saliency.precision is None:
        return model
    device = next(model.parameters()).device
    dtype = eval_dtype(EvalConfig(precision=saliency.precision), device)
    return model if dtype == next(model.parameters()).dtype else copy.deepcopy(model).to(dtype)


def score_candidates(
    model,
    cands: Sequence[Sequence[int]],
    saliency: Saliency,
    blocks: torch.Tensor | None = None,
    tokenizer=None,
    tasks_dir: Path | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[list[float], float | None]:
    """(metric per candidate, metric of the full model) for `saliency.kind`.

    loss/task: the model with each candidate removed; cosine: the candidate's block influence
    (the full-model baseline is then None: nothing is removed).
    """
    check_saliency_inputs(saliency, blocks, tokenizer)
    kind = saliency.kind
    if kind == "cosine":
        return block_influence(model, blocks, cands, batch_size, progress), None
    measure = _measurement(model, saliency, blocks, tokenizer, tasks_dir, batch_size)
    # Split over ranks by candidate: rank r measures the full model (r = 0) and candidates r,
    # r + world, ... alone, exactly as one process would; the values are then summed.
    rank, world = rank_world()
    values = torch.zeros(len(cands) + 1, dtype=torch.float64)
    with local_only():
        if rank == 0:
            values[-1] = measure()
        mine = list(range(rank, len(cands), world))
        for c in tqdm(mine, desc=f"depth saliency ({kind})", unit="cand", disable=not progress or rank != 0):
            with layers_removed(model, cands[c]):
                values[c] = measure()
    if world > 1:
        dist.all_reduce(values)  # each entry was filled by exactly one rank
    return values[:-1].tolist(), float(values[-1])


def check_saliency_inputs(saliency: Saliency, blocks: torch.Tensor | None, tokenizer) -> None:
    """A one-line `PdcError` when `saliency` cannot be measured with what it was given."""
    kind = saliency.kind
    if kind in ("loss", "cosine") and (blocks is None or len(blocks) == 0):
        raise PdcError(f"depth saliency '{kind}' needs data blocks (saliency data=...)", STAGE)
    if kind == "task":
        if not saliency.task:
            raise PdcError("depth saliency 'task' needs a task name (saliency task=...)", STAGE)
        if tokenizer is None:
            raise PdcError("depth saliency 'task' needs the model's tokenizer", STAGE)


# Items each task measurement scored, in this process (the saliency table's `items`).
_task_items: list = []


def _measurement(model, saliency: Saliency, blocks, tokenizer, tasks_dir, batch_size) -> Callable[[], float]:
    """The loss/task metric of `model` as it currently is (layers removed or not)."""
    if saliency.kind == "loss":
        return lambda: mean_nll(model, blocks, batch_size)
    if saliency.kind == "task":
        def accuracy() -> float:
            value, n = task_accuracy_items(model, tokenizer, saliency.task, saliency.shots, tasks_dir, saliency.limit)
            _task_items.append(n)
            return value
        return accuracy
    raise PdcError(f"unknown depth saliency {saliency.kind!r} (expected loss, task or cosine)", STAGE)


def choose(cands: Sequence[Sequence[int]], values: Sequence[float], kind: str, n_drop: int, contiguous: bool) -> list[int]:
    """Layers to drop: the best contiguous candidate, or the `n_drop` best single layers.
    "Best" = the model loses least: lowest loss / influence, highest accuracy; ties go to the
    later layers (the paper observes the last layers but one are the most redundant)."""
    sign = -1.0 if _METRIC[kind][1] == "higher" else 1.0
    order = sorted(range(len(cands)), key=lambda c: (sign * values[c], -cands[c][0]))
    if contiguous:
        return list(cands[order[0]])
    return sorted(cands[c][0] for c in order[:n_drop])


def saliency_table(model, target: DepthTarget, blocks=None, tokenizer=None, tasks_dir=None,
                   batch_size: int = 4, progress: bool = True, scorer: Callable | None = None,
                   n_layers: int | None = None, measure_dropped: Callable | None = None) -> dict:
    """Score all candidates and choose; the JSON-able table written to `saliency.json`.
    `scorer(cands, blocks) -> (values, baseline)` replaces `score_candidates` in this process
    (the scores of several ranks, or of the program: then `model` may be None, with `n_layers`
    and `measure_dropped(layers, blocks)` for the non-contiguous choice)."""
    _task_items.clear()
    n_layers = len(decoder_layers(model)) if n_layers is None else n_layers
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
        model = scoring_model(model, sal)
        values, baseline = score_candidates(model, cands, sal, blocks, tokenizer, tasks_dir, batch_size, progress)
    chosen = choose(cands, values, sal.kind, n_drop, target.contiguous) if cands else []
    if not cands or sal.kind == "cosine":
        after = None
    elif target.contiguous:
        after = values[cands.index(chosen)]
    elif measure_dropped is not None:  # single layers were scored alone; measure them removed together
        after = measure_dropped(chosen, blocks)
    else:
        model = scoring_model(model, sal)
        with layers_removed(model, chosen):
            after = _measurement(model, sal, blocks, tokenizer, tasks_dir, batch_size)()
    metric, better = _METRIC[sal.kind]
    items = {n for n in _task_items if n is not None}
    _task_items.clear()
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
def _load(model_dir: Path):
    model = load_causal_lm(model_dir, STAGE)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception:  # loss/cosine saliency need no tokenizer; `task` reports it when needed
        tokenizer = None
    return model, tokenizer


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
    seconds = {}
    on_program = target.saliency.kind == "loss" and nproc == 1  # scored on the graph (pdc.stages.depth_on_program)
    if not (model_dir / "config.json").exists():
        raise PdcError(f"no Hugging Face checkpoint in {model_dir} (config.json missing)", STAGE)
    config = json.loads((model_dir / "config.json").read_text())
    if on_program and streams(model_dir):  # never loaded: scored from the files, cut, then read
        model, tokenizer = None, None
        start = time.perf_counter()
        program = export_dir(model_dir, progress=progress)
        seconds["export"] = time.perf_counter() - start
        return_freed_memory()
    else:
        start = time.perf_counter()
        model, tokenizer = _load(model_dir)
        seconds["load_weights"] = time.perf_counter() - start
        start = time.perf_counter()
        program = export_model(model, default_probe(model.config.vocab_size, model_dir), hf_config=config)
        seconds["export"] = time.perf_counter() - start
    candidates(program.arch.layers, target.depth, target.contiguous)  # fail before any work
    check_saliency_inputs(target.saliency, blocks, tokenizer)
    arch_before = program.arch
    start = time.perf_counter()
    scorer = measure_dropped = None
    if on_program:
        def scorer(cands, blocks):
            return loss_scores(program, cands, blocks, batch_size, progress)

        def measure_dropped(drop, blocks):
            return program_nll(without(program, drop), blocks, batch_size)
    elif nproc > 1:
        if work_dir is None or (blocks is not None and shards is None):
            raise PdcError("depth saliency on several processes needs a work directory and token shards", STAGE)
        job = {"kind": "saliency", "model": str(model_dir.resolve()), "target": encode(target),
               "blocks": shards.to_json() if shards is not None else None,
               "tasks_dir": str(Path(tasks_dir).resolve()) if tasks_dir else None, "batch_size": batch_size}

        def scorer(cands, _blocks):
            got = run_in_ranks("pdc.stages.prune_depth", job, nproc, work_dir, STAGE, "depth saliency")
            return got["values"], got["baseline"]
    table = saliency_table(model, target, blocks, tokenizer, tasks_dir, batch_size, progress, scorer,
                           program.arch.layers, measure_dropped)
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
    """Every rank loads the model and measures its share of the candidates (loss, task) or of the
    blocks (cosine) (`score_candidates`); rank 0 returns the values."""
    model_dir = Path(job["model"])
    model = load_causal_lm(model_dir, STAGE).to(rank_device())
    target = decode(DepthTarget, job["target"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if target.saliency.kind == "task" else None
    blocks = Blocks.from_json(job["blocks"]).read() if job["blocks"] else None
    cands = candidates(len(decoder_layers(model)), target.depth, target.contiguous)
    tasks_dir = Path(job["tasks_dir"]) if job["tasks_dir"] else None
    values, baseline = score_candidates(scoring_model(model, target.saliency), cands, target.saliency, blocks,
                                        tokenizer, tasks_dir, job["batch_size"], progress=False)
    return encode({"values": values, "baseline": baseline})


def main(argv: Sequence[str] | None = None) -> int:
    return worker_main(argv, "pdc.stages.prune_depth", _saliency_job)


if __name__ == "__main__":
    sys.exit(main())
