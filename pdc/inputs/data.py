"""Text corpora: load, tokenize once (in parallel, cached), pack into token shards, take views.

Every stage that reads text (calibration, correction, distillation, perplexity, depth saliency,
the lock) goes through `token_blocks`, so they all see the same packing and the same files:
  1. `load_text_dataset`: the corpus as an Arrow-backed `datasets.Dataset` (memory-mapped);
  2. `tokenize_dataset`: `datasets.map(num_proc=...)` into the datasets cache (token ids per
     document, EOS appended);
  3. `pack_into_shards`: the documents joined in order and cut into `seq_len` blocks, written as
     uint16 (uint32 for vocabularies over 65,536) shards under `<cache>/tokens/<key>/`
     (`pdc.inputs.shards`); the tail shorter than a block is dropped;
  4. views (`Blocks`): the held-out slice is the *last* `val_fraction` of blocks (a deterministic
     split), `take` picks N blocks reproducibly; reading a view reads only its rows.
The shard key covers the corpus (datasets' fingerprint of the files), the tokenizer's content,
seq_len and the packing rule, so a corpus is tokenized once for all stages, specs and ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pdc.errors import PdcError
from pdc.files import staged_dir
from pdc.inputs import assets
from pdc.inputs.cache import cache_root
from pdc.inputs.shards import TOKENS, Blocks, ShardWriter, token_dtype
from pdc.lang.settings import DataSource

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


# datasets' builder for each local data kind
_BUILDERS = {"json": "json", "jsonl": "json", "text": "text", "parquet": "parquet"}


def load_text_dataset(source: DataSource, base_dir: Path | None = None, stage: str | None = None):
    """The documents of `source` as an Arrow-backed `datasets.Dataset` holding the text column
    only, in file order: datasets converts the files once into its cache and memory-maps them, so
    nothing is read into this process's memory here (`load_texts` returns a list instead)."""
    if source.kind == "builtin":
        source = DataSource("jsonl", str(assets.builtin_data_path(source.ref)), source.split, source.field)
        base_dir = None
    try:
        import datasets  # imported lazily: it is slow to import

        datasets.disable_progress_bars()
        if source.kind == "hf":
            ds = datasets.load_dataset(source.ref, split=source.split)
        else:
            path = resolve_path(source.ref, base_dir)
            if not path.is_file():
                raise PdcError(f"data file not found: {path}", stage)
            ds = datasets.load_dataset(_BUILDERS[source.kind], data_files=str(path), split="train")
    except PdcError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PdcError(f"cannot load data {source.kind}({source.ref!r}): {first}", stage) from exc
    fld = source.field if source.kind != "text" else "text"
    if fld not in ds.column_names:
        raise PdcError(f"data {source.ref!r} has no field {fld!r} (fields: {', '.join(ds.column_names)})", stage)
    return ds.select_columns([fld])


# ---- tokenization: once per corpus and tokenizer, in parallel, into the datasets cache ----------
def tokenizer_identity(tokenizer) -> str:
    """Content identity of a tokenizer (its vocabulary, merges and special tokens), not its path:
    a teacher and its pruned student share one tokenizer and so one set of shards."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([len(tokenizer), tokenizer.eos_token_id]).encode())
    return h.hexdigest()[:24]


def _tokenize_batch(batch: dict, tokenizer, column: str, eos_id: int | None) -> dict:
    """Token ids of each document with EOS appended; empty documents give no tokens."""
    texts = [t if isinstance(t, str) and t.strip() else "" for t in batch[column]]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    tail = [eos_id] if eos_id is not None else []
    return {"ids": [x + tail if t else [] for x, t in zip(ids, texts)]}


def default_num_proc(documents: int) -> int:
    """Tokenizing processes: one per core, but no process for fewer than 2,000 documents (forking
    and pickling the tokenizer costs more than it saves on small corpora)."""
    return max(1, min(os.cpu_count() or 1, documents // 2000))


def tokenize_dataset(ds, tokenizer, num_proc: int | None = None, progress: bool = False, stage: str | None = None):
    """`ds` (one text column) mapped to a column `ids` of token ids (+ EOS per document) with
    `datasets.map(num_proc=...)`; the result lives in the datasets cache, keyed by the corpus
    fingerprint and the tokenizer's content, so a second call reads it back instead of tokenizing."""
    import datasets

    num_proc = num_proc or default_num_proc(len(ds))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers: no nested thread pools
    dtype = "uint16" if len(tokenizer) <= 1 << 16 else "uint32"
    fingerprint = hashlib.sha256(f"{ds._fingerprint}:{tokenizer_identity(tokenizer)}:{dtype}".encode()).hexdigest()[:16]
    bars = datasets.is_progress_bar_enabled()
    if progress and len(ds) >= 10_000:
        datasets.enable_progress_bars()
    try:
        return ds.map(
            _tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None,
            remove_columns=ds.column_names, new_fingerprint=fingerprint, desc="tokenizing",
            fn_kwargs={"tokenizer": tokenizer, "column": ds.column_names[0], "eos_id": tokenizer.eos_token_id},
            features=datasets.Features({"ids": datasets.Sequence(datasets.Value(dtype))}),
        )
    except PdcError:
        raise
    except Exception as exc:  # a worker failure surfaces as one of many types
        raise PdcError(f"tokenization failed: {(str(exc).splitlines() or [type(exc).__name__])[0]}", stage) from exc
    finally:
        if not bars:
            datasets.disable_progress_bars()


# ---- packing: a stream of documents cut into seq_len blocks, written to shards -----------------
def pack_into_shards(tokenized, directory: Path, seq_len: int, vocab_size: int, meta: dict,
                     rows_per_shard: int | None = None, batch_size: int = 4096) -> int:
    """Concatenate the `ids` of `tokenized` in order and write full `seq_len` blocks as the
    `tokens` column of `directory`; the tail shorter than a block is dropped. Reads `batch_size`
    documents at a time: memory is one batch plus one shard buffer, whatever the corpus size.
    Returns the number of tokens seen."""
    import pyarrow.compute as pc

    dtype = token_dtype(vocab_size)
    writer = ShardWriter(directory, TOKENS, dtype, (seq_len,), rows_per_shard)
    carry = np.empty(0, dtype=dtype)
    seen = docs = 0
    for ids in _id_batches(tokenized, batch_size):
        docs += int(np.count_nonzero(pc.list_value_length(ids).to_numpy(zero_copy_only=False)))
        values = ids.flatten().to_numpy(zero_copy_only=False)
        if values.size and int(values.max()) >= vocab_size:
            raise PdcError(f"token id {int(values.max())} is outside the vocabulary of {vocab_size}")
        seen += values.size
        stream = np.concatenate([carry, values.astype(dtype, copy=False)])
        full = len(stream) // seq_len * seq_len
        if full:
            writer.append(stream[:full].reshape(-1, seq_len))
        carry = stream[full:].copy()
    writer.close({**meta, "documents": docs, "tokens_seen": seen, "tail_dropped": int(len(carry))})
    return seen


def _id_batches(tokenized, batch_size: int):
    """The `ids` column in order, a batch of documents at a time. The datasets cache files are read
    with plain file reads, not memory-mapped, so the pages already packed do not stay resident in
    this process (a mapped file would keep up to the whole corpus in its RSS)."""
    import pyarrow as pa

    files = [f["filename"] for f in tokenized.cache_files]
    if not files or tokenized._indices is not None:  # in-memory or reordered: datasets' own iterator
        for table in tokenized.with_format("arrow").iter(batch_size=batch_size):
            yield table.column("ids").combine_chunks()
        return
    for name in files:
        with pa.OSFile(name) as f:
            reader = pa.ipc.open_stream(f)
            for batch in reader:
                yield batch.column(batch.schema.get_field_index("ids"))


def shard_key(ds, source: DataSource, tokenizer, seq_len: int) -> str:
    """Content key of a corpus's token shards: the corpus (datasets' fingerprint of the loaded
    files), the tokenizer's content, the block length and the packing (EOS-joined documents)."""
    parts = [SHARD_LAYOUT, ds._fingerprint, [source.kind, source.ref, source.split, source.field],
             tokenizer_identity(tokenizer), int(seq_len)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


SHARD_LAYOUT = "eos-joined-v1"  # the packing rule: part of every shard key


def describe(source: DataSource) -> str:
    return f"{source.kind}({source.ref!r})"


def token_blocks(source: DataSource, tokenizer, seq_len: int, base_dir: Path | None = None,
                 stage: str | None = None, num_proc: int | None = None, progress: bool = False,
                 label: str | None = None) -> Blocks:
    """The packed token blocks of `source` as a memory-mapped view [N, seq_len].

    Tokenized and packed once per corpus, tokenizer and seq_len into `<cache>/tokens/<key>/`;
    later calls (other stages, other specs, the training ranks) only map the files."""
    label = label or f"data {describe(source)}"
    ds = load_text_dataset(source, base_dir, stage)
    key = shard_key(ds, source, tokenizer, seq_len)
    directory = cache_root() / "tokens" / key
    if not (directory / f"{TOKENS}.json").exists():
        meta = {"key": key, "source": describe(source), "tokenizer": tokenizer_identity(tokenizer),
                "seq_len": int(seq_len), "eos_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer),
                "layout": SHARD_LAYOUT}
        tokenized = tokenize_dataset(ds, tokenizer, num_proc, progress, stage)
        try:
            with staged_dir(directory) as tmp:
                pack_into_shards(tokenized, tmp, seq_len, len(tokenizer), meta)
        except PdcError as exc:
            exc.stage = exc.stage or stage
            raise
        except OSError as exc:
            raise PdcError(f"cannot write token shards to {directory}: {exc.strerror or exc}", stage) from exc
    blocks = Blocks.open(directory, label)
    if len(blocks) == 0:
        seen = blocks.array.meta.get("tokens_seen", 0)
        raise PdcError(f"{label} has {seen:,} tokens: fewer than one block of seq_len={seq_len}", stage)
    return blocks


# ---- views: held-out split and small reproducible samples --------------------------------------
def split_blocks(blocks: Blocks, val_fraction: float, stage: str | None = None) -> tuple[Blocks, Blocks]:
    """(train, validation): the last `val_fraction` of blocks (at least one) is held out."""
    if val_fraction <= 0:
        return blocks, blocks[:0]
    n_val = max(1, int(round(len(blocks) * val_fraction)))
    if n_val >= len(blocks):
        raise PdcError(
            f"{blocks.label} has {len(blocks)} block(s) of seq_len={blocks.seq_len}: too few to hold out "
            f"{n_val} for validation (val_fraction={val_fraction:g}) and train on the rest; give more text, "
            "a shorter seq_len or val_fraction=0", stage)
    return blocks[:-n_val], blocks[-n_val:]


def take(blocks: Blocks, n: int, seed: int = 0, what: str = "samples", stage: str | None = None) -> Blocks:
    """`n` blocks chosen reproducibly (sorted by position), or all of them, in order, when `n`
    equals their number. Fewer than `n` is an error that says how many were found: a stage that
    asked for n samples never runs on fewer without being told."""
    if n > len(blocks):
        raise PdcError(
            f"{blocks.label} packs into {len(blocks)} block(s) of seq_len={blocks.seq_len} "
            f"({blocks.tokens:,} tokens), but {what}={n} were asked for: lower {what}= or seq_len=, "
            "or give more text", stage)
    if n == len(blocks):
        return blocks
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(blocks), generator=g)[:n].sort().values
    return blocks[idx.numpy()]
