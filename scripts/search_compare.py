"""After `scripts/search_smollm2.py`'s search: compare the chosen student with the quickstart's
hand cut (mlp 1536 -> 1152) at equal distillation steps, by paired intervals on held-out
perplexity and movie_recommendation. Both come from the search's short distillation (same
steps, same teacher-logit cache) when the hand cut was among the top candidates; otherwise the
hand cut is pruned and distilled here with the same settings.

    OMP_NUM_THREADS=2 python scripts/search_compare.py OUT_DIR [--more reddit amazon]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from pdc.files import write_json
from pdc.inputs.assets import builtin_model_dir, local_tasks_dir
from pdc.inputs.data import split_blocks, take, token_blocks
from pdc.inputs.verify import load_tokenizer
from pdc.lang.settings import DataSource, EvalConfig, EvalTask, ImportanceConfig, TrainConfig, WidthTarget
from pdc.runner.stats import format_difference, score_differences
from pdc.stages.distill import run_distill
from pdc.stages.evaluate import evaluate_models
from pdc.stages.prune_width import prune_width
from pdc.stages.teacher_logits import compute_teacher_logits

HAND = {"hidden": 576, "mlp": 1152, "heads": 9, "depth": 30}


def say(what: str) -> None:
    print(f"[search_compare {time.strftime('%H:%M:%S')}] {what}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--more", nargs="*", default=[])
    ap.add_argument("--heldout-blocks", type=int, default=None, help="the first N held-out blocks (all: default)")
    ap.add_argument("--students", nargs=2, type=Path, metavar=("SEARCH", "HAND"),
                    help="compare these two distilled checkpoints (before search.json exists)")
    args = ap.parse_args()
    out = args.out
    teacher = builtin_model_dir("smollm2-135m")
    tok = load_tokenizer(teacher)
    if args.students:
        students = {"search": args.students[0], "hand": args.students[1]}
        log = {"students": {k: str(v) for k, v in students.items()}}
    else:
        search = json.loads((out / "search" / "search.json").read_text())
        rows = search["candidates"]
        chosen = rows[search["chosen"]]
        log = {"chosen": chosen["sizes"], "steps": search["steps"]}
        students = {"search": out / "search.work" / f"candidate{chosen['cheap_rank'] - 1}" / "distilled" / "model"}
        hand_row = next((r for r in rows if r["sizes"] == HAND), None)
    if args.students:
        pass
    elif hand_row is not None and hand_row["distill_loss"] is not None:
        students["hand"] = out / "search.work" / f"candidate{hand_row['cheap_rank'] - 1}" / "distilled" / "model"
        log["hand_from"] = "the search's short distillation (it was a top candidate)"
    else:
        say("pruning and distilling the hand cut")
        blocks = token_blocks(DataSource("builtin", "wiki"), tok, 256)
        train, val = split_blocks(blocks, 0.02)
        calib = take(blocks, 16).read()
        hand = out / "hand"
        if not (hand / "model" / "config.json").exists():
            prune_width(teacher, calib, WidthTarget(mlp=1152), ImportanceConfig(samples=16, seq_len=256), hand,
                        deploy=False)
        dcfg = TrainConfig(steps=search["steps"], lr=1e-4, min_lr=1e-5, warmup=3, schedule="cosine", global_batch=4,
                           micro_batch=4, seq_len=256, val_fraction=0.02, precision="bf16", loss="kl_forward",
                           cache_k=64, checkpoint_every=max(1, search["steps"]))
        cache = compute_teacher_logits(teacher, train, val, dcfg, out / "teacher_logits").cache_dir
        r = run_distill(teacher, hand / "model", train, val, dcfg, out / "distill_hand.work", out / "distill_hand",
                        teacher_cache=cache)
        students["hand"] = out / "distill_hand" / "model"
        log["hand_from"] = f"distilled here, {search['steps']} steps, val loss {r.val_loss_start} -> {r.val_loss_end}"
    say("evaluating " + ", ".join(f"{k}={v}" for k, v in students.items()))
    ecfg = EvalConfig(tasks=(EvalTask("movie_recommendation_local", 0),), perplexity_data=("heldout",),
                      seq_len=512, precision="bf16")
    held = token_blocks(DataSource("builtin", "wiki-heldout"), tok, 512)
    if args.heldout_blocks:
        held = held[: args.heldout_blocks]
    log["heldout_blocks"] = len(held)
    more = {n: token_blocks(DataSource("builtin", n), tok, 512) for n in args.more}
    ev = evaluate_models(dict(students), lambda p: load_tokenizer(p), ecfg, local_tasks_dir(), held,
                         more_heldout=more, reuse_scores=True)
    a, b = ev.models["hand"], ev.models["search"]
    log["scores"] = {k: {"perplexity": m.perplexity, "heldout_blocks": len(m.block_nll),
                         "more": {n: h.perplexity for n, h in m.more_perplexity.items()},
                         "tasks": {t: {"values": s.values, "items": s.items} for t, s in m.tasks.items()}}
                     for k, m in ev.models.items()}
    log["search_minus_hand"] = [f"{metric}: {format_difference(metric, d)}" for metric, d in score_differences(a, b)]
    write_json(out / ("compare_students.json" if args.students else "compare.json"), log)
    print(json.dumps(log, indent=1, default=str))


if __name__ == "__main__":
    main()
