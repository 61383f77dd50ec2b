"""Row-aligned arrays on disk, memory-mapped: the token shards every stage reads blocks from.

A shard directory holds one or more *columns*, each an array of rows of one fixed shape split
over shard files. Column `tokens` holds the packed token blocks (row shape `[seq_len]`); a later
column (a teacher's top-k logits per token) has the same number of rows in the same order, so row
`i` of every column describes block `i` and one list of row indices reads all of them.

    <column>.json         {"version": 1, "column": "tokens", "dtype": "uint16", "row_shape": [256],
                           "rows": N, "shards": [{"file": "tokens-00000.bin", "rows": 4096}, ...],
                           "meta": {...what produced it...}}
    <column>-00000.bin    rows in C order, little-endian, no header (np.memmap reads them)

A directory is written whole into `<dir>.tmp/` and renamed (`pdc.files.staged_dir`), so a reader
never sees half a column. Readers map the files read-only and copy only the rows they ask for:
a process that reads N blocks holds N blocks, whatever the corpus size.

`Blocks` is a view on the `tokens` column: a contiguous range or an explicit list of rows. Views
are what stages pass around (and what a training stage records in its `stage.json`); `read`
turns rows into a LongTensor.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from pdc.errors import PdcError
from pdc.files import read_versioned_json, staged_dir, write_json

FORMAT_VERSION = 1
TOKENS = "tokens"
# 2^28 bytes per shard file: large enough that a 94B-token corpus is a few hundred files, small
# enough that a shard can be copied or checked on its own.
SHARD_BYTES = 1 << 28


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends rows of one column to shard files in `directory` (rows_per_shard rows per file).

    Invariant: after `close`, `<column>.json` lists every file with its row count, and the row
    count of the column is their sum."""

    def __init__(self, directory: Path, column: str, dtype, row_shape: Sequence[int],
                 rows_per_shard: Optional[int] = None):
        self.dir = Path(directory)
        self.column = column
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_shape = tuple(int(x) for x in row_shape)
        row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        self.rows_per_shard = rows_per_shard or max(1, SHARD_BYTES // max(1, row_bytes))
        self.shards: list[dict] = []
        self._fh = None
        self._rows_in_file = 0

    def _open_next(self) -> None:
        if self._fh is not None:
            self._fh.close()
        name = f"{self.column}-{len(self.shards):05d}.bin"
        self._fh = open(self.dir / name, "wb")
        self.shards.append({"file": name, "rows": 0})
        self._rows_in_file = 0

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {rows.shape[1:]} appended to a column of rows {self.row_shape}")
        start = 0
        while start < len(rows):
            if self._fh is None or self._rows_in_file == self.rows_per_shard:
                self._open_next()
            n = min(len(rows) - start, self.rows_per_shard - self._rows_in_file)
            self._fh.write(rows[start:start + n].tobytes())
            self._rows_in_file += n
            self.shards[-1]["rows"] += n
            start += n

    @property
    def rows(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def close(self, meta: dict) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        write_json(self.dir / f"{self.column}.json", {
            "version": FORMAT_VERSION, "column": self.column, "dtype": self.dtype.str,
            "row_shape": list(self.row_shape), "rows": self.rows, "shards": self.shards, "meta": meta,
        })


class ShardedArray:
    """One column of a shard directory, memory-mapped read-only."""

    def __init__(self, directory: Path, column: str = TOKENS):
        self.dir = Path(directory)
        self.column = column
        info = read_versioned_json(self.dir / f"{column}.json", "version", FORMAT_VERSION,
                                   f"shard column {column!r}", self.dir)
        self.info = info
        self.meta: dict = info.get("meta", {})
        self.dtype = np.dtype(info["dtype"])
        self.row_shape = tuple(info["row_shape"])
        counts = [int(s["rows"]) for s in info["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.rows = int(self.offsets[-1])
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return self.rows

    def _map(self, k: int) -> np.ndarray:
        if k not in self._maps:
            shard = self.info["shards"][k]
            path = self.dir / shard["file"]
            expected = int(shard["rows"]) * self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
            size = path.stat().st_size if path.exists() else -1
            if size != expected:
                raise PdcError(f"shard {path} has {size} bytes, its index says {expected}: delete {self.dir} "
                               "to rebuild it")
            self._maps[k] = np.memmap(path, dtype=self.dtype, mode="r",
                                      shape=(int(shard["rows"]), *self.row_shape))
        return self._maps[k]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Copies of the given rows (any order, repeats allowed), read from their shards."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.rows:
            raise IndexError(f"row index out of range 0..{self.rows - 1}")
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._map(int(k))[rows[sel] - self.offsets[k]]
        return out


def write_rows(directory: Path, rows: np.ndarray, column: str = TOKENS, meta: Optional[dict] = None,
               rows_per_shard: Optional[int] = None) -> Path:
    """Write an in-memory array as a complete one-column shard directory (staged, renamed); its
    key is the content's sha256 unless `meta` names one."""
    rows = np.ascontiguousarray(rows)
    meta = {"key": hashlib.sha256(rows.tobytes()).hexdigest()[:24], **(meta or {})}
    with staged_dir(directory) as tmp:
        writer = ShardWriter(tmp, column, rows.dtype, rows.shape[1:], rows_per_shard)
        writer.append(rows)
        writer.close(meta)
    return Path(directory)


Index = Union[range, np.ndarray]


@dataclass(frozen=True, eq=False)
class Blocks:
    """A view on the token blocks of a shard directory: `index` (a range or an array of row
    numbers) picks the rows. `label` says where the blocks came from in messages
    ("data 'wiki'"). Views are cheap: slicing or taking never reads a row."""

    array: ShardedArray
    index: Index
    label: str = "data"

    @classmethod
    def open(cls, directory: Path, label: Optional[str] = None) -> "Blocks":
        array = ShardedArray(directory, TOKENS)
        return cls(array, range(len(array)), label or array.meta.get("source", "data"))

    def __len__(self) -> int:
        return len(self.index)

    @property
    def seq_len(self) -> int:
        return int(self.array.row_shape[0])

    @property
    def tokens(self) -> int:
        return len(self) * self.seq_len

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.seq_len)

    def named(self, label: str) -> "Blocks":
        return Blocks(self.array, self.index, label)

    def __getitem__(self, key) -> "Blocks":
        """A sub-view: a slice, or positions (ints, array) into this view."""
        if isinstance(key, slice):
            return Blocks(self.array, self.index[key], self.label)
        pos = np.asarray(key, dtype=np.int64).reshape(-1)
        return Blocks(self.array, np.asarray(self.index, dtype=np.int64)[pos], self.label)

    def rows(self, positions: Optional[Iterable[int]] = None) -> np.ndarray:
        """Row numbers in the shards of `positions` in this view (all of them when None)."""
        if positions is None:
            return np.asarray(self.index, dtype=np.int64)
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if isinstance(self.index, range):
            if len(pos) and (pos.min() < 0 or pos.max() >= len(self.index)):
                raise IndexError(f"block position out of range 0..{len(self.index) - 1}")
            return self.index.start + pos * self.index.step
        return np.asarray(self.index, dtype=np.int64)[pos]

    def read(self, positions: Optional[Iterable[int]] = None):
        """The blocks at `positions` of this view (all when None) as a LongTensor [n, seq_len]."""
        import torch

        return torch.from_numpy(self.array.take(self.rows(positions)).astype(np.int64))

    # -- what a training stage records and reopens ------------------------------------------------
    def to_json(self) -> dict:
        out: dict = {"dir": str(self.array.dir), "label": self.label}
        if isinstance(self.index, range) and self.index.step == 1:
            out["range"] = [self.index.start, self.index.stop]
        else:
            out["rows"] = [int(r) for r in self.rows()]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "Blocks":
        array = ShardedArray(Path(data["dir"]), TOKENS)
        index: Index = range(*data["range"]) if "range" in data else np.asarray(data["rows"], dtype=np.int64)
        return cls(array, index, data.get("label", "data"))

    def identity(self) -> list:
        """What the view is, for content keys: the shard directory's key and the rows."""
        rows = self.to_json()
        rows.pop("dir")
        rows.pop("label")
        return [self.array.meta.get("key", self.array.dir.name), rows]
