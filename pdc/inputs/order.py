"""The order in which training reads blocks, and the position in it that a checkpoint records.

Global batch s (0-based) is positions [s*G, (s+1)*G) of an endless sequence of seeded per-epoch
permutations of the blocks; rank r of W takes micro-batch a's slice (a*W + r)*micro ... of it.
The order is a pure function of (seed, position): 1 process and N processes with the same global
batch read the same samples, and a run resumed at position p reads exactly what an uninterrupted
run reads after p. Every column of a shard directory (tokens now, cached teacher logits later) is
read with the same row numbers, so they stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdc.errors import PdcError


def epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=g)


def global_batch_indices(n_blocks: int, global_batch: int, step: int, seed: int) -> torch.Tensor:
    """Block positions of optimizer step `step` (0-based): a window on seeded epoch permutations."""
    return window(n_blocks, step * global_batch, global_batch, seed)


def window(n_blocks: int, start: int, count: int, seed: int) -> torch.Tensor:
    """Positions [start, start + count) of the endless epoch-permutation sequence."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        epoch, offset = divmod(pos, n_blocks)
        order = epoch_order(n_blocks, seed, epoch)
        take = min(count - len(out), n_blocks - offset)
        out.extend(order[offset : offset + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.long)


def rank_micro_batch(indices: torch.Tensor, micro: int, accum_step: int, rank: int, world: int) -> torch.Tensor:
    start = (accum_step * world + rank) * micro
    return indices[start : start + micro]


@dataclass
class DataCursor:
    """Where a training run is in its data: `position` blocks of the order consumed so far.

    `next_batch` returns the next global batch and advances; `state_dict` is what a checkpoint
    stores and `load_state_dict` restores it, refusing a state taken on other data (another block
    count, seed or global batch), which would silently repeat or skip blocks."""

    n_blocks: int
    global_batch: int
    seed: int
    position: int = 0

    def next_batch(self) -> torch.Tensor:
        out = window(self.n_blocks, self.position, self.global_batch, self.seed)
        self.position += self.global_batch
        return out

    @property
    def epoch(self) -> int:
        return self.position // self.n_blocks

    def state_dict(self) -> dict:
        return {"position": self.position, "n_blocks": self.n_blocks, "global_batch": self.global_batch,
                "seed": self.seed}

    def load_state_dict(self, state: dict, stage: str | None = None) -> None:
        mine = self.state_dict()
        for key in ("n_blocks", "global_batch", "seed"):
            if state.get(key) != mine[key]:
                raise PdcError(f"the checkpoint was taken with {key}={state.get(key)}, this run has "
                               f"{mine[key]}: it cannot continue that run's data order", stage)
        self.position = int(state["position"])
