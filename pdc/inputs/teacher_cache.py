"""A teacher's top-k next-token log-probabilities per token, cached once beside the token shards.

A cache belongs to one teacher (the content hashes of its weights and config), one token-shard
directory (whose key covers the corpus, the tokenizer and seq_len), k and the temperature; it
lives inside that token-shard directory, in `<tokens>/teacher_logits/<key>/`, so deleting the
shards deletes every cache of them. It holds *parts*, each a shard directory
(`pdc.inputs.shards`) written whole into `part-NNNNN.tmp/` and renamed, whose columns are
row-aligned with each other and name the rows of the token column they describe:

    cache.json               what the cache is: teacher hashes, token-shard key, k, temperature
    part-00000/              column `rows`: the token rows this part covers ([1] int64, ascending)
                             column `topk_logprobs`: [seq_len, k] float16, log p_T(v) of the
                               teacher's k most likely next tokens v at each position (descending)
                             column `topk_indices`: [seq_len, k], those tokens (the tokens' dtype)
                             column `tail_logmass`: [seq_len] float16, log of the probability
                               outside the top k, from a log-sum-exp over the other logits (exact,
                               not 1 minus a rounded sum)
                             column `teacher_nll`: [1] float32, the teacher's mean next-token NLL
                               on the block at temperature 1 (validation's teacher loss)

p_T is the teacher's softmax at the distillation temperature T (log_softmax(z / T)); T is part of
the key. On disk a token costs 4k + 2 bytes (2k of float16 values, 2k of uint16 indices for a
vocabulary up to 65,536, 2 of tail), plus 12 bytes a block (`pdc.plan.training.cache_bytes_per_token`).

Row numbers are token-row numbers, so training reads the cached logits of a micro-batch with the
row numbers it reads the tokens with (`TeacherLogits.take(rows)`); every rank maps the part files
and copies only its rows, and the data cursor in the checkpoint covers both. A teacher pass adds
parts for the rows a run needs that no part holds yet (`TeacherLogits.missing`), so students that
read the same blocks of the same teacher reuse it, and a killed pass loses at most one part.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from pdc.errors import PdcError
from pdc.files import is_temp_name, read_versioned_json, sha256_json, staged_dir, write_json
from pdc.inputs.shards import ShardedArray, ShardWriter

FORMAT = "teacher-topk-v1"  # the layout above: part of every cache key
CACHE_FILE = "cache.json"
PART_PREFIX = "part-"
ROWS, LOGPROBS, INDICES, TAIL, NLL = "rows", "topk_logprobs", "topk_indices", "tail_logmass", "teacher_nll"
COLUMNS = (ROWS, LOGPROBS, INDICES, TAIL, NLL)
VALUE_DTYPE = np.dtype(np.float16)
# float16's most negative finite value: an impossible token's log-probability is stored as this,
# never as -inf (a -inf times a zero probability would be a NaN in the loss).
LOGPROB_FLOOR = float(np.finfo(np.float16).min)


def cache_key(teacher_hashes: dict, token_key: str, k: int, temperature: float, teacher_dtype: str) -> str:
    """Content key of a cache: teacher weights and config, token shards, k, temperature, the dtype
    the teacher ran in (a GPU's bf16 pass and a CPU's fp32 one differ in their last bits), format."""
    return sha256_json([FORMAT, teacher_hashes, token_key, int(k), float(temperature), teacher_dtype])[:24]


def cache_dir_of(token_dir: Path, key: str) -> Path:
    """Where the cache `key` of the token shards in `token_dir` lives."""
    return Path(token_dir) / "teacher_logits" / key


@dataclass(frozen=True)
class CachedLogits:
    """The cached teacher distribution of n blocks: [n, seq_len, k] log-probabilities and token
    ids, [n, seq_len] log tail mass, [n] mean NLL."""

    logprobs: np.ndarray
    indices: np.ndarray
    tail: np.ndarray
    nll: np.ndarray


def create(directory: Path, meta: dict) -> Path:
    """The cache directory with its `cache.json` (written once: a second call with other meta is
    an error, a key collision or a damaged cache)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CACHE_FILE
    if path.exists():
        old = _read_meta(directory)
        if {k: old.get(k) for k in meta} != meta:
            raise PdcError(f"{path} describes another cache than its key says: delete {directory} to rebuild it")
        return directory
    write_json(path, meta)
    return directory


def _read_meta(directory: Path) -> dict:
    return read_versioned_json(Path(directory) / CACHE_FILE, "format", FORMAT, "teacher logits cache", directory)


class TeacherLogits:
    """A cache opened for reading: every complete part, memory-mapped, and where each row is."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.meta = _read_meta(self.dir)
        self.k = int(self.meta["k"])
        self.seq_len = int(self.meta["seq_len"])
        self.temperature = float(self.meta["temperature"])
        self.parts: list[dict[str, ShardedArray]] = []
        for part in part_dirs(self.dir):
            self.parts.append({c: ShardedArray(part, c) for c in COLUMNS})
        rows = [p[ROWS].take(np.arange(len(p[ROWS]))).reshape(-1) for p in self.parts]
        owner = [np.full(len(r), i, dtype=np.int32) for i, r in enumerate(rows)]
        local = [np.arange(len(r), dtype=np.int64) for r in rows]
        all_rows = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        order = np.argsort(all_rows, kind="stable")
        self._rows = all_rows[order]
        self._owner = (np.concatenate(owner) if owner else np.empty(0, dtype=np.int32))[order]
        self._local = (np.concatenate(local) if local else np.empty(0, dtype=np.int64))[order]

    def __len__(self) -> int:
        return len(self._rows)

    def missing(self, rows) -> np.ndarray:
        """The rows of `rows` (unique, ascending) that no part holds."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        return rows[~np.isin(rows, self._rows)]

    def _locate(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """(part, row within it) of each of `rows`; a one-line PdcError naming rows no part holds."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self._rows, rows)
        found = (pos < len(self._rows)) & (self._rows[np.minimum(pos, len(self._rows) - 1)] == rows) \
            if len(self._rows) else np.zeros(len(rows), dtype=bool)
        if not found.all():
            gone = rows[~found]
            raise PdcError(f"the teacher logits cache {self.dir} holds no logits for block(s) "
                           f"{', '.join(map(str, gone[:5].tolist()))}{' ...' if len(gone) > 5 else ''}: run its "
                           "teacher_logits stage again (delete the cache directory if it was damaged)")
        return self._owner[pos], self._local[pos]

    def take(self, rows) -> CachedLogits:
        """The cached distribution of the blocks at token rows `rows` (any order, repeats allowed)."""
        owner, local = self._locate(rows)
        n = len(owner)
        lp = np.empty((n, self.seq_len, self.k), dtype=VALUE_DTYPE)
        ix = np.empty((n, self.seq_len, self.k),
                      dtype=self.parts[0][INDICES].dtype if self.parts else np.uint16)
        tail = np.empty((n, self.seq_len), dtype=VALUE_DTYPE)
        nll = np.empty(n, dtype=np.float32)
        for p in np.unique(owner):
            sel = owner == p
            part = self.parts[int(p)]
            lp[sel] = part[LOGPROBS].take(local[sel])
            ix[sel] = part[INDICES].take(local[sel])
            tail[sel] = part[TAIL].take(local[sel])
            nll[sel] = part[NLL].take(local[sel]).reshape(-1)
        return CachedLogits(lp, ix, tail, nll)

    def topk_mass(self, rows, tokens_per_read: int = 1 << 22) -> float:
        """Mean probability inside the top k over every token of `rows`, reading only the tail
        column, `tokens_per_read` tokens at a time (a cache can outgrow host memory)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        step = max(1, tokens_per_read // self.seq_len)
        total = 0.0
        for start in range(0, len(rows), step):
            owner, local = self._locate(rows[start:start + step])
            for p in np.unique(owner):
                tail = self.parts[int(p)][TAIL].take(local[owner == p]).astype(np.float64)
                total += float(np.sum(-np.expm1(tail)))  # 1 - exp(log tail)
        return total / max(1, len(rows) * self.seq_len)

    def bytes_on_disk(self) -> int:
        return sum(f.stat().st_size for part in part_dirs(self.dir) for f in part.iterdir() if f.is_file())


def part_dirs(directory: Path) -> list[Path]:
    """The complete parts of a cache, in the order they were written (a part is renamed into
    place only when whole; `.tmp` names are a killed pass's leftovers)."""
    return sorted(p for p in Path(directory).glob(f"{PART_PREFIX}*") if p.is_dir() and not is_temp_name(p.name))


def next_part_number(directory: Path) -> int:
    """The number after the highest of the cache's complete parts."""
    numbers = [int(p.name[len(PART_PREFIX):]) for p in part_dirs(directory) if p.name[len(PART_PREFIX):].isdigit()]
    return max(numbers) + 1 if numbers else 0


class PartWriter:
    """Appends blocks to one new part (see `new_part`)."""

    def __init__(self, tmp: Path, seq_len: int, k: int, index_dtype):
        self.writers = {
            ROWS: ShardWriter(tmp, ROWS, np.int64, (1,)),
            LOGPROBS: ShardWriter(tmp, LOGPROBS, VALUE_DTYPE, (seq_len, k)),
            INDICES: ShardWriter(tmp, INDICES, index_dtype, (seq_len, k)),
            TAIL: ShardWriter(tmp, TAIL, VALUE_DTYPE, (seq_len,)),
            NLL: ShardWriter(tmp, NLL, np.float32, (1,)),
        }

    def append(self, rows: np.ndarray, logprobs: np.ndarray, indices: np.ndarray, tail: np.ndarray,
               nll: np.ndarray) -> None:
        self.writers[ROWS].append(np.asarray(rows, dtype=np.int64).reshape(-1, 1))
        self.writers[LOGPROBS].append(np.maximum(logprobs, LOGPROB_FLOOR))
        self.writers[INDICES].append(indices)
        self.writers[TAIL].append(np.maximum(tail, LOGPROB_FLOOR))
        self.writers[NLL].append(np.asarray(nll, dtype=np.float32).reshape(-1, 1))

    def close(self, meta: dict) -> None:
        for w in self.writers.values():
            w.close(meta)


@contextlib.contextmanager
def new_part(directory: Path, seq_len: int, k: int, index_dtype, meta: Optional[dict] = None,
             number: Optional[int] = None) -> Iterator[PartWriter]:
    """`with new_part(cache_dir, ...) as writer:` a new part, renamed into place whole when the
    block ends (removed when it raises). The caller holds the cache's pass lock; one writer at a
    time takes the next number, writers side by side (the ranks of one pass) are given theirs."""
    final = Path(directory) / f"{PART_PREFIX}{next_part_number(directory) if number is None else number:05d}"
    with staged_dir(final) as tmp:
        writer = PartWriter(tmp, seq_len, k, index_dtype)
        yield writer
        writer.close(meta or {})
