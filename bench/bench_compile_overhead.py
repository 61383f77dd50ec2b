"""Compile overhead: activation importance + rewriting vs bare calibration forward passes.

Same model (SmolLM2-135M if installed, else a tiny random llama), same calibration blocks, one
process, measured side by side. Prints both wall times and their ratio (aim: <= 1.3x).
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
    from pdc.prune_width import prune_program
    from pdc.stages import ImportanceConfig, WidthTarget

    try:
        from pdc.assets import smollm2_dir

        src = smollm2_dir()
        target = WidthTarget(hidden=432, mlp=1024)
    except Exception:
        raise SystemExit("SmolLM2 asset missing: run `pdc setup` first")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    calib = torch.randint(0, model.config.vocab_size, (args.blocks, args.seq), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(calib), args.batch):
            model(input_ids=calib[i:i + args.batch], use_cache=False)
    bare = time.perf_counter() - start
    del model
    program = export_dir(src)
    materialize(program)
    start = time.perf_counter()
    _, report = prune_program(program, calib, target, ImportanceConfig(), progress=False, batch_size=args.batch)
    compiled = time.perf_counter() - start
    print(f"bare forward passes      {bare:8.2f} s")
    print(f"importance + rewriting   {compiled:8.2f} s  ({report['seconds']})")
    print(f"ratio                    {compiled / bare:8.2f} x  (aim <= 1.3)")


if __name__ == "__main__":
    main()
