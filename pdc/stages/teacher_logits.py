"""The teacher's logits, computed once: the `teacher_logits` stage before a cached distillation.

`compute_teacher_logits(teacher_dir, train, val, cfg, out_dir)`:
  1. the blocks the distillation will read (`blocks_read`): the positions of its global batches in
     the training order (`pdc.inputs.order`, a pure function of seed and global batch) mapped to
     token rows, and the validation blocks;
  2. the cache of (teacher content, token shards, k, temperature) in `<tokens>/teacher_logits/<key>/`
     (`pdc.inputs.teacher_cache`); the blocks no part holds yet are run through the teacher in
     ascending row order, `cfg.micro_batch` blocks a forward pass, and written as parts of about a
     minute of work each. Nothing runs when every block is there: every student of one teacher that
     reads the same blocks (another width, depth, spec or comparison variant) reuses the pass, and a
     longer run only adds its new blocks;
  3. returns the `TeacherLogitsResult` (blocks, bytes per token, top-k mass, tokens/s).

On several processes (`pdc run --nproc-per-node M`: every GPU of the node) the blocks to compute
are cut into whole batches, each rank runs a contiguous share of them on its own device and writes
its own parts (numbers given out before any rank writes), so the cache holds what one process
would write.

Invariants: a part is renamed into place only when whole, so a pass killed at any moment leaves
complete parts and loses at most the one it was writing; batches start at the same rows whether
a pass ran through or was resumed (parts end on batch boundaries), so the cached values are the
same bits either way. One pass writes a cache at a time (an advisory lock beside it).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pdc.errors import PdcError
from pdc.files import exclusive_lock, remove_temp_leftovers
from pdc.inputs import teacher_cache
from pdc.inputs.models import load_causal_lm
from pdc.inputs.order import window
from pdc.inputs.shards import Blocks
from pdc.inputs.verify import content_hashes
from pdc.lang.settings import TrainConfig
from pdc.plan.results import TeacherLogitsResult, decode, encode
from pdc.plan.training import cache_bytes_per_token, total_steps
from pdc.stages.process_group import rank_device
from pdc.stages.ranks import rank_world, run_in_ranks, worker_main
from pdc.stages.train.precision import gpu_bf16

STAGE = "teacher_logits"
PART_SECONDS = 60.0  # a part closes after this much work (a kill loses at most that much)
PART_TOKENS = 1 << 24  # ... or after this many tokens (4.3 GB at k=64)
LOCK_FILE = ".pass.lock"


def blocks_read(train: Blocks, val: Blocks, cfg: TrainConfig, stage: str = STAGE) -> np.ndarray:
    """Token rows (unique, ascending) a distillation with `cfg` reads: every block of its
    `steps` global batches in the training order, and the validation blocks."""
    steps = total_steps(cfg, stage)
    positions = window(len(train), 0, steps * cfg.global_batch, cfg.seed).numpy()
    return np.union1d(train.rows(positions), val.rows())


def teacher_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the teacher pass runs in: bf16 with `precision=bf16` on a GPU that has it, fp32
    elsewhere (on a CPU too, where bf16 would change the targets the cache was measured with)."""
    return torch.bfloat16 if gpu_bf16(cfg) else torch.float32


def cache_for(teacher_dir: Path, blocks: Blocks, cfg: TrainConfig) -> tuple[Path, dict]:
    """The cache directory of this teacher on these token shards with `cfg`'s k and temperature,
    run in `teacher_dtype(cfg)`, and the meta its `cache.json` holds."""
    meta = {
        "format": teacher_cache.FORMAT,
        "teacher": content_hashes(Path(teacher_dir), STAGE),
        "tokens": blocks.array.meta.get("key", blocks.array.dir.name),
        "source": blocks.array.meta.get("source"),
        "k": int(cfg.cache_k),
        "temperature": float(cfg.temperature),
        "seq_len": int(blocks.seq_len),
        "index_dtype": blocks.array.dtype.name,
        "vocab_size": json.loads((Path(teacher_dir) / "config.json").read_text()).get("vocab_size"),
        "teacher_dtype": str(teacher_dtype(cfg)).removeprefix("torch."),
    }
    key = teacher_cache.cache_key(meta["teacher"], meta["tokens"], meta["k"], meta["temperature"],
                                  meta["teacher_dtype"])
    return teacher_cache.cache_dir_of(blocks.array.dir, key), meta


@torch.no_grad()
def teacher_topk(model, ids: torch.Tensor, k: int, temperature: float):
    """(log p_T of the top k [B, L, k], their token ids, log tail mass [B, L], mean NLL per block at
    temperature 1 [B]) of the teacher on `ids` [B, L]."""
    logits = model(input_ids=ids).logits.float()
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(-1)
    z = logits / temperature
    log_z = torch.logsumexp(z, dim=-1, keepdim=True)
    top = z.topk(k, dim=-1)  # sorted, descending
    logprobs = top.values - log_z
    if k < z.shape[-1]:
        tail = torch.logsumexp(z.scatter(-1, top.indices, float("-inf")), dim=-1) - log_z[..., 0]
    else:
        tail = torch.full(z.shape[:-1], float("-inf"))
    return logprobs, top.indices, tail, nll


def compute_teacher_logits(teacher_dir: Path, train: Blocks, val: Blocks, cfg: TrainConfig, out_dir: Path,
                           progress: bool = True, part_seconds: float = PART_SECONDS, nproc: int = 1,
                           work_dir: Path | None = None) -> TeacherLogitsResult:
    """Fill the cache with every block the distillation `cfg` reads (see the module docstring);
    on `nproc` processes of this node (job files in `work_dir`) when more than one."""
    t_start = time.perf_counter()
    if cfg.cache_k is None:
        raise PdcError("the teacher logits stage needs the cache's k (teacher_logits=cached)", STAGE)
    if train.seq_len != cfg.seq_len:
        raise PdcError(f"the blocks are {train.seq_len} tokens long, the distillation reads {cfg.seq_len}", STAGE)
    rows = blocks_read(train, val, cfg)
    directory, meta = cache_for(teacher_dir, train, cfg)
    teacher_cache.create(directory, meta)
    k, index_dtype = int(cfg.cache_k), train.array.dtype
    computed, compute_s = 0, 0.0
    with exclusive_lock(directory / LOCK_FILE, f"another pdc run is computing the teacher logits in {directory}"):
        remove_temp_leftovers(directory)  # the part a killed pass was writing
        missing = teacher_cache.TeacherLogits(directory).missing(rows)
        if len(missing) and nproc > 1:
            if work_dir is None:
                raise PdcError("the teacher pass on several processes needs a work directory", STAGE)
            job = {"teacher_dir": str(Path(teacher_dir).resolve()), "train": train.to_json(), "val": val.to_json(),
                   "cfg": encode(cfg), "progress": progress, "part_seconds": part_seconds,
                   "first_part": teacher_cache.next_part_number(directory)}
            done = run_in_ranks("pdc.stages.teacher_logits", job, nproc, work_dir, STAGE, "teacher pass")
            computed, compute_s = done["blocks"], done["seconds"]
        elif len(missing):
            computed, compute_s = _run_teacher(teacher_dir, train.array, missing, cfg, directory, index_dtype,
                                               progress, part_seconds)
        elif progress:
            print(f"[pdc] {STAGE}: all {len(rows):,} blocks are in the cache {directory}; nothing to compute")
    cache = teacher_cache.TeacherLogits(directory)
    if len(cache.missing(rows)):
        raise PdcError(f"the teacher logits cache {directory} still lacks {len(cache.missing(rows))} blocks after "
                       "the pass", STAGE)
    mass = cache.topk_mass(rows)  # streamed: the cache of a long run does not fit in host memory
    seq_len = train.seq_len
    result = TeacherLogitsResult(
        cache_dir=str(directory), key=directory.name, k=k, temperature=float(cfg.temperature), seq_len=seq_len,
        blocks=len(rows), blocks_computed=computed,
        tokens_per_s=computed * seq_len / compute_s if computed and compute_s > 0 else None,
        bytes_per_token=cache_bytes_per_token(k, meta["vocab_size"] or 1 << 16, seq_len),
        cache_bytes=cache.bytes_on_disk(), topk_mass=mass, wall_s=time.perf_counter() - t_start,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"[pdc] {STAGE}: {len(rows):,} blocks x {seq_len} tokens at k={k} ({computed:,} computed now), "
              f"{result.bytes_per_token:.0f} bytes/token, cache {result.cache_bytes / 2**20:,.1f} MiB; the top {k} "
              f"hold {mass:.1%} of the teacher's probability")
    return result


def _rank_job(job: dict) -> dict:
    """One rank of the teacher pass: its contiguous share of the missing blocks, in whole batches.
    Every rank lists what is missing before any rank writes."""
    cfg = decode(TrainConfig, job["cfg"])
    train, val = Blocks.from_json(job["train"]), Blocks.from_json(job["val"])
    directory, _ = cache_for(Path(job["teacher_dir"]), train, cfg)
    missing = teacher_cache.TeacherLogits(directory).missing(blocks_read(train, val, cfg))
    dist.barrier()
    rank, world = rank_world()
    batch = max(1, cfg.micro_batch)
    n_batches = -(-len(missing) // batch)
    mine = missing[(rank * n_batches // world) * batch:((rank + 1) * n_batches // world) * batch]
    numbers = itertools.count(job["first_part"] + rank, world)  # rank r: parts first + r, first + r + world, ...
    blocks, seconds = _run_teacher(Path(job["teacher_dir"]), train.array, mine, cfg, directory, train.array.dtype,
                                   job["progress"] and rank == 0, job["part_seconds"], numbers)
    totals = torch.tensor([blocks, seconds], dtype=torch.float64)
    dist.all_reduce(totals)
    return {"blocks": int(totals[0]), "seconds": float(totals[1]) / world}  # the ranks ran side by side


def main(argv=None) -> int:
    return worker_main(argv, "pdc.stages.teacher_logits", _rank_job)


def _run_teacher(teacher_dir: Path, tokens, rows: np.ndarray, cfg: TrainConfig, directory: Path, index_dtype,
                 progress: bool, part_seconds: float, part_numbers=None) -> tuple[int, float]:
    """Run the teacher on the blocks at `rows` (ascending) on this rank's device and write them as
    parts (numbered from `part_numbers` when given); returns (blocks written, seconds of teacher work)."""
    device = rank_device()
    model = load_causal_lm(teacher_dir, STAGE, teacher_dtype(cfg)).to(device)
    if model.config.vocab_size < cfg.cache_k:
        raise PdcError(f"k={cfg.cache_k} is more than the teacher's vocabulary ({model.config.vocab_size})", STAGE)
    batch = max(1, cfg.micro_batch)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows) * tokens.row_shape[0], desc=STAGE, unit="tok", unit_scale=True, dynamic_ncols=True)
    done, seconds, start = 0, 0.0, 0
    meta = {"teacher_dir": str(teacher_dir)}
    try:
        while start < len(rows):
            t_part = time.perf_counter()
            number = next(part_numbers) if part_numbers is not None else None
            with teacher_cache.new_part(directory, tokens.row_shape[0], cfg.cache_k, index_dtype, meta,
                                        number) as part:
                in_part = 0
                while start < len(rows):
                    chunk = rows[start:start + batch]
                    ids = torch.from_numpy(tokens.take(chunk).astype(np.int64)).to(device)
                    lp, ix, tail, nll = teacher_topk(model, ids, cfg.cache_k, cfg.temperature)
                    part.append(chunk, lp.cpu().numpy(), ix.cpu().numpy().astype(index_dtype), tail.cpu().numpy(),
                                nll.cpu().numpy())
                    start += len(chunk)
                    in_part += len(chunk) * tokens.row_shape[0]
                    if bar is not None:
                        bar.update(len(chunk) * tokens.row_shape[0])
                    if time.perf_counter() - t_part >= part_seconds or in_part >= PART_TOKENS:
                        break
            seconds += time.perf_counter() - t_part
            done = start
    finally:
        if bar is not None:
            bar.close()
    return done, seconds


if __name__ == "__main__":
    sys.exit(main())
