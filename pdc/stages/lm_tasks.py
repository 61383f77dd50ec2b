"""lm-evaluation-harness tasks on an in-memory model: the task registry (lm-eval's bundled tasks
or a local folder of task YAML + JSONL, `tasks_dir`), lm-eval's `HFLM` around the model (each rank
scoring its share under torch.distributed), the runs by shot count and the `TaskScore` of each
task. The evaluate stage (`pdc.stages.evaluate`) and depth's task saliency use it.

Relative `data_files` in a local task YAML resolve against the task folder (lm-eval itself
resolves them against the working directory), so a task folder can be moved as a whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import logging
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from pdc.errors import PdcError, one_line
from pdc.files import write_json
from pdc.inputs.assets import RETIRED
from pdc.inputs.cache import cache_root
from pdc.lang.settings import EvalTask
from pdc.plan.results import TaskScore
from pdc.stages.ranks import model_device, rank_world

STAGE = "evaluate"


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
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model_device(model)))
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
