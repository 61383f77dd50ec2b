"""Peak memory when pruning a checkpoint larger than its pruned result.

Creates a random-weight Llama of about `--gb` GB (fp32) in 4 safetensors shards in a temp dir,
then, in a child process, width-prunes it with streamed weights (magnitude importance: no
calibration forward is needed to show the memory behaviour) and reports peak RSS against
pruned-model size + largest shard. Heavy: run once.
Run: python bench/bench_prune_memory.py [--gb 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def make_checkpoint(path: Path, gb: float) -> dict:
    from safetensors.torch import save_file

    hidden, mlp, heads, kv, layers = 2048, 5632, 16, 4, 1
    per_layer = 4 * (hidden * hidden * 2 + 2 * hidden * hidden // 4) + 4 * 3 * hidden * mlp
    vocab = 32000
    layers = max(1, int((gb * 2**30 - 2 * 4 * vocab * hidden) / per_layer))
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden,
               intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
               num_key_value_heads=kv, head_dim=hidden // heads, max_position_embeddings=512,
               rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float32")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    q, k = hidden, kv * hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (q, hidden), p + "self_attn.k_proj.weight": (k, hidden),
                       p + "self_attn.v_proj.weight": (k, hidden), p + "self_attn.o_proj.weight": (hidden, q),
                       p + "mlp.gate_proj.weight": (mlp, hidden), p + "mlp.up_proj.weight": (mlp, hidden),
                       p + "mlp.down_proj.weight": (hidden, mlp), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    names = list(shapes)
    shards = 4
    per = -(-len(names) // shards)
    for s in range(shards):
        part = {n: torch.randn(shapes[n], generator=g) * 0.02 for n in names[s * per:(s + 1) * per]}
        if part:
            save_file(part, str(path / f"model-{s:05d}-of-{shards:05d}.safetensors"))
        del part
    return cfg


def child(src: str, out: str) -> None:
    torch.set_num_threads(2)
    from pdc.stages.prune_width import prune_width
    from pdc.lang.settings import ImportanceConfig, WidthTarget

    cfg = json.loads((Path(src) / "config.json").read_text())
    target = WidthTarget(hidden=cfg["hidden_size"] // 2, mlp=cfg["intermediate_size"] // 2)
    # deploy=False: the pruning itself (the .pt2/ONNX emission and the checkpoint check load
    # the pruned model again, which is a cost of the pruned size, not the source's)
    summary = prune_width(Path(src), None, target, ImportanceConfig(method="magnitude"), Path(out),
                          progress=False, stream_weights=True, deploy=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss": peak, "params_after": summary.params_after}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        make_checkpoint(src, args.gb)
        shard_sizes = [p.stat().st_size for p in src.glob("*.safetensors")]
        res = subprocess.run([sys.executable, __file__, "--child", str(src), str(Path(tmp) / "out")],
                             capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        stats = json.loads(res.stdout.strip().splitlines()[-1])
        pruned = (Path(tmp) / "out" / "model" / "model.safetensors").stat().st_size
        base = pruned + max(shard_sizes)
        print(f"source checkpoint        {sum(shard_sizes) / 2**30:6.2f} GiB in {len(shard_sizes)} shards")
        print(f"pruned model             {pruned / 2**30:6.2f} GiB")
        print(f"pruned + largest shard   {base / 2**30:6.2f} GiB")
        print(f"peak RSS (child)         {stats['peak_rss'] / 2**30:6.2f} GiB  ratio {stats['peak_rss'] / base:.2f}x")


if __name__ == "__main__":
    main()
