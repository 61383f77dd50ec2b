"""How many teacher logits per token a cache must keep: the measurement behind the default k.

On real text (the `pdc setup` wiki corpus) it runs the teacher (SmolLM2-135M) and a student
(the teacher pruned by activation importance, as the quickstart does; or `--student DIR`) and,
for each k, compares the forward KL that distillation from a top-k cache computes (top k + one
tail bucket, `pdc.stages.train.losses.cached_kl`, from the float16 values the cache stores) with
the full-vocabulary KL that the online teacher gives:

  topk_mass     the teacher's mean probability inside its top k
  kl_ratio      bucketed KL / full KL (the bucketed KL is a lower bound)
  grad_cos      cosine between the two KLs' gradients with respect to the student's logits
  grad_rel_err  |g_bucketed - g_full| / |g_full|
  bytes/token   on disk (`pdc.plan.training.cache_bytes_per_token`)

Prints one JSON line per k, then a summary line. Runs in a few minutes on two cores.

    python bench/bench_teacher_topk.py [--blocks 8] [--student DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=8, help="wiki blocks of --seq-len tokens measured")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--student", type=Path, default=None, help="a student checkpoint (default: prune the teacher)")
    ap.add_argument("--hidden", type=int, default=None, help="pruned student's hidden size (default: the source's)")
    ap.add_argument("--mlp", type=int, default=1024, help="pruned student's MLP size")
    ap.add_argument("--ks", default="8,16,32,64,128,256,512")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from pdc.inputs import assets
    from pdc.inputs.data import take, token_blocks
    from pdc.inputs.models import load_causal_lm
    from pdc.inputs.teacher_cache import LOGPROB_FLOOR, VALUE_DTYPE
    from pdc.inputs.verify import load_tokenizer
    from pdc.lang.settings import DataSource, ImportanceConfig, WidthTarget
    from pdc.plan.training import cache_bytes_per_token
    from pdc.stages.prune_width import prune_width
    from pdc.stages.teacher_logits import teacher_topk
    from pdc.stages.train.losses import cached_kl, kl_divergence

    teacher_dir = assets.smollm2_dir()
    tokenizer = load_tokenizer(teacher_dir)
    wiki = token_blocks(DataSource("builtin", "wiki"), tokenizer, args.seq_len)
    ids = take(wiki, args.blocks, seed=1).read()  # other blocks than the calibration's
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = args.student
        what = str(student_dir)
        if student_dir is None:
            target = WidthTarget(hidden=args.hidden, mlp=args.mlp)
            calib = take(wiki, 16, seed=0).read()
            prune_width(teacher_dir, calib, target, ImportanceConfig(samples=16, seq_len=args.seq_len),
                        Path(tmp) / "pruned", progress=False)
            student_dir = Path(tmp) / "pruned" / "model"
            what = f"teacher pruned to hidden={args.hidden or 'source'} mlp={args.mlp} (activation importance)"
        teacher = load_causal_lm(teacher_dir, "bench")
        student = load_causal_lm(student_dir, "bench")
        rows = []
        for i in range(len(ids)):
            block = ids[i:i + 1]
            with torch.no_grad():
                t_logits = teacher(input_ids=block).logits.float()
            s_logits = student(input_ids=block).logits.float().detach().requires_grad_(True)
            full = kl_divergence(s_logits, t_logits)
            g_full, = torch.autograd.grad(full, s_logits)
            per_k = {}
            for k in (int(x) for x in args.ks.split(",")):
                with torch.no_grad():
                    lp, ix, tail, _ = teacher_topk(_Fixed(t_logits), block, k, 1.0)
                # what the cache stores and the loss reads back
                lp = torch.from_numpy(np.maximum(lp.numpy(), LOGPROB_FLOOR).astype(VALUE_DTYPE))
                tail = torch.from_numpy(np.maximum(tail.numpy(), LOGPROB_FLOOR).astype(VALUE_DTYPE))
                bucketed = cached_kl(s_logits, lp, ix, tail)
                g, = torch.autograd.grad(bucketed, s_logits)
                per_k[k] = dict(
                    topk_mass=float((-torch.expm1(tail.float())).mean()),
                    kl_full=float(full.detach()), kl_bucketed=float(bucketed.detach()),
                    grad_cos=float(torch.nn.functional.cosine_similarity(g.flatten(), g_full.flatten(), dim=0)),
                    grad_rel_err=float((g - g_full).norm() / g_full.norm()),
                )
            rows.append(per_k)
    summary = {}
    for k in rows[0]:
        mean = {key: float(np.mean([r[k][key] for r in rows])) for key in rows[0][k]}
        line = {"k": k, "topk_mass": round(mean["topk_mass"], 4),
                "kl_ratio": round(mean["kl_bucketed"] / mean["kl_full"], 4),
                "grad_cos": round(mean["grad_cos"], 4), "grad_rel_err": round(mean["grad_rel_err"], 4),
                "bytes_per_token": round(cache_bytes_per_token(k, teacher.config.vocab_size, args.seq_len), 1)}
        summary[k] = line
        print(json.dumps(line))
    print(json.dumps({"student": what, "blocks": args.blocks, "seq_len": args.seq_len,
                      "kl_full_nats_per_token": round(float(np.mean([r[k]["kl_full"] for r in rows])), 4)}))


class _Fixed(torch.nn.Module):
    """Returns fixed logits, so `teacher_topk` (what the teacher pass runs) turns them into a cache row."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.logits})()


if __name__ == "__main__":
    main()
