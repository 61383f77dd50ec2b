"""What verifying a checkpoint costs, next to what loading it costs: SmolLM2-135M (`pdc setup`).

Measured side by side in one process, each on the same checkpoint directory:
- the checks that read no tensor bytes (config, safetensors headers and coverage, shapes and
  dtypes against the config on the meta device, tokenizer load), run on every verification;
- the NaN/Inf scan of every tensor (chunked reads), run once per file identity;
- a verification whose scan is remembered (the second and later reads of an unchanged file);
- sha256 of the weight files (what a content-hash key for the scan record would cost);
- `AutoModelForCausalLM.from_pretrained` plus one read of every parameter (transformers maps
  the file lazily): what every stage that reads the model pays anyway.
The scan record is kept in a scratch cache, so the first verification really scans.
Run: HF_HUB_OFFLINE=1 python bench/bench_verify.py [--model DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: SmolLM2 from `pdc setup`)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from pdc.files import sha256_file
    from pdc.inputs import verify

    model_dir = args.model
    if model_dir is None:
        from pdc.inputs.assets import smollm2_dir

        model_dir = smollm2_dir()
    torch.set_num_threads(2)
    entries = verify.weight_entries(model_dir)
    size = sum(e.nbytes for e in entries.values())
    verify.verify_checkpoint(model_dir, "bench", scan=False)  # warm the imports and the page cache

    with tempfile.TemporaryDirectory() as scratch:
        os.environ["PDC_CACHE"] = scratch

        def fresh_scan():
            for record in Path(scratch).glob("verified/*.json"):
                record.unlink()
            assert verify.verify_checkpoint(model_dir, "bench").scanned

        structure = _timed(lambda: verify.verify_checkpoint(model_dir, "bench", scan=False), args.repeat)
        full = _timed(fresh_scan, args.repeat)
        remembered = _timed(lambda: verify.verify_checkpoint(model_dir, "bench"), args.repeat)
    files = sorted({e.file for e in entries.values()})
    hashing = _timed(lambda: [sha256_file(f) for f in files], args.repeat)
    def load_and_touch():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            return sum(p.sum().item() for p in model.parameters())

    load = _timed(load_and_touch, args.repeat)

    mib = size / 2**20
    print(f"{model_dir}: {len(entries)} tensors, {mib:,.0f} MiB in {len(files)} file(s); median of {args.repeat}")
    print(f"  checks without tensor bytes (headers, shapes, tokenizer) {structure:7.2f} s")
    rate = mib / max(full - structure, 1e-9)
    print(f"  full verification, first time (+ NaN/Inf scan)          {full:7.2f} s  ({rate:,.0f} MiB/s scanned)")
    print(f"  verification with the scan remembered                    {remembered:7.2f} s")
    print(f"  sha256 of the weight files (a content-hash key)          {hashing:7.2f} s")
    print(f"  from_pretrained + reading every weight (every stage)     {load:7.2f} s")
    print(f"  first verification / load = {full / load:.2f}x; remembered / load = {remembered / load:.2f}x")


if __name__ == "__main__":
    main()
