"""`pdc compile` of the paper's width recipe at its real shapes, on this machine: peak RSS,
time per phase, disk.

Writes a checkpoint with a bundled config (default Llama-3.1-8B) and random bf16 weights
(std 0.02, seeded; SmolLM2's tokenizer, whose ids all fall inside Llama 3's vocabulary) under
`--dir`, a spec that prunes it (`prune width`, the recipe's sizes; calibration `--samples` x
`--seq-len` tokens of the builtin wiki text), runs `pdc compile` in a child process and prints
the child's peak RSS (its own `ru_maxrss`), the stage's time per phase (from its result) and the
bytes on disk. `--depth 16`: the depth recipe's 32 -> 16 layers instead, by loss saliency on
the same calibration tokens (17 contiguous candidates). Heavy (16 GB of weights written; about 20 min on 2 cores). Run:

    python bench/bench_prune_8b.py --dir /work/big24 [--config llama-3.1-8b] [--samples 4 --seq-len 256]
    python bench/bench_prune_8b.py --dir /tmp/small --config smollm2-135m --hidden 378 --mlp 1024  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = Path.home() / ".cache/pdc/models/smollm2-135m-instruct"
SHARD_BYTES = 2 * 2**30
# The width recipe of specs/llama-3.1-8b-to-4b-width.pds (hidden, mlp, heads, kv_heads).
RECIPES = {"llama-3.1-8b": (3072, 9216, 32, 8), "mistral-nemo-12b": (4096, 11520, 32, 8)}


def weight_shapes(cfg: dict) -> dict[str, tuple]:
    """HF names and shapes of a Llama/Mistral-style decoder, from its config."""
    h, m, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                       p + "mlp.down_proj.weight": (h, m)})
    shapes["model.norm.weight"] = (h,)
    if not cfg.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def make_checkpoint(path: Path, cfg: dict) -> None:
    """Random bf16 weights in shards of at most SHARD_BYTES, with the HF index file."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    path.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, "dtype": "bfloat16"}
    cfg.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (TOKENIZER / name).exists():
            shutil.copy2(TOKENIZER / name, path / name)
    shapes = weight_shapes(cfg)
    groups, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    with tqdm(total=len(shapes), desc="write random checkpoint") as bar:
        for s, names in enumerate(groups):
            fname = f"model-{s + 1:05d}-of-{len(groups):05d}.safetensors"
            part = {}
            for n in names:
                t = torch.empty(shapes[n], dtype=torch.bfloat16)
                if len(shapes[n]) == 1:
                    t.fill_(1.0)  # norm weights: ones, as initialised
                else:
                    t.copy_(torch.randn(shapes[n], generator=g).mul_(0.02))
                part[n] = t
                weight_map[n] = fname
                bar.update(1)
            save_file(part, str(path / fname), metadata={"format": "pt"})
            del part
    total = sum(2 * int(torch.Size(s).numel()) for s in shapes.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def write_spec(path: Path, model_dir: Path, recipe: tuple, samples: int, seq_len: int,
               depth: int | None = None, emit: str | None = None) -> None:
    hidden, mlp, heads, kv = recipe
    stage = (f"prune depth {{ depth={depth} contiguous=true saliency=loss(wiki, samples={samples}, seq_len={seq_len}) }}"
             if depth else
             f"prune width {{ hidden={hidden} mlp={mlp} heads={heads} kv_heads={kv} "
             f"importance=activation(samples={samples}, seq_len={seq_len}) }}")
    if emit:
        stage = stage[:-1] + f"emit={emit} }}"
    path.write_text(f"""# written by bench/bench_prune_8b.py
model teacher = dir("{model_dir}")
data  wiki    = builtin("wiki")

{stage}
""")


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (the ranks torchrun starts)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                todo += [int(c) for c in open(f"/proc/{p}/task/{task}/children").read().split()]
        except OSError:
            pass
    return out


def _field(path: str, key: str) -> int:
    try:
        return 1024 * int(next(l for l in open(path) if l.startswith(key)).split()[1])
    except (OSError, StopIteration):
        return 0


def sample_rss(pid: int, out: dict, stop: threading.Event) -> None:
    """Every second: the child's RSS and the process tree's summed PSS (pages shared between the
    ranks, such as the mapped weight files, counted once). The peak RSS also comes from rusage."""
    while not stop.wait(1.0):
        tree = _tree(pid)
        out["max"] = max(out.get("max", 0), _field(f"/proc/{pid}/status", "VmRSS:"))
        out["tree_pss"] = max(out.get("tree_pss", 0), sum(_field(f"/proc/{p}/smaps_rollup", "Pss:") for p in tree))
        out["procs"] = max(out.get("procs", 0), len(tree))


def disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--config", default="llama-3.1-8b")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--mlp", type=int)
    ap.add_argument("--depth", type=int, help="prune depth to this many layers (loss saliency) instead of width")
    ap.add_argument("--nproc", type=int, default=1, help="pdc compile --nproc-per-node (importance on N ranks)")
    ap.add_argument("--emit", help="the stage's emit= (e.g. hf,lock); default: every output")
    args = ap.parse_args()
    cfg = json.loads((ROOT / "pdc/configs" / f"{args.config}.json").read_text())
    recipe = RECIPES.get(args.config, (cfg["hidden_size"], cfg["intermediate_size"],
                                       cfg["num_attention_heads"], cfg["num_key_value_heads"]))
    recipe = (args.hidden or recipe[0], args.mlp or recipe[1], *recipe[2:])
    model_dir = args.dir / f"{args.config}-random"
    if not (model_dir / "model.safetensors.index.json").exists():
        make_checkpoint(model_dir, cfg)
    spec = args.dir / ("depth.pds" if args.depth else "width.pds")
    write_spec(spec, model_dir, recipe, args.samples, args.seq_len, args.depth, args.emit)
    build = args.dir / ("build-depth" if args.depth else "build")
    shutil.rmtree(build, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    # `pdc run` of this one-stage spec is `pdc compile` that takes --nproc-per-node
    command = ["run", str(spec), "--out", str(build), "--nproc-per-node", str(args.nproc)] if args.nproc > 1 else \
        ["compile", str(spec), "--out", str(build)]
    child = subprocess.Popen([sys.executable, "-m", "pdc.cli", *command], env=env)
    sampled, stop = {}, threading.Event()
    threading.Thread(target=sample_rss, args=(child.pid, sampled, stop), daemon=True).start()
    rc = child.wait()
    stop.set()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if rc:
        raise SystemExit(f"pdc compile failed (exit {rc}) after {wall:.0f} s; peak RSS {peak / 2**30:.2f} GiB")
    result = json.loads((build / "prune" / "stage.json").read_text())["result"]
    seconds = result["seconds"]
    phases = {"export": ["export"], "calibration": ["importance", "saliency"],
              "slicing": ["slicing", "drop_layers", "read_weights"],
              "emission": ["emit", "seal", "fingerprint", "write_artifacts", "artifacts"],
              "verification": ["verify_artifacts"]}
    print(f"source            {disk(model_dir) / 2**30:8.2f} GiB on disk ({args.config}, random bf16)")
    print(f"params            {result['params_before']:,} -> {result['params_after']:,}")
    print(f"calibration       {args.samples} x {args.seq_len} tokens (builtin wiki)"
          + (f"; dropped layers {result['saliency']['dropped_layers']}" if args.depth else ""))
    for phase, keys in phases.items():
        print(f"time {phase:<13}{sum(seconds.get(k, 0) for k in keys):8.1f} s  ({', '.join(k for k in keys if k in seconds)})")
    print(f"time total        {wall:8.1f} s  (pdc compile wall clock, cores shared)")
    print(f"peak RSS          {peak / 2**30:8.2f} GiB  (ru_maxrss of pdc compile; sampled max "
          f"{sampled.get('max', 0) / 2**30:.2f})")
    print(f"peak tree PSS     {sampled.get('tree_pss', 0) / 2**30:8.2f} GiB  (sampled each second over "
          f"{sampled.get('procs', 0)} processes, pages shared between them counted once)")
    for a, r in result.get("artifacts", {}).items():
        print(f"  {a:<14}{r['bytes'] / 2**30:8.2f} GiB  max|diff| {r['max_abs_diff']:.3g} <= {r['tolerance']:g}")
    print(f"build disk        {disk(build) / 2**30:8.2f} GiB")
    from pdc.plan.prune_host import prune_host_bytes

    hidden_after = result["arch_after"]["hidden"]
    plan = prune_host_bytes(result["params_after"], cfg["vocab_size"], hidden_after)
    print(f"planned peak      {plan['total'] / 2**30:8.2f} GiB  (pdc.plan.prune_host; measured / planned "
          f"{peak / plan['total']:.2f})")


if __name__ == "__main__":
    main()
