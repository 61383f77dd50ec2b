"""Helpers shared by the training tests (tiny models on disk, learnable token blocks, the LR schedule
replayed). No tests here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model
from pdc.inputs.shards import Blocks, write_rows
from pdc.lang.settings import TrainConfig
from pdc.plan.training import scheduler_config
from pdc.stages.train.schedule import start_scheduler

VOCAB = 128
SEQ = 16


def save_tiny(path: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    model = make_tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(path)
    return Path(path)


def learnable_blocks(n: int, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """Blocks of a few arithmetic token patterns: a tiny model learns them within a few steps."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, VOCAB, (n, 1), generator=g)
    strides = torch.randint(1, 4, (n, 1), generator=g)
    return (starts + strides * torch.arange(seq)) % VOCAB


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def as_shards(blocks: torch.Tensor, directory: Path) -> Blocks:
    """`blocks` written as token shards (the format `token_blocks` produces), as a view."""
    write_rows(directory, blocks.numpy().astype(np.uint16), meta={"source": "learnable blocks"})
    return Blocks.open(directory)


def train_val(blocks: torch.Tensor, n_train: int, directory: Path) -> tuple[Blocks, Blocks]:
    """(first n_train blocks, the rest) as views on one shard directory."""
    view = as_shards(blocks, directory)
    return view[:n_train], view[n_train:]


def lr_schedule(cfg: TrainConfig, steps: int) -> list[float]:
    """The LR of each optimizer step 1..steps, from the same DeepSpeed scheduler the engine builds
    (`scheduler_config`), started as the training loop starts it."""
    from deepspeed.runtime import lr_schedules  # deepspeed takes seconds to import: only when used

    sched_cfg = scheduler_config(cfg, steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = getattr(lr_schedules, sched_cfg["type"])(opt, **sched_cfg["params"])
    start_scheduler(sched)
    out = []
    for _ in range(steps):
        out.append(float(opt.param_groups[0]["lr"]))
        sched.step()
    return out
