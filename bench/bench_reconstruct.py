"""What reconstruction after the cut costs and buys, on SmolLM2-135M (passes/reconstruct_outputs.py).

Cost: the calibration pass of activation importance (builtin `wiki`, the quickstart's 16 x 256
tokens) timed without and with the second moments reconstruction needs (`grams=True`, the same
single pass), and the solves of the reconstruction pass; the figure is seconds and the ratio
(moments + solves) / calibration pass.
Effect, for the quickstart's cut (MLP 1536 -> 1152 in every layer) and a head cut (9 -> 6, kv
groups kept): the relative output error of the cut projections, sum |W x - W' x_K|^2 / sum |W x|^2,
on the calibration tokens and on as many `wiki-heldout` tokens (moments of held-out text: does
the refit generalise?), for plain slicing and for damping values; and the held-out LM loss of the
whole pruned program. Re-ranking: the same errors when neurons are kept by their output energy
(E[x_i^2] |W[:, i]|^2, what a refit-aware ranking would look at first) instead of activation.
Run: OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python bench/bench_reconstruct.py [--blocks 16 --seq 256]
Measured (1 thread on 2 cores shared with other jobs, so seconds vary run to run): calibration
pass 81.9 / 36.5 s, moments inside it 60.1 / 17.4 s, MLP solves 30.3 / 8.2 s: reconstruction costs
1.10 / 0.70 of the calibration pass. MLP held-out output error plain 0.0965, damp 0.01 0.1141
(overfit), damp 1 0.0840; held-out loss plain 3.747, damp 0.01 3.790, damp 1 3.691 (ppl 42.40 ->
40.08); heads 9 -> 6: plain 5.614 (ppl 274), damp 1 3.462 (ppl 31.9); unpruned 3.106 (22.3).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _error(weight: torch.Tensor, new_k: torch.Tensor, keep: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative output error of replacing `weight` by `new_k` on columns `keep` (0 elsewhere)."""
    w = weight.double()
    residual = w.clone()
    residual[:, keep] -= new_k
    return float(((residual @ gram) * residual).sum() / ((w @ gram) * w).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mlp", type=int, default=1152)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--damps", default="0,0.001,0.01,0.1,1")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from pdc.errors import PdcError
    from pdc.graph import importance as imp_mod
    from pdc.graph.export import export_dir, materialize
    from pdc.graph.structure import structure_of
    from pdc.inputs.assets import smollm2_dir
    from pdc.inputs.data import take, token_blocks
    from pdc.lang.settings import DataSource, ImportanceConfig, ReconstructConfig, WidthTarget
    from pdc.passes.reconstruct_outputs import refit
    from pdc.stages.prune_width import prune_program
    from pdc.stages.depth_on_program import program_nll

    try:
        src = smollm2_dir()
    except PdcError as exc:
        raise SystemExit(exc.message)
    tok = AutoTokenizer.from_pretrained(src)
    calib = take(token_blocks(DataSource("builtin", "wiki"), tok, args.seq), args.blocks, seed=0).read()
    held = take(token_blocks(DataSource("builtin", "wiki-heldout"), tok, args.seq), args.blocks, seed=0).read()
    program = export_dir(src)
    materialize(program)
    config = ImportanceConfig()
    print(f"threads {torch.get_num_threads()}, {args.blocks} x {args.seq} calibration tokens")
    plain = imp_mod.compute(program, calib, config)
    scores = imp_mod.compute(program, calib, config, grams=True)
    heldout = imp_mod.compute(program, held, config, grams=True)
    layers = structure_of(program).layers
    solve_start = time.perf_counter()
    keeps = {("mlp", l.index): imp_mod.top_k(scores.mlp[l.index], args.mlp) for l in layers}
    for l in layers:
        refit(program.param(l.mlp.down), scores.grams[("mlp", l.index)], keeps[("mlp", l.index)], 0.01)
    solve = time.perf_counter() - solve_start
    extra = scores.seconds - plain.seconds
    print(f"calibration pass: {plain.seconds:.1f} s plain, {scores.seconds:.1f} s with moments "
          f"(moments {scores.gram_seconds:.1f} s measured inside it; wall difference {extra:+.1f} s)")
    print(f"MLP solves ({len(layers)} layers, keep {args.mlp}): {solve:.1f} s")
    print(f"reconstruction cost / calibration pass: {(scores.gram_seconds + solve) / plain.seconds:.2f}")

    damps = [float(d) for d in args.damps.split(",")]
    rankings = {"activation": lambda l: scores.mlp[l.index],
                "output energy": lambda l: scores.grams[("mlp", l.index)].diagonal().float()
                * program.param(l.mlp.down).pow(2).sum(0)}
    print(f"\nMLP {program.arch.mlp} -> {args.mlp}: relative output error of the down projections "
          f"(mean of {len(layers)} layers), calibration / held-out")
    for rank_name, rank in rankings.items():
        keep = {l.index: imp_mod.top_k(rank(l), args.mlp) for l in layers}
        for damp in [None] + damps:
            cal, hel = [], []
            for l in layers:
                w = program.param(l.mlp.down)
                k = keep[l.index]
                new = w.double()[:, k] if damp is None else refit(w, scores.grams[("mlp", l.index)], k, damp)[0]
                cal.append(_error(w, new, k, scores.grams[("mlp", l.index)]))
                hel.append(_error(w, new, k, heldout.grams[("mlp", l.index)]))
            what = "plain slicing" if damp is None else f"lsq damp={damp:g}"
            print(f"  {rank_name:14s} {what:18s} {sum(cal) / len(cal):.4f} / {sum(hel) / len(hel):.4f}")

    print(f"\nheads {program.arch.heads} -> {args.heads} (kv groups kept): output projection error, "
          f"calibration / held-out")
    rep = program.arch.heads // program.arch.kv_heads
    per = args.heads // program.arch.kv_heads
    for damp in [None, 0.01]:
        cal, hel = [], []
        for l in layers:
            s = scores.heads[l.index]
            keep_h = torch.cat([g * rep + imp_mod.top_k(s[g * rep:(g + 1) * rep], per)
                                for g in range(program.arch.kv_heads)]).sort().values
            hd = l.attn.head_dim
            cols = (keep_h[:, None] * hd + torch.arange(hd)).reshape(-1)
            w = program.param(l.attn.o)
            g_cal, g_held = scores.grams[("heads", l.index)], heldout.grams[("heads", l.index)]
            new = w.double()[:, cols] if damp is None else refit(w, g_cal, cols, damp)[0]
            cal.append(_error(w, new, cols, g_cal))
            hel.append(_error(w, new, cols, g_held))
        what = "plain slicing" if damp is None else f"lsq damp={damp:g}"
        print(f"  {what:18s} {sum(cal) / len(cal):.4f} / {sum(hel) / len(hel):.4f}")

    print(f"\nheld-out LM loss on {args.blocks} x {args.seq} wiki-heldout tokens (whole pruned program)")
    base = program_nll(program, held)
    print(f"  {'unpruned':24s} {base:.4f} (ppl {math.exp(base):.2f})")
    runs = [(f"{axis}={size} " + ("plain" if damp is None else f"lsq {damp:g}"), WidthTarget(**{axis: size}),
             None if damp is None else ReconstructConfig(damp=damp))
            for axis, size in (("mlp", args.mlp), ("heads", args.heads)) for damp in (None, 0.01, 1.0)]
    for label, target, rec in runs:
        pruned = program.clone()
        prune_program(pruned, calib, target, config, progress=False, scores=scores, reconstruct=rec)
        loss = program_nll(pruned, held)
        print(f"  {label:24s} {loss:.4f} (ppl {math.exp(loss):.2f})")
        del pruned


if __name__ == "__main__":
    main()
