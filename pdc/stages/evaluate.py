"""Evaluation of in-memory models: held-out perplexity and lm-evaluation-harness tasks.

Everything runs on the model object already in memory (lm-eval's `HFLM(pretrained=model)`), so a
pruned or distilled student is evaluated without a save/load round trip, and nothing touches the
network: tasks come from lm-eval's bundled registry or from a local folder of task YAML + JSONL
(`tasks_dir`, e.g. `pdc.inputs.assets.local_tasks_dir()`). Any task lm-eval runs is accepted:
multiple choice (acc, acc_norm), generation with the task's own `generation_kwargs` (exact_match,
...), tasks that execute model-written code only with `allow_code_execution=true`.

Scale: on a GPU each model is loaded in bf16 with SDPA attention and lm-eval picks its batch size
(`batch_size="auto"`); with several processes (`python -m pdc.stages.evaluate --job FILE` under
torchrun, started by `evaluate_models` for a `Launch` of more than one process) every rank scores
its share of the task requests and of the held-out blocks, and rank 0 gathers the results.

Conventions:
- `perplexity` is exp of the *token-weighted* mean next-token NLL over all blocks (each block
  contributes L-1 predictions), accumulated in float64.
- Relative `data_files` in a local task YAML resolve against the task folder (lm-eval itself
  resolves them against the working directory), so a task folder can be moved as a whole.
- A task's result is a `TaskScore`: every metric lm-eval reported with its standard error, and
  the task's primary metric (the first one its config lists that lm-eval reported); the stage returns an
  `EvaluateResult` with one `ModelScores` per model column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
import sys
from functools import lru_cache
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoTokenizer

from pdc.errors import PdcError, one_line
from pdc.files import sha256_bytes, sha256_file, sha256_json, write_json, write_text
from pdc.inputs.assets import RETIRED
from pdc.inputs.cache import cache_root
from pdc.inputs.data import token_blocks
from pdc.inputs.models import load_causal_lm
from pdc.inputs.shards import Blocks
from pdc.inputs.verify import content_hashes
from pdc.lang.settings import DataSource, EvalConfig, EvalTask
from pdc.plan.results import (
    HeldoutScore,
    MODEL_COLUMNS,
    EvaluateResult,
    ModelScores,
    TaskScore,
    decode,
    encode,
)
from pdc.plan.training import Launch
from pdc.stages.process_group import rank_device
from pdc.stages.ranks import eval_mode, rank_batches, rank_world, run_in_ranks, worker_main
from pdc.stages.train.precision import cpu_has_bf16

STAGE = "evaluate"


# ---- perplexity ---------------------------------------------------------------------------------
def _my_batches(model, blocks: Blocks | torch.Tensor, batch_size: int, progress: bool):
    """Yield (rows, ids on the model's device) for this rank's share of `blocks` [N, L>=2],
    batch by batch, with the model in eval mode (its mode is restored afterwards)."""
    shape = tuple(blocks.shape)
    if len(shape) != 2 or shape[1] < 2:
        raise PdcError(f"perplexity needs token blocks [N, L>=2], got shape {shape}", STAGE)
    device = _model_device(model)
    with eval_mode(model):
        for rows in rank_batches(len(blocks), batch_size, "perplexity", progress):
            yield rows, _rows(blocks, rows).to(device)


@torch.no_grad()
def nll_sum(model, blocks: Blocks | torch.Tensor, batch_size: int = 4, progress: bool = False) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) over `blocks` [N, L].

    Every block predicts tokens 1..L-1 from their prefixes; no padding, so all predictions count.
    """
    total, count = 0.0, 0
    for _, ids in _my_batches(model, blocks, batch_size, progress):
        logits = model(input_ids=ids, use_cache=False).logits
        # Sum in float64: thousands of blocks of fp32 NLLs otherwise lose digits.
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            ids[:, 1:].reshape(-1),
            reduction="sum",
        )
        total += float(nll.double())
        count += ids[:, 1:].numel()
    if rank_world()[1] > 1:
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=_model_device(model))
        dist.all_reduce(sums)
        total, count = float(sums[0]), int(sums[1])
    return total, count


@torch.no_grad()
def block_nlls(model, blocks: Blocks | torch.Tensor, batch_size: int = 4, progress: bool = False) -> list[float]:
    """Mean next-token NLL of each block, in block order (blocks have equal lengths, so their
    mean is the token-weighted mean): the per-block values paired comparisons resample."""
    values = torch.zeros(len(blocks), dtype=torch.float64, device=_model_device(model))
    for rows, ids in _my_batches(model, blocks, batch_size, progress):
        logits = model(input_ids=ids, use_cache=False).logits
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
        values[rows] = nll.double().mean(dim=1)
    if rank_world()[1] > 1:
        dist.all_reduce(values)  # each block is filled by exactly one rank
    return values.tolist()


def _rows(blocks: Blocks | torch.Tensor, positions: list[int]) -> torch.Tensor:
    """The blocks at `positions` as a LongTensor: a small read from the shards, or a tensor index."""
    return blocks.read(positions) if isinstance(blocks, Blocks) else blocks[positions]


def mean_nll(model, blocks: Blocks | torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Token-weighted mean next-token NLL (nats) over `blocks`; the depth `loss` saliency metric."""
    total, count = nll_sum(model, blocks, batch_size, progress)
    if count == 0:
        raise PdcError("perplexity needs at least one held-out block", STAGE)
    return total / count


def perplexity(model, blocks: Blocks | torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(token-weighted mean next-token NLL) of `model` on `blocks` [N, L]."""
    return math.exp(mean_nll(model, blocks, batch_size, progress))


def builtin_heldout_blocks(tokenizer, seq_len: int, n_blocks: int | None = None) -> torch.Tensor:
    """Held-out blocks from the `pdc setup` corpus `wiki-heldout` (first `n_blocks` if given)."""
    blocks = token_blocks(DataSource("builtin", "wiki-heldout"), tokenizer, seq_len, stage=STAGE)
    return (blocks if n_blocks is None else blocks[:n_blocks]).read()


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters is not a model
        return torch.device("cpu")


# ---- lm-eval tasks ------------------------------------------------------------------------------
def _no_git_hash():
    return None


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs a warning per call for in-memory models and per task for shot overrides. It
    also runs `git describe` for a hash pdc never reads; from the task folder (no repository) git
    prints "fatal: not a git repository" once per call, so that lookup is skipped."""
    import lm_eval.evaluator

    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    saved = [lg.level for lg in loggers]
    saved_hash = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    if saved_hash is not None:
        lm_eval.evaluator.get_git_commit_hash = _no_git_hash
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)
        if saved_hash is not None:
            lm_eval.evaluator.get_git_commit_hash = saved_hash


def _local_task_names(tasks_dir: Path) -> set[str]:
    """Task (and group/tag) names declared by the YAML files under `tasks_dir`."""
    tm = _task_manager(str(tasks_dir), False)
    return set(tm.all_tasks)


@lru_cache(maxsize=8)
def _task_manager(include_path: str | None, include_defaults: bool):
    """Built once per process: indexing lm-eval's bundled registry takes ~20 s."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        return TaskManager(include_path=include_path, include_defaults=include_defaults)


def _builtin_task_names() -> set[str]:
    """Names in lm-eval's bundled registry, cached on disk per lm-eval version (the index is slow)."""
    import lm_eval

    version = getattr(lm_eval, "__version__", "unknown")
    cache_file = cache_root() / "lm_eval" / f"task_names-{version}.json"
    if cache_file.exists():
        try:
            return set(json.loads(cache_file.read_text()))
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    names = sorted(_task_manager(None, True).all_tasks)
    write_json(cache_file, names, indent=None)
    return set(names)


def resolve_task_manager(task_names: Iterable[str], tasks_dir: Path | None = None):
    """The smallest lm-eval TaskManager that knows every name in `task_names`.

    Local-only task lists never index the bundled registry. An unknown name is a one-line
    `PdcError` with close matches.
    """
    names = list(task_names)
    local: set[str] = set()
    if tasks_dir is not None:
        tasks_dir = Path(tasks_dir)
        if not tasks_dir.is_dir():
            raise PdcError(f"task folder not found: {tasks_dir}", STAGE)
        local = _local_task_names(tasks_dir.resolve())
    missing = [n for n in names if n not in local]
    if not missing:
        return _task_manager(str(tasks_dir.resolve()), False)
    builtin = _builtin_task_names()
    for name in missing:
        if name in RETIRED and name not in builtin:
            raise PdcError(f"task {name!r} is no longer bundled: {RETIRED[name]}", STAGE)
        if name not in builtin:
            close = difflib.get_close_matches(name, sorted(local | builtin), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            where = f"lm-eval's registry or {tasks_dir}" if tasks_dir else "lm-eval's registry"
            raise PdcError(f"unknown lm-eval task {name!r} (not in {where}){hint}", STAGE)
    return _task_manager(str(tasks_dir.resolve()) if tasks_dir else None, True)


def _make_lm(model, tokenizer, batch_size: int | str):
    """lm-eval's HF model around `model`. Under torch.distributed it is told its rank and world
    size and gathers with torch.distributed (lm-eval's own data parallelism needs accelerate's
    launcher and a model it loads itself), so each rank scores its share of the requests."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer.pad_token_id is None:  # HFLM pads batches; any id works since pads are masked out
        tokenizer.pad_token = tokenizer.eos_token
    with _quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_model_device(model)))
    rank, world = rank_world()
    # Set even for a world of one: under torchrun lm-eval reads RANK itself, and a rank scoring
    # alone (`local_only`, one saliency candidate each) must get its own results back.
    lm._rank, lm._world_size = rank, world
    if world > 1:
        lm.all_gather = _all_gather
        lm.barrier = dist.barrier
    return lm


def _all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor`, concatenated in rank order (scalars stacked), as accelerate does."""
    parts = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)


def run_tasks(
    model,
    tokenizer,
    tasks: Sequence[EvalTask],
    tasks_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int | str = 8,
    stderr: bool = True,
    seed: int = 0,
    allow_code_execution: bool = False,
) -> dict[str, TaskScore]:
    """Run each task with its shot count; `{name: TaskScore}` (on rank 0; other ranks of a
    data-parallel run return {} after scoring their share).

    Tasks with different shot counts are separate lm-eval calls (its `num_fewshot` is global).
    Tasks that execute model-written code (lm-eval marks them unsafe: humaneval, mbpp) run only
    with `allow_code_execution`.
    """
    if not tasks:
        return {}
    import lm_eval

    tm = resolve_task_manager([t.name for t in tasks], tasks_dir)
    unsafe = [t.name for t in tasks if _is_unsafe(tm, t.name)]
    if unsafe and not allow_code_execution:
        raise PdcError(f"{', '.join(unsafe)} run(s) code the model writes: add allow_code_execution=true to the "
                       "evaluate block to run it (ideally in a sandbox)", STAGE)
    if unsafe:
        os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # the code_eval metric's own opt-in
    lm = _make_lm(model, tokenizer, batch_size)
    by_shots: dict[int, list[str]] = {}
    for t in tasks:
        if t.shots < 0:
            raise PdcError(f"task {t.name!r}: shots must be >= 0, got {t.shots}", STAGE)
        by_shots.setdefault(t.shots, []).append(t.name)
    was_training = model.training
    model.eval()
    out: dict[str, TaskScore] = {}
    # lm-eval resolves relative data_files against the working directory; make that the task folder.
    cwd = contextlib.chdir(Path(tasks_dir).resolve()) if tasks_dir else contextlib.nullcontext()
    try:
        with cwd, _quiet_lm_eval(), torch.no_grad():
            for shots, names in by_shots.items():
                res = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=names,
                    num_fewshot=shots,
                    task_manager=tm,
                    limit=limit,
                    log_samples=True,  # per-item scores: paired comparisons between models
                    bootstrap_iters=1000 if stderr else 0,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                    confirm_run_unsafe_code=allow_code_execution,
                )
                if res is None:  # a data-parallel rank other than 0: rank 0 holds the results
                    continue
                for name in names:
                    items = (res.get("n-samples") or {}).get(name, {}).get("effective")
                    score = task_score(name, res["results"].get(name, {}), shots, items, _listed_metrics(tm, name))
                    out[name] = dataclasses.replace(score, per_item=per_item_scores(
                        (res.get("samples") or {}).get(name, []), score.primary))
    except PdcError:
        raise
    except Exception as exc:  # a broken task file or dataset: one line, naming the task list
        where = f" (tasks from {tasks_dir})" if tasks_dir else ""
        raise PdcError(f"lm-eval failed on {', '.join(t.name for t in tasks)}{where}: {one_line(exc)}",
                       STAGE) from exc
    finally:
        model.train(was_training)
    return out


def _is_unsafe(tm, name: str) -> bool:
    """Whether lm-eval marks a task (or a task of a group) as executing model-written code."""
    entry = tm.task_index.get(name)
    cfg = getattr(entry, "cfg", None) or {}
    if cfg.get("unsafe_code"):
        return True
    subtasks = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    return any(_is_unsafe(tm, sub) for sub in subtasks if isinstance(sub, str) and sub != name)


def _listed_metrics(tm, name: str) -> list[str]:
    """The metrics a task's (or group's) config lists, in its order."""
    cfg = getattr(tm.task_index.get(name), "cfg", None) or {}
    out = []
    for key in ("metric_list", "aggregate_metric_list"):
        for item in cfg.get(key) or []:
            if isinstance(item, dict) and isinstance(item.get("metric"), str):
                out.append(item["metric"])
    return out


def per_item_scores(samples: Sequence[Mapping], metric: str) -> tuple[float, ...]:
    """`metric` of each logged sample, in document order (empty when the samples lack it)."""
    ordered = sorted((s for s in samples if isinstance(s, Mapping)), key=lambda s: s.get("doc_id", 0))
    values = [s.get(metric) for s in ordered]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return ()
    return tuple(float(v) for v in values)


def task_score(name: str, raw: Mapping, shots: int, items: int | None = None,
               listed: Sequence[str] = ()) -> TaskScore:
    """A `TaskScore` from lm-eval's result entry of one task (keys "metric,filter"); the primary
    metric is the first of `listed` (the task config's own order) that lm-eval reported, else the
    first reported."""
    values: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for key, value in raw.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric = key.split(",")[0]
        if metric.endswith("_stderr"):
            if math.isfinite(value):
                stderr.setdefault(metric[: -len("_stderr")], float(value))
        else:
            values.setdefault(metric, float(value))
    if not values:
        raise PdcError(f"task {name!r} reported no metric", STAGE)
    primary = next((m for m in listed if m in values), next(iter(values)))
    return TaskScore(shots=shots, primary=primary, values=values, stderr=stderr, items=items)


def task_accuracy(
    model, tokenizer, task: str, shots: int, tasks_dir: Path | None = None, limit: int | None = None
) -> float:
    """Accuracy in [0, 1] of `model` on one lm-eval / local multiple-choice task: the
    length-normalised `acc_norm` when the task reports it (answers of different lengths make raw
    log-likelihood favour short ones: on social_iqa SmolLM2 scores acc 0.355, acc_norm 0.45,
    chance 0.33), else `acc`."""
    return task_accuracy_items(model, tokenizer, task, shots, tasks_dir, limit)[0]


def task_accuracy_items(
    model, tokenizer, task: str, shots: int, tasks_dir: Path | None = None, limit: int | None = None
) -> tuple[float, int | None]:
    """`task_accuracy` and the number of items it scored (for its standard error)."""
    score = run_tasks(model, tokenizer, [EvalTask(task, shots)], tasks_dir, limit=limit, stderr=False)[task]
    for metric in ("acc_norm", "acc"):
        if metric in score.values:
            return score.values[metric], score.items
    raise PdcError(f"task {task!r} reports no accuracy (it reports: {', '.join(score.values)})", STAGE)


# ---- the stage ----------------------------------------------------------------------------------
def eval_dtype(cfg: EvalConfig, device: torch.device) -> torch.dtype:
    """The dtype models are scored in: bf16 on a GPU with bf16 unless `precision=fp32`; on a CPU,
    bf16 only with `precision=bf16` and bf16 matrix units (timedial on SmolLM2-135M, 2 cores: 3x
    faster than fp32), fp32 otherwise."""
    if cfg.precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cfg.precision == "bf16" and cpu_has_bf16() else torch.float32


def load_for_eval(path: Path, device: torch.device, dtype: torch.dtype):
    """A checkpoint ready to score in `dtype` (SDPA attention on a GPU)."""
    if device.type == "cuda":
        return load_causal_lm(path, STAGE, dtype, attn_implementation="sdpa").to(device)
    return load_causal_lm(path, STAGE, dtype)


def evaluate_model(
    model,
    tokenizer,
    cfg: EvalConfig,
    path: Path,
    tasks_dir: Path | None = None,
    heldout_blocks: Blocks | torch.Tensor | None = None,
    batch_size: int | str = 8,
    progress: bool = True,
    more_heldout: Mapping[str, Blocks | torch.Tensor] | None = None,
) -> ModelScores:
    """Held-out perplexity (when `heldout_blocks` is given; with each block's NLL), the same on
    each corpus of `more_heldout` (name -> blocks) and every task of `cfg` (with each item's
    score)."""
    ppl_batch = max(1, batch_size // 2) if isinstance(batch_size, int) else 4

    def heldout(blocks) -> HeldoutScore:
        per_block = tuple(block_nlls(model, blocks, batch_size=ppl_batch, progress=progress))
        return HeldoutScore(math.exp(sum(per_block) / len(per_block)), per_block)

    first = heldout(heldout_blocks) if heldout_blocks is not None else None
    more = {name: heldout(blocks) for name, blocks in (more_heldout or {}).items()}
    tasks = run_tasks(model, tokenizer, cfg.tasks, tasks_dir, limit=cfg.limit, batch_size=batch_size,
                      allow_code_execution=cfg.allow_code_execution)
    return ModelScores(path=str(path), perplexity=first.perplexity if first else None, tasks=tasks,
                       block_nll=first.block_nll if first else (), more_perplexity=more)


# ---- scores computed once per model -------------------------------------------------------------
def score_key(path: Path, cfg: EvalConfig, tasks_dir: Path | None, heldout: Blocks | torch.Tensor | None,
              more_heldout: Mapping[str, Blocks] | None, device: torch.device) -> str:
    """What a model's scores depend on: its weights and config (by content, not by the stage that
    wrote them), the evaluation settings, the task files, the held-out blocks, the device kind and
    the dtype it scores in, the scoring code and the versions of lm-eval and torch."""
    tasks = None
    if tasks_dir is not None and Path(tasks_dir).is_dir():
        tasks = {p.name: sha256_file(p) for p in sorted(Path(tasks_dir).iterdir()) if p.is_file()}

    def identity(blocks):
        if blocks is None:
            return None
        if isinstance(blocks, Blocks):
            return blocks.to_json()
        return sha256_bytes(blocks.contiguous().numpy().tobytes())

    held = [identity(heldout), {name: identity(b) for name, b in sorted((more_heldout or {}).items())}]
    return sha256_json([content_hashes(path, STAGE), encode(cfg), tasks, held, device.type,
                        str(eval_dtype(cfg, device)),
                        sha256_file(Path(__file__)), package_version("lm_eval"),
                        torch.__version__])[:24]


def scores_dir() -> Path:
    """Where models' scores are kept: shared by every build of this machine, so a teacher is scored
    once for all the specs and variants that evaluate it the same way."""
    return cache_root() / "scores"


def _cached_scores(key: str, path: Path) -> ModelScores | None:
    file = scores_dir() / f"{key}.json"
    try:
        scores = decode(ModelScores, json.loads(file.read_text()))
    except (OSError, ValueError, TypeError, KeyError, PdcError):
        return None  # absent or unreadable: scored again
    return dataclasses.replace(scores, path=str(path))


def evaluate_models(models: Mapping[str, Path], tokenizer_of, cfg: EvalConfig, tasks_dir: Path | None,
                    heldout_blocks: Blocks | torch.Tensor | None, progress: bool = True,
                    launch: Launch = Launch(), work_dir: Path | None = None,
                    more_heldout: Mapping[str, Blocks] | None = None,
                    reuse_scores: bool = False, batch_size: int | str | None = None) -> EvaluateResult:
    """Evaluate each model directory (label -> path, absent ones skipped) one at a time; with a
    `launch` of several processes per node, in that many data-parallel ranks on this node.
    `heldout_blocks` are the blocks of the first data `cfg.perplexity_data` names, `more_heldout`
    those of the others (by name). With `reuse_scores`, a model scored before with the same
    weights and settings is not scored again (`score_key`), and every new score is kept for the
    next run. `batch_size` is lm-eval's (None: the device's, `default_batch_size`)."""
    present = {k: v for k, v in models.items() if (Path(v) / "config.json").exists()}
    if not reuse_scores:
        return _evaluate(present, tokenizer_of, cfg, tasks_dir, heldout_blocks, progress, launch, work_dir,
                         more_heldout, batch_size)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    keys = {label: score_key(path, cfg, tasks_dir, heldout_blocks, more_heldout, device)
            for label, path in present.items()}
    reused = {label: s for label in present if (s := _cached_scores(keys[label], present[label])) is not None}
    for label in reused:
        print(f"[pdc] evaluate: {label}: scored before with the same weights and settings, reused", flush=True)
    todo = {label: path for label, path in present.items() if label not in reused}
    result = _evaluate(todo, tokenizer_of, cfg, tasks_dir, heldout_blocks, progress, launch, work_dir, more_heldout,
                       batch_size)
    for label, scores in result.models.items():
        write_json(scores_dir() / f"{keys[label]}.json", encode(scores))
    return dataclasses.replace(result, models={label: reused.get(label) or result.models[label] for label in present})


def _evaluate(models: Mapping[str, Path], tokenizer_of, cfg: EvalConfig, tasks_dir: Path | None,
              heldout_blocks: Blocks | torch.Tensor | None, progress: bool, launch: Launch,
              work_dir: Path | None, more_heldout: Mapping[str, Blocks] | None,
              batch_size: int | str | None = None) -> EvaluateResult:
    if launch.nproc_per_node > 1 and models:
        return _evaluate_in_ranks(models, cfg, tasks_dir, heldout_blocks, launch.nproc_per_node, work_dir, progress,
                                  more_heldout, batch_size)
    device = rank_device()
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    rank, _ = rank_world()
    scores: dict[str, ModelScores] = {}
    for label, path in models.items():
        if rank == 0:
            print(f"[pdc] evaluate: {label}", flush=True)
        model = load_for_eval(path, device, eval_dtype(cfg, device))
        scores[label] = evaluate_model(model, tokenizer_of(path), cfg, path, tasks_dir, heldout_blocks,
                                       batch_size=batch_size, progress=progress, more_heldout=more_heldout)
        del model
    tokens = None if heldout_blocks is None else int(heldout_blocks.shape[0] * heldout_blocks.shape[1])
    return EvaluateResult(models=scores, limit=cfg.limit, perplexity_tokens=tokens,
                          perplexity_data=tuple(cfg.perplexity_data),
                          precision="bf16" if eval_dtype(cfg, device) == torch.bfloat16 else "fp32")


def default_batch_size(device: torch.device) -> int | str:
    """lm-eval's batch size on `device`: on a GPU "auto" (its probe finds the largest that fits
    and, over several ranks, all-gathers each rank's and takes the smallest), on a CPU 8."""
    return "auto" if device.type == "cuda" else 8


def _evaluate_in_ranks(models: Mapping[str, Path], cfg: EvalConfig, tasks_dir: Path | None, heldout,
                       nproc: int, work_dir: Path | None, progress: bool,
                       more_heldout: Mapping[str, Blocks] | None = None,
                       batch_size: int | str | None = None) -> EvaluateResult:
    """Evaluate on `nproc` ranks of this node (`pdc.stages.ranks`) and read rank 0's result."""
    if work_dir is None:
        raise PdcError("evaluation on several processes needs a work directory", STAGE)
    more_heldout = dict(more_heldout or {})
    if any(b is not None and not isinstance(b, Blocks) for b in [heldout, *more_heldout.values()]):
        raise PdcError("evaluation on several processes reads held-out blocks from token shards", STAGE)
    job = {"models": {k: str(Path(v).resolve()) for k, v in models.items()}, "cfg": encode(cfg),
           "tasks_dir": str(Path(tasks_dir).resolve()) if tasks_dir else None,
           "heldout": heldout.to_json() if heldout is not None else None,
           "more_heldout": {name: b.to_json() for name, b in more_heldout.items()}, "progress": progress,
           "batch_size": batch_size}
    result = run_in_ranks("pdc.stages.evaluate", job, nproc, work_dir, STAGE, "evaluation")
    return decode(EvaluateResult, result)


def _rank_job(job: dict) -> dict:
    """One rank of a data-parallel evaluation: every rank scores its share."""
    cfg = decode(EvalConfig, job["cfg"])
    heldout = Blocks.from_json(job["heldout"]) if job["heldout"] else None
    tokenizers: dict[str, object] = {}

    def tokenizer_of(path):
        if str(path) not in tokenizers:
            tokenizers[str(path)] = AutoTokenizer.from_pretrained(path)
        return tokenizers[str(path)]

    tasks_dir = Path(job["tasks_dir"]) if job["tasks_dir"] else None
    more = {name: Blocks.from_json(b) for name, b in job["more_heldout"].items()}
    return encode(evaluate_models(job["models"], tokenizer_of, cfg, tasks_dir, heldout, job["progress"],
                                  more_heldout=more, batch_size=job.get("batch_size")))


def main(argv: Sequence[str] | None = None) -> int:
    return worker_main(argv, "pdc.stages.evaluate", _rank_job)


def ordered_columns(labels) -> list[str]:
    """Model columns in the order a reader compares them; unknown labels after, as given."""
    labels = list(labels)
    return [c for c in MODEL_COLUMNS if c in labels] + [c for c in labels if c not in MODEL_COLUMNS]


def format_score(score: TaskScore | None, metric: str) -> str:
    """"45.0 ± 3.5" (percent, one standard error) or "-"."""
    if score is None or metric not in score.values:
        return "-"
    err = score.stderr.get(metric)
    return f"{100 * score.values[metric]:.1f}" + (f" ± {100 * err:.1f}" if err is not None else "")


def comparison_rows(result: EvaluateResult) -> tuple[list[str], list[list[str]]]:
    """(columns, rows): perplexity, then each task's primary metric, one column per model."""
    columns = ordered_columns(result.models)
    rows: list[list[str]] = []
    if any(result.models[c].perplexity is not None for c in columns):
        first = f" '{result.perplexity_data[0]}'" if len(result.perplexity_data) > 1 else ""
        rows.append([f"perplexity (held-out{first})"] + [
            f"{result.models[c].perplexity:.3f}" if result.models[c].perplexity is not None else "-"
            for c in columns])
    for name in result.perplexity_data[1:]:
        scores = [result.models[c].more_perplexity.get(name) for c in columns]
        rows.append([f"perplexity (held-out '{name}')"] + [f"{h.perplexity:.3f}" if h else "-" for h in scores])
    tasks: list[str] = []
    for c in columns:
        tasks += [t for t in result.models[c].tasks if t not in tasks]
    for task in tasks:
        cells = [result.models[c].tasks.get(task) for c in columns]
        first = next(s for s in cells if s is not None)
        rows.append([f"{task} ({first.shots}-shot) {first.primary} %"] + [format_score(s, first.primary) for s in cells])
    return columns, rows


def comparison_table(result: EvaluateResult) -> str:
    """Markdown table of `comparison_rows`."""
    columns, rows = comparison_rows(result)
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(result: EvaluateResult, out_dir: Path) -> Path:
    """`results.json` (the typed result) and `table.md` (the comparison) in `out_dir`."""
    table = comparison_table(result)  # rendered first: a bad result fails before writing
    write_json(Path(out_dir) / "results.json", encode(result))
    write_text(Path(out_dir) / "table.md", table)
    return Path(out_dir) / "results.json"


if __name__ == "__main__":
    sys.exit(main())
