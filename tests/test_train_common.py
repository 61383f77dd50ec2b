"""Helpers shared by the training tests (tiny models on disk, learnable token blocks). No tests here."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import make_tiny_model

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
