"""Depth saliency by loss, scored on the program: a candidate is the program with `drop_layers`
applied (a copy of the graph sharing the weights; nothing re-traced), so the one representation
that is emitted and locked is also the one scored.

A source exported without weights (over 4 GiB, `streams`) is scored with its weights read from
the safetensors files per use (`pdc.graph.stream`): memory of one weight and the activations.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pdc.graph.program import Program
from pdc.graph.stream import streamed
from pdc.passes.drop_layers import DropLayers


def without(program: Program, drop: Sequence[int]) -> Program:
    """The program with current layers `drop` removed; `program` itself is unchanged."""
    candidate = program.clone(share_weights=True)
    DropLayers(drop)(candidate)
    return candidate


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


def loss_scores(program: Program, cands: Sequence[Sequence[int]], blocks: torch.Tensor, batch_size: int = 4,
                progress: bool = True) -> tuple[list[float], float]:
    """(mean NLL with each candidate removed, mean NLL of the full program)."""
    baseline = program_nll(program, blocks, batch_size)
    values = []
    for cand in tqdm(cands, desc="depth saliency (loss, on the program)", unit="cand", disable=not progress):
        values.append(program_nll(without(program, cand), blocks, batch_size))
    return values, baseline
