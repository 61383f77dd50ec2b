"""Throughput of `run_distill` (DeepSpeed engine) vs a bare PyTorch loop doing the same work,
with the teacher online and from a top-k teacher cache (`teacher_logits=cached`).

Both run on the same models, data and batch geometry in this process: teacher forward without
gradients (online) or the micro-batch's rows read from the cache (cached), student forward +
backward over `accum` micro-batches, gradient clipping, torch AdamW step. The cache is filled
once by the teacher pass (`compute_teacher_logits`, timed on its own) before either cached loop.
The figure compared is the median per-step tokens/s (step 1 excluded: warm-up). The bare loop
runs before and after the DeepSpeed run and the mean of the two is used, to even out drift
of a shared machine. On a machine shared with other work wall-clock speed drifts a lot, so the
ratio is also given per CPU-second of this process (`cpu_ratio`: tokens per CPU-second, which
counts the work each loop does rather than the time it waited). Prints one JSON line: per path
(online, cached) the bare and pdc tokens/s and their ratio (aim: >= 0.95), and cached over online.

    python bench/bench_distill_throughput.py [--steps 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def make_models(root: Path, vocab: int, hidden: int, layers: int, student_layers: int) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(n_layers: int, seed: int, path: Path) -> Path:
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=n_layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                          max_position_embeddings=1024, tie_word_embeddings=False)
        torch.manual_seed(seed)
        LlamaForCausalLM(cfg).save_pretrained(path)
        return path

    return build(layers, 0, root / "teacher"), build(student_layers, 1, root / "student")


def bare_loop(teacher_dir: Path, student_dir: Path, blocks: torch.Tensor, cfg, steps: int, cache=None):
    """Per-step (tokens/s, tokens per CPU-second) of the same work without DeepSpeed; `cache` (a
    `TeacherLogits`): the teacher's distribution is read from it instead of computed."""
    from transformers import AutoModelForCausalLM

    from pdc.inputs.order import global_batch_indices
    from pdc.plan.training import ADAM_BETAS, ADAM_EPS, GRADIENT_CLIPPING
    from pdc.stages.train.stage import Cached
    from pdc.stages.train.losses import cached_distill_loss, distill_loss

    teacher = None
    if cache is None:
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
        teacher.requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(student_dir).train()
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                            weight_decay=cfg.weight_decay)
    accum = cfg.global_batch // cfg.micro_batch
    speeds, cpu_speeds = [], []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = global_batch_indices(len(blocks), cfg.global_batch, step, cfg.seed)
        for a in range(accum):
            rows = idx[a * cfg.micro_batch:(a + 1) * cfg.micro_batch]
            ids = blocks[rows]
            if cache is None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=ids).logits
                loss, _ = distill_loss(student(input_ids=ids).logits, t_logits, ids, cfg)
            else:
                c = cache.take(rows.numpy())
                cached = Cached(torch.from_numpy(c.logprobs), torch.from_numpy(c.indices.astype("int64")),
                                torch.from_numpy(c.tail), torch.from_numpy(c.nll))
                loss, _ = cached_distill_loss(student(input_ids=ids).logits, cached, ids, cfg)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), GRADIENT_CLIPPING)
        opt.step()
        opt.zero_grad(set_to_none=True)
        speeds.append(cfg.global_batch * cfg.seq_len / (time.perf_counter() - t0))
        cpu_speeds.append(cfg.global_batch * cfg.seq_len / (time.process_time() - c0))
    return speeds, cpu_speeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=64, help="the teacher cache's k")
    ap.add_argument("--profile", type=Path, default=None,
                    help="also write a cProfile of one in-process DeepSpeed step loop (cached) here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    import dataclasses

    import numpy as np

    from pdc.inputs.shards import Blocks, write_rows
    from pdc.inputs.teacher_cache import TeacherLogits
    from pdc.lang.settings import TrainConfig
    from pdc.stages.distill import run_distill
    from pdc.stages.teacher_logits import compute_teacher_logits

    cfg = TrainConfig(steps=args.steps, lr=1e-3, min_lr=1e-4, warmup=2, global_batch=args.global_batch,
                      micro_batch=args.micro_batch, seq_len=args.seq_len, checkpoint_every=0)
    cached_cfg = dataclasses.replace(cfg, cache_k=args.k)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, args.vocab, (4 * args.global_batch, args.seq_len), generator=g)
    tokens = args.global_batch * args.seq_len
    out: dict = {
        "model": f"llama hidden {args.hidden}, teacher {args.layers} layers, student {args.layers // 2}, vocab {args.vocab}",
        "tokens_per_step": tokens, "steps": args.steps, "threads": args.threads, "k": args.k,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student = make_models(root, args.vocab, args.hidden, args.layers, args.layers // 2)
        shards = Blocks.open(write_rows(root / "shards", blocks.numpy().astype(np.uint16)))  # as pdc run reads them
        t0 = time.perf_counter()
        filled = compute_teacher_logits(teacher, shards, shards[:0], cached_cfg, root / "tl", progress=False)
        out["teacher_pass_s"] = round(time.perf_counter() - t0, 2)
        out["teacher_pass_tokens_per_s"] = round(filled.tokens_per_s or 0, 1)
        out["cache_bytes_per_token"] = round(filled.bytes_per_token, 1)
        cache = TeacherLogits(Path(filled.cache_dir))

        def side_by_side(name: str, run_cfg, teacher_cache):
            """bare, pdc, bare again: the pdc run's median step against the mean of the two bare ones."""
            c = cache if teacher_cache else None
            wall_1, cpu_1 = bare_loop(teacher, student, blocks, run_cfg, args.steps, c)
            t0 = time.perf_counter()
            work = root / f"work-{name}"
            metrics = run_distill(teacher, student, shards, shards[:0], run_cfg, work, root / f"out-{name}",
                                  progress=False, teacher_cache=teacher_cache)
            wall = time.perf_counter() - t0
            records = [json.loads(l) for l in (root / f"out-{name}" / "log.jsonl").read_text().splitlines()]
            wall_2, cpu_2 = bare_loop(teacher, student, blocks, run_cfg, args.steps, c)
            before, after = statistics.median(wall_1[1:]), statistics.median(wall_2[1:])
            bare = (before + after) / 2
            bare_cpu = (statistics.median(cpu_1[1:]) + statistics.median(cpu_2[1:])) / 2
            ds_cpu = statistics.median(tokens / r["cpu_s"] for r in records[1:])
            ds = statistics.median(r["tokens_per_s"] for r in records[1:])
            out[name] = {
                "bare_tokens_per_s": round(bare, 1), "bare_before_after": [round(before, 1), round(after, 1)],
                "pdc_tokens_per_s": round(ds, 1), "ratio": round(ds / bare, 3),
                "bare_tokens_per_cpu_s": round(bare_cpu, 1), "pdc_tokens_per_cpu_s": round(ds_cpu, 1),
                "cpu_ratio": round(ds_cpu / bare_cpu, 3), "run_distill_wall_s": round(wall, 1),
            }
            return metrics

        side_by_side("online", cfg, None)
        side_by_side("cached", cached_cfg, Path(filled.cache_dir))
        out["cached_over_online_pdc"] = round(out["cached"]["pdc_tokens_per_s"] / out["online"]["pdc_tokens_per_s"], 3)
        out["cached_over_online_bare"] = round(out["cached"]["bare_tokens_per_s"] / out["online"]["bare_tokens_per_s"], 3)
        if args.profile is not None:
            _profile(teacher, student, shards, cached_cfg, Path(filled.cache_dir), args.profile)
    print(json.dumps(out))


def _profile(teacher: Path, student: Path, shards, cfg, cache, path: Path) -> None:
    """cProfile of a run_distill (one rank runs in this process), sorted by own time: where the
    time goes that the bare loop does not spend."""
    import cProfile
    import pstats

    from pdc.stages.distill import run_distill

    prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        prof.enable()
        run_distill(teacher, student, shards, shards[:0], cfg, Path(tmp) / "w", Path(tmp) / "o", progress=False,
                    teacher_cache=cache)
        prof.disable()
    with open(path, "w") as f:
        pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)
        pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(60)

if __name__ == "__main__":
    main()
