"""Text corpora: load, tokenize once (in parallel, cached), pack into token shards, take views.

Every stage that reads text (calibration, correction, distillation, perplexity, depth saliency,
the lock) goes through `token_blocks`, so they all see the same packing and the same files:
  0. `check_corpus`: one streaming pass that turns every fault of the files into one line
     naming the file and line (JSON), before anything is tokenized;
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
from collections import OrderedDict
from pathlib import Path

import numpy as np

from pdc.errors import PdcError, json_reason, one_line
from pdc.files import staged_dir
from pdc.inputs import assets
from pdc.inputs.cache import cache_root
from pdc.inputs.shards import TOKENS, Blocks, ShardWriter, token_dtype
from pdc.lang.settings import DataSource

_LOCAL_KINDS = ("json", "jsonl", "text", "parquet")
_CHECKED: "OrderedDict[tuple, int]" = OrderedDict()  # corpora already checked, by file identity
_CHECKED_SIZE = 16


def resolve_path(ref: str, base_dir: Path | None) -> Path:
    p = Path(ref).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def check_corpus(source: DataSource, base_dir: Path | None = None, stage: str | None = None) -> int:
    """Read `source` once, streaming, and return its number of non-empty documents; every fault
    is a one-line `PdcError` naming the file (and for JSON the line and column): a missing or
    empty file, malformed JSON, a record without the field or whose field is not a string, a
    corpus with no text at all, errors of `datasets`/`pyarrow` with their cause. Memory stays one
    record (one file for a JSON array). A corpus already checked with the same file identity is
    not read again (the runner checks every corpus before a build starts; the stages then
    tokenize it)."""
    if source.kind == "builtin":
        source = DataSource("jsonl", str(assets.builtin_data_path(source.ref)), source.split, source.field)
        base_dir = None
    fld = "text" if source.kind == "text" else source.field
    if source.kind == "hf":
        key: tuple = ("hf", source.ref, source.split, fld)
    elif source.kind in _LOCAL_KINDS:
        path = resolve_path(source.ref, base_dir)
        if not path.is_file():
            raise PdcError(f"data file not found: {path}" if not path.exists() else f"data path {path} is not a file",
                           stage)
        st = path.stat()
        key = (source.kind, str(path.resolve()), fld, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    else:
        raise PdcError(f"unknown data source kind {source.kind!r}", stage)
    if key in _CHECKED:
        _CHECKED.move_to_end(key)
        return _CHECKED[key]
    if source.kind == "hf":
        documents = _hf_documents(source, fld, stage)
    else:
        if path.stat().st_size == 0:
            raise PdcError(f"data file {path} is empty (0 bytes)", stage)
        reader = {"json": _json_documents, "jsonl": _jsonl_documents, "text": _line_documents,
                  "parquet": _parquet_documents}
        documents = reader[source.kind](path, fld, stage)
        if not documents:
            raise PdcError(f"data file {path} has no text: every {fld!r} value is empty", stage)
    _CHECKED[key] = documents
    while len(_CHECKED) > _CHECKED_SIZE:
        _CHECKED.popitem(last=False)
    return documents


def _kind_of(value) -> str:
    return "null" if value is None else {bool: "a boolean", int: "a number", float: "a number", list: "a list",
                                         dict: "an object"}.get(type(value), type(value).__name__)


def _text_of(record, fld: str, where: str, stage: str | None) -> str:
    """The string `record[fld]`, or a one-line error saying what is there instead."""
    if not isinstance(record, dict):
        raise PdcError(f"{where}: {_kind_of(record)} where a JSON object with a {fld!r} field was expected", stage)
    if fld not in record:
        fields = ", ".join(map(repr, list(record)[:8])) or "none"
        raise PdcError(f"{where}: no field {fld!r} (fields: {fields}); name the field with field=\"...\" "
                       "in the data declaration", stage)
    value = record[fld]
    if not isinstance(value, str):
        shown = json.dumps(value)[:40] if value is not None else "null"
        raise PdcError(f"{where}: field {fld!r} is {_kind_of(value)} ({shown}), not a string", stage)
    return value


def _jsonl_documents(path: Path, fld: str, stage: str | None) -> int:
    documents = records = 0
    first_without: tuple[int, list] | None = None  # (line, its fields) of the first record lacking `fld`
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise PdcError(f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})", stage) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PdcError(f"{path}:{lineno}:{exc.colno}: not valid JSON ({json_reason(exc)}); each line must "
                               "be one JSON object", stage) from None
            records += 1
            if isinstance(record, dict) and fld not in record:
                first_without = first_without or (lineno, list(record))
                continue
            text = _text_of(record, fld, f"{path}:{lineno}", stage)
            if first_without is not None:  # the field exists, but an earlier record lacks it
                _text_of(dict.fromkeys(first_without[1]), fld, f"{path}:{first_without[0]}", stage)
            documents += bool(text.strip())
    if records == 0:
        raise PdcError(f"data file {path} holds no JSON records (only blank lines)", stage)
    if first_without is not None:
        raise PdcError(f"data {str(path)!r} has no field {fld!r} (fields: {', '.join(first_without[1])})", stage)
    return documents


def _json_documents(path: Path, fld: str, stage: str | None) -> int:
    """A JSON array of records, or JSON Lines (what `datasets`' json loader accepts)."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    if not head.startswith(b"["):
        return _jsonl_documents(path, fld, stage)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PdcError(f"{path}:{line}: not UTF-8 text ({exc.reason})", stage) from None
    except json.JSONDecodeError as exc:
        raise PdcError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({json_reason(exc)})", stage) from None
    if records and all(isinstance(r, dict) and fld not in r for r in records):
        raise PdcError(f"data {str(path)!r} has no field {fld!r} (fields: {', '.join(records[0])})", stage)
    return sum(bool(_text_of(r, fld, f"{path}: record {i}", stage).strip()) for i, r in enumerate(records, 1))


def _line_documents(path: Path, fld: str, stage: str | None) -> int:
    """One document per line (as `datasets`' text loader reads it)."""
    documents = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                documents += bool(raw.decode("utf-8").strip())
            except UnicodeDecodeError as exc:
                raise PdcError(f"{path}:{lineno}: not UTF-8 text ({exc.reason})", stage) from None
    return documents


def _parquet_documents(path: Path, fld: str, stage: str | None) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    documents = 0
    try:
        reader = pq.ParquetFile(path)
        names = reader.schema_arrow.names
        if fld not in names:
            raise PdcError(f"data {str(path)!r} has no field {fld!r} (fields: {', '.join(names)})", stage)
        column_type = reader.schema_arrow.field(fld).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise PdcError(f"{path}: field {fld!r} holds {column_type} values, not strings", stage)
        row = 0
        for batch in reader.iter_batches(columns=[fld]):
            column = batch.column(0)
            if column.null_count:
                first = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
                raise PdcError(f"{path}: row {row + first}: field {fld!r} is null, not a string", stage)
            documents += int(pc.sum(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)).as_py() or 0)
            row += len(column)
    except PdcError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise PdcError(f"cannot read parquet file {path}: {one_line(exc)}", stage) from exc
    return documents


def _hf_documents(source: DataSource, fld: str, stage: str | None) -> int:
    try:
        import datasets  # imported lazily: it is slow to import

        datasets.disable_progress_bars()
        ds = datasets.load_dataset(source.ref, split=source.split)
    except Exception as exc:  # datasets raises many types; the user needs one line with the cause
        raise PdcError(f"cannot load data hf({source.ref!r}) split {source.split!r} from the local cache "
                       f"({one_line(exc)}); pdc never downloads at run time", stage) from exc
    if fld not in ds.column_names:
        raise PdcError(f"data {source.ref!r} has no field {fld!r} (fields: {', '.join(ds.column_names)})", stage)
    documents = 0
    for i, value in enumerate(ds[fld]):
        if not isinstance(value, str):
            raise PdcError(f"data {source.ref!r} row {i}: field {fld!r} is {_kind_of(value)}, not a string", stage)
        documents += bool(value.strip())
    if not documents:
        raise PdcError(f"data {source.ref!r} has no text: every {fld!r} value is empty", stage)
    return documents


# datasets' builder for each local data kind
_BUILDERS = {"json": "json", "jsonl": "json", "text": "text", "parquet": "parquet"}


def load_text_dataset(source: DataSource, base_dir: Path | None = None, stage: str | None = None):
    """The documents of `source` as an Arrow-backed `datasets.Dataset` holding the text column
    only, in file order: datasets converts the files once into its cache and memory-maps them, so
    nothing is read into this process's memory here."""
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
    check_corpus(source, base_dir, stage)  # one-line faults with file and line, before datasets sees it
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
        raise PdcError(f"{label} has {seen:,} tokens, but one block of seq_len={seq_len} needs {seq_len:,}: "
                       "give more text or a shorter seq_len", stage)
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
            f"{blocks.label} has {len(blocks)} block(s) of seq_len={blocks.seq_len} "
            f"({blocks.tokens:,} tokens), but {what}={n} were asked for: lower {what}= or seq_len=, "
            "or give more text", stage)
    if n == len(blocks):
        return blocks
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(blocks), generator=g)[:n].sort().values
    return blocks[idx.numpy()]
