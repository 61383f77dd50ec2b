"""Throughput of `run_distill` (DeepSpeed engine) vs a bare PyTorch loop doing the same work.

Both run on the same models, data and batch geometry in this process: teacher forward without
gradients, student forward + backward over `accum` micro-batches, gradient clipping, torch AdamW
step. The figure compared is the median per-step tokens/s (step 1 excluded: warm-up). The bare
loop runs before and after the DeepSpeed run and the mean of the two is used, to even out drift
of a shared machine. On a machine shared with other work wall-clock speed drifts a lot, so the
ratio is also given per CPU-second of this process (`cpu_ratio`: tokens per CPU-second, which
counts the work each loop does rather than the time it waited). Prints one JSON line (aim: >= 0.9).

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


def bare_loop(teacher_dir: Path, student_dir: Path, blocks: torch.Tensor, cfg, steps: int):
    """Per-step (tokens/s, tokens per CPU-second) of the same work without DeepSpeed."""
    from transformers import AutoModelForCausalLM

    from pdc.inputs.order import global_batch_indices
    from pdc.plan.training import ADAM_BETAS, ADAM_EPS, GRADIENT_CLIPPING
    from pdc.stages.train.losses import distill_loss

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).train()
    teacher.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                            weight_decay=cfg.weight_decay)
    accum = cfg.global_batch // cfg.micro_batch
    speeds, cpu_speeds = [], []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        idx = global_batch_indices(len(blocks), cfg.global_batch, step, cfg.seed)
        for a in range(accum):
            ids = blocks[idx[a * cfg.micro_batch:(a + 1) * cfg.micro_batch]]
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            loss, _ = distill_loss(student(input_ids=ids).logits, t_logits, ids, cfg)
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
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    import numpy as np

    from pdc.inputs.shards import Blocks, write_rows
    from pdc.lang.settings import TrainConfig
    from pdc.stages.distill import run_distill

    cfg = TrainConfig(steps=args.steps, lr=1e-3, min_lr=1e-4, warmup=2, global_batch=args.global_batch,
                      micro_batch=args.micro_batch, seq_len=args.seq_len, checkpoint_every=0)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, args.vocab, (4 * args.global_batch, args.seq_len), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student = make_models(root, args.vocab, args.hidden, args.layers, args.layers // 2)
        wall_1, cpu_1 = bare_loop(teacher, student, blocks, cfg, args.steps)
        t0 = time.perf_counter()
        shards = Blocks.open(write_rows(root / "shards", blocks.numpy().astype(np.uint16)))  # as pdc run reads them
        metrics = run_distill(teacher, student, shards, shards[:0], cfg, root / "work", root / "out", progress=False)
        ds_wall = time.perf_counter() - t0
        records = [json.loads(l) for l in (root / "out" / "log.jsonl").read_text().splitlines()]
        wall_2, cpu_2 = bare_loop(teacher, student, blocks, cfg, args.steps)
    tokens = args.global_batch * args.seq_len
    before, after = statistics.median(wall_1[1:]), statistics.median(wall_2[1:])
    bare = (before + after) / 2
    bare_cpu = (statistics.median(cpu_1[1:]) + statistics.median(cpu_2[1:])) / 2
    ds_cpu = statistics.median(tokens / r["cpu_s"] for r in records[1:])
    print(json.dumps({
        "model": f"llama hidden {args.hidden}, teacher {args.layers} layers, student {args.layers // 2}, vocab {args.vocab}",
        "tokens_per_step": args.global_batch * args.seq_len, "steps": args.steps, "threads": args.threads,
        "bare_tokens_per_s": round(bare, 1), "bare_before_after": [round(before, 1), round(after, 1)],
        "deepspeed_tokens_per_s": round(metrics.tokens_per_s, 1),
        "ratio": round(metrics.tokens_per_s / bare, 3),
        "bare_tokens_per_cpu_s": round(bare_cpu, 1), "deepspeed_tokens_per_cpu_s": round(ds_cpu, 1),
        "cpu_ratio": round(ds_cpu / bare_cpu, 3),
        "run_distill_wall_s": round(ds_wall, 1),
    }))


if __name__ == "__main__":
    main()
