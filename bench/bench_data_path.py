"""Memory and speed of the data path: tokenize + pack + one training step, on a corpus and on one
ten times its size, side by side in one run.

For each corpus a fresh process (empty pdc and datasets caches, so the corpus really is
tokenized) runs what `pdc run` does: `token_blocks` (datasets.map over `--procs` processes,
packed into uint16 shards), the held-out split, and one teacher-correction step of a small Llama
reading its batch from the memory-mapped shards. It reports its peak RSS (also as it stood after
tokenize + pack, before any model existed, and the tokenizing workers' peak), then the data path alone: global batches drawn in the training order and read
from the shards, in tokens/s, next to the training step's tokens/s.

Goals: peak RSS(10x corpus) / peak RSS(corpus) <= 1.1, and the data path far faster than a step.
The corpus is the `pdc setup` wiki text repeated (with shuffled sentences) to the size asked;
the tokenizer is SmolLM2's (49,152 ids). Prints one JSON line.

    python bench/bench_data_path.py [--mb 10] [--procs 2] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """JSONL documents from the wiki asset, sentences shuffled, until `megabytes` of text."""
    from pdc.inputs import assets

    paragraphs = [json.loads(l)["text"] for l in assets.builtin_data_path("wiki").read_text().splitlines() if l]
    rng = random.Random(seed)
    target, written, docs = int(megabytes * 1e6), 0, 0
    with open(path, "w") as f:
        while written < target:
            sentences = rng.choice(paragraphs).split(". ")
            rng.shuffle(sentences)
            text = ". ".join(sentences)
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)
            docs += 1
    return docs


def child(args) -> None:
    """One corpus: tokenize + pack + one training step in this process; print the measurements."""
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pdc.inputs.data import split_blocks, token_blocks
    from pdc.inputs.order import DataCursor, rank_micro_batch
    from pdc.lang.settings import DataSource, TrainConfig
    from pdc.stages.correct import run_correct

    work = Path(args.work)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    t0 = time.perf_counter()
    blocks = token_blocks(DataSource("jsonl", args.corpus), tok, args.seq_len, num_proc=args.procs)
    tokenize_s = time.perf_counter() - t0
    peak_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before any model exists
    status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    rss_file = int(status.get("RssFile", "0 kB").split()[0]) / 1024
    train, val = split_blocks(blocks, 0.01)

    model_dir = work / "model"
    cfg_model = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
                            tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg_model).save_pretrained(model_dir)
    cfg = TrainConfig(steps=1, lr=1e-4, global_batch=args.global_batch, micro_batch=args.global_batch,
                      seq_len=args.seq_len, checkpoint_every=0, val_fraction=0.01)
    result = run_correct(model_dir, train, val[:1], cfg, work / "work", work / "out", progress=False)
    record = json.loads((work / "out" / "log.jsonl").read_text().splitlines()[0])
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    # the data path alone: the training order's global batches, read from the shards
    cursor = DataCursor(len(train), args.global_batch, seed=0)
    n_read, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        idx = cursor.next_batch()
        n_read += train.read(rank_micro_batch(idx, args.global_batch, 0, 0, 1)).numel()
    read_s = time.perf_counter() - t0
    print(json.dumps({
        "documents": sum(1 for _ in open(args.corpus)), "tokens": blocks.array.meta["tokens_seen"],
        "blocks": len(blocks), "shard_dtype": str(blocks.array.dtype),
        "tokenize_pack_s": round(tokenize_s, 2), "tokenize_pack_tokens_per_s": blocks.array.meta["tokens_seen"] / tokenize_s,
        "peak_rss_mb": round(peak_self, 1), "peak_rss_tokenizer_workers_mb": round(peak_children, 1),
        "peak_rss_tokenize_pack_mb": round(peak_data, 1), "rss_file_backed_after_pack_mb": round(rss_file, 1),
        "step_tokens_per_s": cfg.global_batch * cfg.seq_len / record["step_s"],
        "data_path_tokens_per_s": n_read / read_s, "trained_steps": result.steps,
    }))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=10.0, help="text of the smaller corpus, in MB (the other is 10x)")
    ap.add_argument("--procs", type=int, default=2, help="tokenizing processes (datasets.map num_proc)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from pdc.inputs import assets

    runs = {}
    tokenizer = str(assets.smollm2_dir())  # the child's pdc cache is empty: resolve it here
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, mb in (("1x", args.mb), ("10x", 10 * args.mb)):
            corpus = root / f"corpus-{name}.jsonl"
            make_corpus(corpus, mb, seed=1)
            work = root / name
            work.mkdir()
            env = dict(os.environ, PDC_CACHE=str(work / "pdc-cache"), HF_DATASETS_CACHE=str(work / "hf-cache"),
                       HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            argv = [sys.executable, __file__, "--child", "--corpus", str(corpus), "--work", str(work),
                    "--procs", str(args.procs), "--threads", str(args.threads), "--seq-len", str(args.seq_len),
                    "--global-batch", str(args.global_batch), "--tokenizer", tokenizer]
            out = subprocess.run(argv, env=env, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{name} run failed:\n{out.stderr[-2000:]}")
            runs[name] = json.loads(out.stdout.strip().splitlines()[-1])
    small, big = runs["1x"], runs["10x"]
    print(json.dumps({
        "corpus_tokens": [small["tokens"], big["tokens"]],
        "peak_rss_mb": [small["peak_rss_mb"], big["peak_rss_mb"]],
        "peak_rss_ratio": round(big["peak_rss_mb"] / small["peak_rss_mb"], 3),
        "peak_rss_tokenize_pack_only_mb": [small["peak_rss_tokenize_pack_mb"], big["peak_rss_tokenize_pack_mb"]],
        "tokenize_pack_only_ratio": round(big["peak_rss_tokenize_pack_mb"] / small["peak_rss_tokenize_pack_mb"], 3),
        "rss_file_backed_after_pack_mb": [small["rss_file_backed_after_pack_mb"], big["rss_file_backed_after_pack_mb"]],
        "tokenizer_workers_peak_rss_mb": [small["peak_rss_tokenizer_workers_mb"], big["peak_rss_tokenizer_workers_mb"]],
        "tokenize_pack_tokens_per_s": [round(small["tokenize_pack_tokens_per_s"]), round(big["tokenize_pack_tokens_per_s"])],
        "data_path_tokens_per_s": round(big["data_path_tokens_per_s"]),
        "training_step_tokens_per_s": round(big["step_tokens_per_s"]),
        "data_path_over_step": round(big["data_path_tokens_per_s"] / big["step_tokens_per_s"], 1),
        "shard_dtype": big["shard_dtype"], "procs": args.procs, "seq_len": args.seq_len,
    }))


if __name__ == "__main__":
    main()
