"""Compile overhead: activation importance + rewriting vs bare calibration forward passes.

Same model (SmolLM2-135M from `pdc setup`), same calibration blocks (from the builtin `wiki`
corpus), one process, measured side by side: the bare Hugging Face forward passes over the
blocks (after one warm-up batch, timed before and after the compile, mean) vs `prune_program` (activation importance over the same
blocks + planning + slicing to hidden=432 mlp=1024 + checks). Export and weight loading happen
once per compile and are printed separately, not in the ratio. Prints both wall times and
their ratio (aim: <= 1.3x).
Run: HF_HUB_OFFLINE=1 python bench/bench_compile_overhead.py [--blocks 32 --seq 256]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from pdc.graph.export import export_dir, materialize
    from pdc.stages.prune_width import prune_program
    from pdc.lang.settings import ImportanceConfig, WidthTarget

    try:
        from pdc.inputs.assets import smollm2_dir

        src = smollm2_dir()
        target = WidthTarget(hidden=432, mlp=1024)
    except Exception:
        raise SystemExit("SmolLM2 asset missing: run `pdc setup` first")
    from transformers import AutoTokenizer

    from pdc.inputs.data import take, token_blocks
    from pdc.lang.settings import DataSource

    calib = take(token_blocks(DataSource("builtin", "wiki"), AutoTokenizer.from_pretrained(src), args.seq),
                 args.blocks, seed=0).read()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

    @torch.no_grad()
    def bare_passes() -> float:
        start = time.perf_counter()
        for i in range(0, len(calib), args.batch):
            model(input_ids=calib[i:i + args.batch], use_cache=False)
        return time.perf_counter() - start

    with torch.no_grad():
        model(input_ids=calib[: args.batch], use_cache=False)  # warm-up, not timed
    bare_before = bare_passes()
    start = time.perf_counter()
    program = export_dir(src)
    materialize(program)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    _, report = prune_program(program, calib, target, ImportanceConfig(), progress=False, batch_size=args.batch)
    compiled = time.perf_counter() - start
    # Measured before and after the compile: on a shared machine the load drifts; use the mean.
    bare_after = bare_passes()
    bare = (bare_before + bare_after) / 2
    print(f"calibration              {tuple(calib.shape)} blocks x tokens, batch {args.batch}, {args.threads} threads")
    print(f"export + load (once)     {setup:8.2f} s  (not in the ratio)")
    print(f"bare forward passes      {bare:8.2f} s  (before {bare_before:.2f}, after {bare_after:.2f})")
    print(f"importance + rewriting   {compiled:8.2f} s  ({report['seconds']})")
    print(f"ratio                    {compiled / bare:8.2f} x  (aim <= 1.3)")


if __name__ == "__main__":
    main()
