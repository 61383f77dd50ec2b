"""Evaluation of in-memory models: held-out perplexity and lm-evaluation-harness tasks.

Everything runs on the model object already in memory (lm-eval's `HFLM(pretrained=model)`), so a
pruned or distilled student is evaluated without a save/load round trip, and nothing touches the
network: tasks come from lm-eval's bundled registry or from a local folder of task YAML + JSONL
(`tasks_dir`, e.g. `pdc.assets.local_tasks_dir()`).

Conventions:
- `perplexity` is exp of the *token-weighted* mean next-token NLL over all blocks (each block
  contributes L-1 predictions), accumulated in float64.
- Relative `data_files` in a local task YAML resolve against the task folder (lm-eval itself
  resolves them against the working directory), so a task folder can be moved as a whole.
- Task results are `{"acc": float, "acc_stderr": float|None, "shots": int}` (+ `acc_norm` when the
  task reports it); the stage result is `{"perplexity": float|None, "tasks": {...}}`.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from pdc.errors import PdcError
from pdc.stages import EvalConfig, EvalTask

STAGE = "evaluate"
# Column order of the comparison table (the paper's Table 1); other labels follow in given order.
TABLE_COLUMNS = ("teacher", "corrected teacher", "pruned", "distilled")


# ---- perplexity ---------------------------------------------------------------------------------
@torch.no_grad()
def nll_sum(model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False) -> tuple[float, int]:
    """(sum of next-token NLL, number of predicted tokens) over `blocks` [N, L].

    Every block predicts tokens 1..L-1 from their prefixes; no padding, so all predictions count.
    """
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise PdcError(f"perplexity needs token blocks [N, L>=2], got shape {tuple(blocks.shape)}", STAGE)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    batches = range(0, len(blocks), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", unit="batch", leave=False)
    try:
        for start in batches:
            ids = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            # Sum in float64: thousands of blocks of fp32 NLLs otherwise lose digits.
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            total += float(nll.double())
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total, count


def mean_nll(model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """Token-weighted mean next-token NLL (nats) over `blocks`; the depth `loss` saliency metric."""
    total, count = nll_sum(model, blocks, batch_size, progress)
    if count == 0:
        raise PdcError("perplexity needs at least one held-out block", STAGE)
    return total / count


def perplexity(model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(token-weighted mean next-token NLL) of `model` on `blocks` [N, L]."""
    return math.exp(mean_nll(model, blocks, batch_size, progress))


def builtin_heldout_blocks(tokenizer, seq_len: int, n_blocks: int | None = None) -> torch.Tensor:
    """Held-out blocks from the `pdc setup` corpus `wiki-heldout` (first `n_blocks` if given)."""
    from pdc.data import token_blocks
    from pdc.stages import DataSource

    blocks = token_blocks(DataSource("builtin", "wiki-heldout"), tokenizer, seq_len, stage=STAGE)
    return blocks if n_blocks is None else blocks[:n_blocks]


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters is not a model
        return torch.device("cpu")


# ---- lm-eval tasks ------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval logs a warning per call for in-memory models and per task for shot overrides."""
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "datasets")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


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

    from pdc.data import cache_root

    version = getattr(lm_eval, "__version__", "unknown")
    cache_file = cache_root() / "lm_eval" / f"task_names-{version}.json"
    if cache_file.exists():
        try:
            return set(json.loads(cache_file.read_text()))
        except (OSError, ValueError):
            pass  # a damaged cache is rebuilt below
    names = sorted(_task_manager(None, True).all_tasks)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(names))
    tmp.replace(cache_file)
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
        if name not in builtin:
            close = difflib.get_close_matches(name, sorted(local | builtin), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            where = f"lm-eval's registry or {tasks_dir}" if tasks_dir else "lm-eval's registry"
            raise PdcError(f"unknown lm-eval task {name!r} (not in {where}){hint}", STAGE)
    return _task_manager(str(tasks_dir.resolve()) if tasks_dir else None, True)


def _make_lm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    if tokenizer.pad_token_id is None:  # HFLM pads batches; any id works since pads are masked out
        tokenizer.pad_token = tokenizer.eos_token
    with _quiet_lm_eval():
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(_model_device(model)))


def run_tasks(
    model,
    tokenizer,
    tasks: Sequence[EvalTask],
    tasks_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    stderr: bool = True,
    seed: int = 0,
) -> dict[str, dict]:
    """Run each task with its shot count; `{name: {"acc", "acc_stderr", "shots"[, "acc_norm"]}}`.

    Tasks with different shot counts are separate lm-eval calls (its `num_fewshot` is global).
    """
    if not tasks:
        return {}
    import lm_eval

    tm = resolve_task_manager([t.name for t in tasks], tasks_dir)
    lm = _make_lm(model, tokenizer, batch_size)
    by_shots: dict[int, list[str]] = {}
    for t in tasks:
        if t.shots < 0:
            raise PdcError(f"task {t.name!r}: shots must be >= 0, got {t.shots}", STAGE)
        by_shots.setdefault(t.shots, []).append(t.name)
    was_training = model.training
    model.eval()
    out: dict[str, dict] = {}
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
                    log_samples=False,
                    bootstrap_iters=1000 if stderr else 0,
                    random_seed=seed,
                    numpy_random_seed=seed,
                    torch_random_seed=seed,
                    fewshot_random_seed=seed,
                )
                for name in names:
                    out[name] = _task_metrics(name, res["results"].get(name, {}), shots)
    except PdcError:
        raise
    except Exception as exc:  # a broken task file or dataset: one line, naming the task list
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PdcError(f"lm-eval failed on {', '.join(t.name for t in tasks)}: {first}", STAGE) from exc
    finally:
        model.train(was_training)
    return out


def _task_metrics(name: str, raw: Mapping, shots: int) -> dict:
    def metric(key: str):
        for k, v in raw.items():
            if k.split(",")[0] == key:
                return float(v) if isinstance(v, (int, float)) else None
        return None

    acc = metric("acc")
    if acc is None:
        reported = sorted({k.split(",")[0] for k in raw if "," in k})
        raise PdcError(f"task {name!r} reports no 'acc' metric (it reports: {', '.join(reported) or 'nothing'})", STAGE)
    row = {"acc": acc, "acc_stderr": metric("acc_stderr"), "shots": shots}
    if metric("acc_norm") is not None:
        row["acc_norm"] = metric("acc_norm")
        row["acc_norm_stderr"] = metric("acc_norm_stderr")
    return row


def task_accuracy(
    model, tokenizer, task: str, shots: int, tasks_dir: Path | None = None, limit: int | None = None
) -> float:
    """Accuracy in [0, 1] of `model` on one lm-eval / local multiple-choice task: the
    length-normalised `acc_norm` when the task reports it (answers of different lengths make raw
    log-likelihood favour short ones: on social_iqa SmolLM2 scores acc 0.355, acc_norm 0.45,
    chance 0.33), else `acc`."""
    res = run_tasks(model, tokenizer, [EvalTask(task, shots)], tasks_dir, limit=limit, stderr=False)
    row = res[task]
    return row["acc_norm"] if row.get("acc_norm") is not None else row["acc"]


# ---- the stage ----------------------------------------------------------------------------------
def evaluate_model(
    model,
    tokenizer,
    cfg: EvalConfig,
    tasks_dir: Path | None = None,
    heldout_blocks: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """`{"perplexity": float|None, "tasks": {name: {"acc", "acc_stderr", "shots", ...}}}`.

    Perplexity is measured only when `heldout_blocks` is given (the runner resolves
    `cfg.perplexity_data` into blocks; `builtin_heldout_blocks` is the default corpus).
    """
    ppl = None
    if heldout_blocks is not None:
        ppl = perplexity(model, heldout_blocks, batch_size=max(1, batch_size // 2), progress=progress)
    tasks = run_tasks(model, tokenizer, cfg.tasks, tasks_dir, limit=cfg.limit, batch_size=batch_size)
    return {"perplexity": ppl, "tasks": tasks}


def comparison_table(results: Mapping[str, Mapping]) -> str:
    """Markdown table: one row per metric (perplexity, then each task with its shots), one column
    per model in the order teacher / pruned / distilled (others after, in given order)."""
    columns = [c for c in TABLE_COLUMNS if c in results] + [c for c in results if c not in TABLE_COLUMNS]
    task_names: list[str] = []
    for col in columns:
        for name in (results[col].get("tasks") or {}):
            if name not in task_names:
                task_names.append(name)

    def fmt_acc(row: Mapping | None) -> str:
        if not row:
            return "-"
        err = row.get("acc_stderr")
        return f"{100 * row['acc']:.2f}" + (f" ± {100 * err:.2f}" if err is not None else "")

    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    if any(results[c].get("perplexity") is not None for c in columns):
        cells = [
            f"{results[c]['perplexity']:.3f}" if results[c].get("perplexity") is not None else "-"
            for c in columns
        ]
        lines.append("| perplexity (held-out) | " + " | ".join(cells) + " |")
    for name in task_names:
        rows = [(results[c].get("tasks") or {}).get(name) for c in columns]
        shots = next((r["shots"] for r in rows if r), 0)
        lines.append(f"| {name} ({shots}-shot) acc % | " + " | ".join(fmt_acc(r) for r in rows) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, Mapping], out_dir: Path) -> Path:
    """Write `results.json` and `table.md` (the comparison table) into `out_dir`.

    Each file is written to a temp name and renamed, so a reader never sees half a file; other
    files in `out_dir` are left alone (the runner owns the stage folder's own temp + rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = {
        "results.json": json.dumps(results, indent=2) + "\n",
        "table.md": comparison_table(results),  # rendered first: a bad result fails before writing
    }
    for name, text in texts.items():
        tmp = out_dir / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text)
        tmp.replace(out_dir / name)
    return out_dir / "results.json"
