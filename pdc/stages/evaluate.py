"""Evaluation of in-memory models: held-out perplexity and lm-evaluation-harness tasks.

Everything runs on the model object already in memory (lm-eval's `HFLM(pretrained=model)`), so a
pruned or distilled student is evaluated without a save/load round trip, and nothing touches the
network: tasks come from lm-eval's bundled registry or from a local folder of task YAML + JSONL
(`tasks_dir`, e.g. `pdc.inputs.assets.local_tasks_dir()`). Any task lm-eval runs is accepted:
multiple choice (acc, acc_norm), generation with the task's own `generation_kwargs` (exact_match,
...), tasks that execute model-written code only with `allow_code_execution=true` (the tasks
themselves: `pdc.stages.lm_tasks`).

Scale: on a GPU each model is loaded in bf16 with SDPA attention and lm-eval picks its batch size
(`batch_size="auto"`); with several processes (`python -m pdc.stages.evaluate --job FILE` under
torchrun, started by `evaluate_models` for a `Launch` of more than one process) every rank scores
its share of the task requests and of the held-out blocks, and rank 0 gathers the results.

Conventions:
- `perplexity` is exp of the *token-weighted* mean next-token NLL over all blocks (each block
  contributes L-1 predictions), accumulated in float64.
- A task's result is a `TaskScore`: every metric lm-eval reported with its standard error, and
  the task's primary metric (the first one its config lists that lm-eval reported); the stage returns an
  `EvaluateResult` with one `ModelScores` per model column.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoTokenizer

from pdc.errors import PdcError
from pdc.files import sha256_bytes, sha256_file, sha256_json, write_json, write_text
from pdc.inputs.cache import cache_root
from pdc.inputs.data import token_blocks
from pdc.inputs.models import load_causal_lm
from pdc.inputs.shards import Blocks
from pdc.inputs.verify import content_hashes
from pdc.lang.settings import DataSource, EvalConfig
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
from pdc.stages.lm_tasks import run_tasks
from pdc.stages.ranks import eval_mode, model_device, rank_batches, rank_world, run_in_ranks, worker_main
from pdc.stages.train.precision import cpu_has_bf16

STAGE = "evaluate"


# ---- perplexity ---------------------------------------------------------------------------------
def _my_batches(model, blocks: Blocks | torch.Tensor, batch_size: int, progress: bool):
    """Yield (rows, ids on the model's device) for this rank's share of `blocks` [N, L>=2],
    batch by batch, with the model in eval mode (its mode is restored afterwards)."""
    shape = tuple(blocks.shape)
    if len(shape) != 2 or shape[1] < 2:
        raise PdcError(f"perplexity needs token blocks [N, L>=2], got shape {shape}", STAGE)
    device = model_device(model)
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
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=model_device(model))
        dist.all_reduce(sums)
        total, count = float(sums[0]), int(sums[1])
    return total, count


@torch.no_grad()
def block_nlls(model, blocks: Blocks | torch.Tensor, batch_size: int = 4, progress: bool = False) -> list[float]:
    """Mean next-token NLL of each block, in block order (blocks have equal lengths, so their
    mean is the token-weighted mean): the per-block values paired comparisons resample."""
    values = torch.zeros(len(blocks), dtype=torch.float64, device=model_device(model))
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
