"""Text corpora: load, tokenize once (cached), pack into fixed-length blocks, hold out a slice.

Every stage that reads text (calibration, correction, distillation, perplexity, depth saliency)
goes through `token_blocks`, so they all see the same packing. Packing joins documents with the
tokenizer's EOS token and cuts the stream into `seq_len` blocks; the tail shorter than a block is
dropped. The held-out slice is the *last* `val_fraction` of blocks (a deterministic split).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pdc.errors import PdcError
from pdc.inputs import assets
from pdc.inputs.cache import cache_root
from pdc.lang.settings import DataSource

if TYPE_CHECKING:  # torch is imported where used: importing the data path stays fast
    import torch

_LOCAL_KINDS = {"json": "json", "jsonl": "json", "text": "text", "parquet": "parquet"}


def resolve_path(ref: str, base_dir: Path | None) -> Path:
    p = Path(ref).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def load_texts(source: DataSource, base_dir: Path | None = None, stage: str | None = None) -> list[str]:
    """All documents of `source` as strings, in file order."""
    if source.kind == "builtin":
        path = assets.builtin_data_path(source.ref)
        source = DataSource("jsonl", str(path), source.split, source.field)
        base_dir = None
    try:
        import datasets  # imported lazily: it is slow to import

        datasets.disable_progress_bars()
        if source.kind == "hf":
            ds = datasets.load_dataset(source.ref, split=source.split)
        else:
            path = resolve_path(source.ref, base_dir)
            if not path.exists():
                raise PdcError(f"data file not found: {path}", stage)
            builder = _LOCAL_KINDS[source.kind]
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except PdcError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs one line
        raise PdcError(f"cannot load data {source.kind}({source.ref!r}): {exc}".splitlines()[0], stage) from exc
    fld = source.field if source.kind != "text" else "text"
    if fld not in ds.column_names:
        raise PdcError(
            f"data {source.ref!r} has no field {fld!r} (fields: {', '.join(ds.column_names)})", stage
        )
    return [t for t in ds[fld] if isinstance(t, str) and t.strip()]


def pack(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int | None) -> "torch.Tensor":
    """Concatenate documents (EOS between them) and cut into [N, seq_len] blocks."""
    import torch

    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def token_blocks(
    source: DataSource,
    tokenizer,
    seq_len: int,
    base_dir: Path | None = None,
    stage: str | None = None,
    cache: bool = True,
) -> "torch.Tensor":
    """Packed token blocks [N, seq_len] of `source`, cached by content and tokenizer."""
    texts = load_texts(source, base_dir, stage)
    key = hashlib.sha256()
    key.update(json.dumps([source.kind, source.ref, source.split, source.field, seq_len]).encode())
    key.update(getattr(tokenizer, "name_or_path", "").encode())
    key.update(str(len(tokenizer)).encode())
    for t in texts:
        key.update(hashlib.sha256(t.encode()).digest())
    cache_file = cache_root() / "tokens" / f"{key.hexdigest()[:24]}.pt"
    import torch

    if cache and cache_file.exists():
        return torch.load(cache_file)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks = pack(ids, seq_len, tokenizer.eos_token_id)
    if len(blocks) == 0:
        raise PdcError(
            f"data {source.ref!r} has fewer than {seq_len} tokens: nothing to pack", stage
        )
    if cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save(blocks, tmp)
        tmp.replace(cache_file)
    return blocks


def split_blocks(blocks: "torch.Tensor", val_fraction: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(train, validation): the last `val_fraction` of blocks (at least one) is held out."""
    if val_fraction <= 0:
        return blocks, blocks[:0]
    n_val = max(1, int(round(len(blocks) * val_fraction)))
    if n_val >= len(blocks):
        raise PdcError(f"only {len(blocks)} blocks: too few to hold out {n_val} for validation")
    return blocks[:-n_val], blocks[-n_val:]


def take(blocks: "torch.Tensor", n: int, seed: int = 0) -> "torch.Tensor":
    """`n` blocks chosen reproducibly (all of them, in order, if fewer are available)."""
    if n >= len(blocks):
        return blocks
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(blocks), generator=g)[:n].sort().values
    return blocks[idx]
