"""Does the speed measurement tell the truth? One model measured against itself.

`pdc.stages.speed.measure_speed` is given the same checkpoint twice, as the "teacher" and as a
"student", and runs its usual session: warm-up, then interleaved rounds. An honest measurement
gives a speed-up of 1.0 within its own interval on every measure; a biased one (the first model
of a round always faster, a warm cache favouring one side, ...) shows a ratio off 1.0 whose
interval excludes it. Exit status 1 when any measure's interval misses 1.0.

Run: HF_HUB_OFFLINE=1 python bench/bench_speed_selfcheck.py [--model DIR] [--repeats 9] [--device cpu]
     [--batches 1,16] [--no-onnx]
(default model: SmolLM2-135M from `pdc setup`). Also prints the absolute figures, the thread
count and the hardware: on a shared machine they move, the ratio should not.

Measured (OMP_NUM_THREADS=1, --repeats 9, SmolLM2-135M fp32 on a 2-CPU Xeon shared with other
developers' builds and tests, 11.7 min): 6 of 6 intervals (96.1%) contain 1.0 -- prefill@128
0.966 [0.950, 1.043], prefill@512 0.984 [0.755, 1.073], decode batch 1 1.102 [0.959, 1.339],
batch 16 1.057 [0.983, 1.564], ONNX prefill@128 1.001 [0.959, 1.024], @512 0.973 [0.844, 1.156];
while the absolute decode speed of the same model moved between 4 and 5 tokens/s at batch 1.
The tiny test model (2 threads, same machine): 6 of 6 as well.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pdc.inputs.assets import smollm2_dir  # noqa: E402
from pdc.runner.speed_models import teacher_model  # noqa: E402
from pdc.runner.speed_table import render_text  # noqa: E402
from pdc.stages.speed import SpeedModel, SpeedSettings, measure_speed  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: SmolLM2 from `pdc setup`)")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-onnx", action="store_true", help="PyTorch only (skips the ONNX export of the model)")
    ap.add_argument("--batches", default="1,16", help="decode batch sizes, comma-separated (default 1,16)")
    args = ap.parse_args()
    model_dir = args.model or smollm2_dir()
    onnx = args.device == "cpu" and not args.no_onnx
    model = teacher_model(model_dir, onnx)  # the ONNX export is cached by content
    settings = SpeedSettings(repeats=args.repeats, device=args.device,
                             batches=tuple(int(b) for b in args.batches.split(",")),
                             backends=("torch", "onnx") if onnx else ("torch",))
    # Two labels, one checkpoint: loaded twice, as a teacher and a student are.
    result = measure_speed({"a": model, "b": SpeedModel(model.path, model.onnx)}, "a", settings)
    print(render_text(result))
    misses = [m for m, e in result.models["b"].speedup.items() if not e.low <= 1.0 <= e.high]
    for m, e in result.models["b"].speedup.items():
        print(f"{m:22s} b/a speed-up {e.median:.3f} [{e.low:.3f}, {e.high:.3f}]  "
              f"{'contains 1.0' if m not in misses else 'MISSES 1.0'}")
    print(f"{len(result.models['b'].speedup) - len(misses)} of {len(result.models['b'].speedup)} measures "
          f"contain 1.0 ({100 * result.confidence:.1f}% intervals)")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
