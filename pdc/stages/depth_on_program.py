"""Depth saliency scored on the program: a candidate is the program with `drop_layers` applied (a
copy of the graph sharing the weights; nothing re-traced), so the one representation that is
emitted and locked is also the one scored, for every saliency kind:

- `loss`: `program_nll` of each candidate;
- `task`: lm-eval's `HFLM` runs each candidate through `ProgramLM`, the program seen as the
  Hugging Face causal LM lm-eval expects (loglikelihood requests: `model(ids).logits`);
- `cosine`: `block_influence` from one pass of the full program, its layers' residual stream read
  at the nodes `drop_layers` rewires (`TapProgram`).

Loss and task candidates are shared out over ranks (each rank scores whole candidates alone),
cosine's blocks by `rank_batches`. A source exported without weights (over 4 GiB, `streams`) is
scored (loss, cosine) with its weights read from the safetensors files per use
(`pdc.graph.stream`): memory of one weight and the activations.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.modeling_outputs import CausalLMOutput

from pdc.errors import PdcError
from pdc.graph.export import export_model
from pdc.graph.program import Program
from pdc.graph.stream import TapProgram, streamed
from pdc.graph.structure import structure_of
from pdc.lang.settings import Saliency
from pdc.passes.drop_layers import DropLayers
from pdc.stages.evaluate import EvalConfig, eval_dtype
from pdc.stages.lm_tasks import task_accuracy_items
from pdc.stages.ranks import local_only, rank_batches, rank_world

STAGE = "prune"

def without(program: Program, drop: Sequence[int]) -> Program:
    """The program with current layers `drop` removed; `program` itself is unchanged."""
    candidate = program.clone(share_weights=True)
    DropLayers(drop)(candidate)
    return candidate


# ---- the metrics -------------------------------------------------------------------------------
@torch.no_grad()
def program_nll(program: Program, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Token-weighted mean next-token NLL of `program` on `blocks` [N, L] (the formula of
    `pdc.stages.evaluate.nll_sum`: fp32 cross-entropy, summed in float64)."""
    module = streamed(program) if program.on_meta() else program.gm
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size].long()
        logits = module(ids)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                              reduction="sum")
        total += float(nll.double())
        count += ids[:, 1:].numel()
        del logits
    return total / max(count, 1)


class ProgramLM(torch.nn.Module):
    """The program as lm-eval's `HFLM(pretrained=...)` reads a Hugging Face causal LM: `config`,
    `device`, `eval()`, `tie_weights()` and `model(ids).logits`; enough for loglikelihood
    (multiple-choice) tasks, not for generation. lm-eval pads right and passes no mask: causal
    attention keeps the pads out of the scored positions, as in the Hugging Face model."""

    def __init__(self, program: Program):
        super().__init__()
        if program.on_meta():
            raise PdcError("task saliency needs the program's weights in memory", STAGE)
        self.gm = program.gm  # registered: lm-eval and pdc read device and dtype from the parameters
        self.config = AutoConfig.for_model(**program.hf_config)
        self.name_or_path = program.hf_config.get("_name_or_path", "")

    @property
    def device(self) -> torch.device:
        return next(self.gm.parameters()).device

    def train(self, mode: bool = True) -> "ProgramLM":
        self.training = mode  # an exported graph has no training mode (it was traced in eval mode)
        return self

    def tie_weights(self) -> None:
        """Nothing to tie: the graph reads the head it was exported with."""

    def forward(self, input_ids: torch.Tensor, **_) -> CausalLMOutput:
        n = input_ids.shape[1]
        # The exported sequence dimension starts at 2; a causal model's logits at position 0 do
        # not read position 1, so a 1-token input is scored twice-long and cut back.
        ids = input_ids if n >= 2 else input_ids.repeat(1, 2)
        return CausalLMOutput(logits=self.gm(ids)[:, :n])


@torch.no_grad()
def block_influence(program: Program, blocks: torch.Tensor, runs: Sequence[Sequence[int]], batch_size: int = 4,
                    progress: bool = False) -> list[float]:
    """1 - cos(residual stream entering run[0], leaving run[-1]) averaged over all tokens, for each
    run of consecutive layers, from passes of the full program up to the last layer tapped.
    Split over ranks (`rank_batches`): each block is read by one rank; the float64 sums are
    all-reduced."""
    layers = structure_of(program).layers
    ends = [(layers[run[0]].input, layers[run[-1]].output) for run in runs]
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, value: torch.Tensor) -> None:  # a function: fx calls it from generated code
        seen[name] = value

    tapped = TapProgram(program, {name for pair in ends for name in pair}, record)
    sums = torch.zeros(len(runs), dtype=torch.float64)
    count = 0
    for rows in rank_batches(len(blocks), batch_size, "block influence", progress):
        ids = blocks[rows].long()
        tapped.run(ids)
        for c, (enter, leave) in enumerate(ends):
            cos = F.cosine_similarity(seen[enter].double(), seen[leave].double(), dim=-1)
            sums[c] += float((1.0 - cos).sum())
        count += ids.numel()
        seen.clear()
    if rank_world()[1] > 1:
        both = torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)])
        dist.all_reduce(both)
        sums, count = both[:-1], int(both[-1])
    return (sums / max(count, 1)).tolist()


# Items each task measurement scored, in this process (the saliency table's `items`).
_task_items: list = []


def task_items_seen() -> set:
    """The item counts the task measurements of this process scored since the last call."""
    seen = {n for n in _task_items if n is not None}
    _task_items.clear()
    return seen


def measure(program: Program, saliency: Saliency, blocks=None, tokenizer=None, tasks_dir: Path | None = None,
            batch_size: int = 4) -> float:
    """The loss or task metric of `program` (a candidate or the full program)."""
    if saliency.kind == "loss":
        return program_nll(program, blocks, batch_size)
    if saliency.kind == "task":
        value, n = task_accuracy_items(ProgramLM(program), tokenizer, saliency.task, saliency.shots, tasks_dir,
                                       saliency.limit)
        _task_items.append(n)
        return value
    raise PdcError(f"unknown depth saliency {saliency.kind!r} (expected loss, task or cosine)", STAGE)


# ---- scoring -------------------------------------------------------------------------------------
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


def scoring_program(program: Program, model, saliency: Saliency) -> Program:
    """The program candidates are scored on: with `task(..., precision=bf16)` the export of a bf16
    copy of `model` (the source `program` was exported from) where the device has bf16 (as the
    evaluation's `precision=bf16`; timedial 3x faster on this project's CPU), else `program`. An
    fp32 graph cannot just be cast: export bakes the traced dtype into its casts. The copy only
    scores; the pruned weights come from `program`."""
    if saliency.kind != "task" or saliency.precision is None:
        return program
    device = next(model.parameters()).device
    dtype = eval_dtype(EvalConfig(precision=saliency.precision), device)
    if dtype == next(model.parameters()).dtype:
        return program
    return export_model(copy.deepcopy(model).to(dtype), program.probe, hf_config=program.hf_config)


def score_candidates(program: Program, cands: Sequence[Sequence[int]], saliency: Saliency, blocks=None,
                     tokenizer=None, tasks_dir: Path | None = None, batch_size: int = 4,
                     progress: bool = True) -> tuple[list[float], float | None]:
    """(metric per candidate, metric of the full program) for `saliency.kind`.

    loss/task: the program with each candidate removed; cosine: the candidate's block influence
    (the full-program baseline is then None: nothing is removed).
    """
    check_saliency_inputs(saliency, blocks, tokenizer)
    if saliency.kind == "cosine":
        return block_influence(program, blocks, cands, batch_size, progress), None
    # Split over ranks by candidate: rank r measures the full program (r = 0) and candidates r,
    # r + world, ... alone, exactly as one process would; the values are then summed.
    rank, world = rank_world()
    values = torch.zeros(len(cands) + 1, dtype=torch.float64)
    with local_only():
        if rank == 0:
            values[-1] = measure(program, saliency, blocks, tokenizer, tasks_dir, batch_size)
        mine = list(range(rank, len(cands), world))
        for c in tqdm(mine, desc=f"depth saliency ({saliency.kind}, on the program)", unit="cand",
                      disable=not progress or rank != 0):
            values[c] = measure(without(program, cands[c]), saliency, blocks, tokenizer, tasks_dir, batch_size)
    if world > 1:
        dist.all_reduce(values)  # each entry was filled by exactly one rank
    return values[:-1].tolist(), float(values[-1])
