"""Text corpora: load, tokenize once (cached), pack into fixed-length blocks, hold out a slice.

Every stage that reads text (calibration, correction, distillation, perplexity, depth saliency)
goes through `token_blocks`, so they all see the same packing. Packing joins documents with the
tokenizer's EOS token and cuts the stream into `seq_len` blocks; the tail shorter than a block is
dropped. The held-out slice is the *last* `val_fraction` of blocks (a deterministic split).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pdc.errors import PdcError, json_reason, one_line
from pdc.inputs import assets
from pdc.inputs.cache import cache_root
from pdc.lang.settings import DataSource

if TYPE_CHECKING:  # torch is imported where used: importing the data path stays fast
    import torch

_LOCAL_KINDS = ("json", "jsonl", "text", "parquet")
_TEXTS_MEMO: "OrderedDict[tuple, list[str]]" = OrderedDict()  # the last corpora read, by file identity
_MEMO_SIZE = 4


def resolve_path(ref: str, base_dir: Path | None) -> Path:
    p = Path(ref).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def load_texts(source: DataSource, base_dir: Path | None = None, stage: str | None = None) -> list[str]:
    """All non-empty documents of `source` as strings, in file order.

    Every fault is a one-line `PdcError` naming the file (and the line, for JSON): a missing or
    empty file, malformed JSON, a record without the field or whose field is not a string, a
    corpus with no text at all, and errors of `datasets`/`pyarrow` with their cause. A corpus
    read recently with the same file identity is returned from memory (the runner checks every
    corpus before a build starts, then the stages read it again)."""
    if source.kind == "builtin":
        path = assets.builtin_data_path(source.ref)
        source = DataSource("jsonl", str(path), source.split, source.field)
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
    if key in _TEXTS_MEMO:
        _TEXTS_MEMO.move_to_end(key)
        return _TEXTS_MEMO[key]
    if source.kind == "hf":
        texts = _hf_texts(source, fld, stage)
    else:
        if path.stat().st_size == 0:
            raise PdcError(f"data file {path} is empty (0 bytes)", stage)
        reader = {"json": _json_texts, "jsonl": _jsonl_texts, "text": _line_texts, "parquet": _parquet_texts}
        texts = reader[source.kind](path, fld, stage)
        if not texts:
            raise PdcError(f"data file {path} has no text: every {fld!r} value is empty", stage)
    _TEXTS_MEMO[key] = texts
    while len(_TEXTS_MEMO) > _MEMO_SIZE:
        _TEXTS_MEMO.popitem(last=False)
    return texts


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


def _jsonl_texts(path: Path, fld: str, stage: str | None) -> list[str]:
    texts: list[str] = []
    first_without: tuple[int, list] | None = None  # (line, its fields) of the first record lacking `fld`
    records = 0
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
            if text.strip():
                texts.append(text)
    if records == 0:
        raise PdcError(f"data file {path} holds no JSON records (only blank lines)", stage)
    if first_without is not None:
        raise PdcError(f"data {str(path)!r} has no field {fld!r} (fields: {', '.join(first_without[1])})", stage)
    return texts


def _json_texts(path: Path, fld: str, stage: str | None) -> list[str]:
    """A JSON array of records, or JSON Lines (what `datasets`' json loader accepts)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PdcError(f"{path}:{line}: not UTF-8 text ({exc.reason})", stage) from None
    if not text.lstrip().startswith("["):
        return _jsonl_texts(path, fld, stage)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PdcError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({json_reason(exc)})", stage) from None
    if records and all(isinstance(r, dict) and fld not in r for r in records):
        raise PdcError(f"data {str(path)!r} has no field {fld!r} (fields: {', '.join(records[0])})", stage)
    out = [_text_of(r, fld, f"{path}: record {i}", stage) for i, r in enumerate(records, 1)]
    return [t for t in out if t.strip()]


def _line_texts(path: Path, fld: str, stage: str | None) -> list[str]:
    """One document per line (as `datasets`' text loader reads it)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PdcError(f"{path}:{line}: not UTF-8 text ({exc.reason})", stage) from None
    return [line for line in lines if line.strip()]


def _parquet_texts(path: Path, fld: str, stage: str | None) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if fld not in schema.names:
            raise PdcError(f"data {str(path)!r} has no field {fld!r} (fields: {', '.join(schema.names)})", stage)
        column = pq.read_table(path, columns=[fld]).column(fld)
    except PdcError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise PdcError(f"cannot read parquet file {path}: {one_line(exc)}", stage) from exc
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise PdcError(f"{path}: field {fld!r} holds {column.type} values, not strings", stage)
    values = column.to_pylist()
    if None in values:
        raise PdcError(f"{path}: row {values.index(None)}: field {fld!r} is null, not a string", stage)
    return [t for t in values if t.strip()]


def _hf_texts(source: DataSource, fld: str, stage: str | None) -> list[str]:
    try:
        import datasets  # imported lazily: it is slow to import

        datasets.disable_progress_bars()
        ds = datasets.load_dataset(source.ref, split=source.split)
    except Exception as exc:  # datasets raises many types; the user needs one line with the cause
        raise PdcError(f"cannot load data hf({source.ref!r}) split {source.split!r} from the local cache "
                       f"({one_line(exc)}); pdc never downloads at run time", stage) from exc
    if fld not in ds.column_names:
        raise PdcError(
            f"data {source.ref!r} has no field {fld!r} (fields: {', '.join(ds.column_names)})", stage
        )
    out = []
    for i, value in enumerate(ds[fld]):
        if not isinstance(value, str):
            raise PdcError(f"data {source.ref!r} row {i}: field {fld!r} is {_kind_of(value)}, not a string", stage)
        if value.strip():
            out.append(value)
    if not out:
        raise PdcError(f"data {source.ref!r} has no text: every {fld!r} value is empty", stage)
    return out


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
