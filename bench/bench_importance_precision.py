"""What bf16 costs activation importance: kept units in bf16 vs fp32 on SmolLM2-135M.

Same calibration blocks (builtin `wiki`), the same importance code (`pdc.graph.importance`) on the
exported program, traced and run once in fp32 and once in bf16 (weights read as bf16). For each
axis the quickstart prunes (hidden 576 -> 432, MLP 1536 -> 1024 in every layer) and for the
heads (9 -> 6, kv groups kept), prints the overlap of the kept sets |A & B| / k and Spearman's
rank correlation of the scores. On a GPU importance would run in bf16; this measures the
precision effect on the CPU (where bf16 is slower, so time is not the point).
Run: HF_HUB_OFFLINE=1 python bench/bench_importance_precision.py [--blocks 16 --seq 256]
"""

from __future__ import annotations

import argparse
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=432)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=6)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from pdc.errors import PdcError
    from pdc.graph import importance as imp_mod
    from pdc.graph.export import export_dir, materialize
    from pdc.inputs.assets import smollm2_dir
    from pdc.inputs.data import take, token_blocks
    from pdc.lang.settings import DataSource, ImportanceConfig

    try:
        src = smollm2_dir()
    except PdcError as exc:
        raise SystemExit(exc.message)
    calib = take(token_blocks(DataSource("builtin", "wiki"), AutoTokenizer.from_pretrained(src), args.seq),
                 args.blocks, seed=0).read()
    scores = {}
    for dtype in (torch.float32, torch.bfloat16):
        program = export_dir(src, dtype=dtype)
        materialize(program, dtype)
        scores[dtype] = imp_mod.compute(program, calib, ImportanceConfig())
        print(f"{str(dtype):15s} importance over {args.blocks} x {args.seq} tokens: {scores[dtype].seconds:.1f} s")
    a, b = scores[torch.float32], scores[torch.bfloat16]
    layers = sorted(a.mlp)
    rows = [("hidden", _overlap(a.hidden, b.hidden, args.hidden), _spearman(a.hidden, b.hidden))]
    mlp = [(_overlap(a.mlp[i], b.mlp[i], args.mlp), _spearman(a.mlp[i], b.mlp[i])) for i in layers]
    heads = [(_overlap(a.heads[i], b.heads[i], args.heads), _spearman(a.heads[i], b.heads[i])) for i in layers]
    for name, per_layer in (("mlp", mlp), ("heads", heads)):
        rows.append((f"{name} (mean of {len(layers)} layers)", sum(o for o, _ in per_layer) / len(layers),
                     sum(r for _, r in per_layer) / len(layers)))
        rows.append((f"{name} (worst layer)", min(o for o, _ in per_layer), min(r for _, r in per_layer)))
    print(f"{'axis':28s} {'kept overlap':>12s} {'spearman':>9s}")
    for name, overlap, rho in rows:
        print(f"{name:28s} {100 * overlap:11.1f}% {rho:9.4f}")


if __name__ == "__main__":
    main()
