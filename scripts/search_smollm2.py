"""The SmolLM2 measurement of `prune search` (experiments/search.pds, run stage by stage).

Searches at the quickstart's parameter budget, distills the chosen student and the quickstart's
hand-chosen MLP-only cut (mlp 1536 -> 1152) for the same steps from one teacher-logit cache, and
compares them by paired intervals on held-out perplexity and movie_recommendation.

    OMP_NUM_THREADS=2 python scripts/search_smollm2.py OUT_DIR [--steps 30] [--top 3] [--search-steps 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from pdc.arch import Arch
from pdc.files import write_json
from pdc.inputs.assets import builtin_model_dir, local_tasks_dir
from pdc.inputs.data import split_blocks, take, token_blocks
from pdc.inputs.verify import load_tokenizer
from pdc.lang.search_settings import Limit, SearchConfig
from pdc.lang.settings import DataSource, EvalConfig, EvalTask, ImportanceConfig, Saliency, TrainConfig, WidthTarget
from pdc.plan.results import encode
from pdc.runner.stats import format_difference, score_differences
from pdc.stages.distill import run_distill
from pdc.stages.evaluate import evaluate_models
from pdc.stages.prune_width import prune_width
from pdc.stages.search import ShortDistill, prune_search
from pdc.stages.teacher_logits import compute_teacher_logits
from pdc.stages.search_latency import check_chosen, corner_shapes, fit_latency


def say(what: str) -> None:
    print(f"[search_smollm2 {time.strftime('%H:%M:%S')}] {what}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--search-steps", type=int, default=20)
    ap.add_argument("--more", nargs="*", default=[])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--saliency", default="loss")
    ap.add_argument("--latency", action="store_true", help="add a latency budget (<=1.0x): measures and fits")
    ap.add_argument("--budget", type=float, default=0.853)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = {}
    t0 = time.time()
    say("start")
    teacher = builtin_model_dir("smollm2-135m")
    tok = load_tokenizer(teacher)
    blocks = token_blocks(DataSource("builtin", "wiki"), tok, 256)
    train, val = split_blocks(blocks, 0.02)
    calib = take(blocks, 16).read()
    latency_limit = Limit("latency", 1.0, True, 1, 4096, "decode")
    cfg = SearchConfig(
        limits=(Limit("params", args.budget, True), Limit("memory", 1.0, True, 1, 4096))
        + ((latency_limit,) if args.latency else ()),
        axes=(("hidden", 72), ("mlp", 128), ("heads", 3), ("depth", 2)), keep=0.5, slack=0.03,
        top=args.top, steps=args.search_steps, samples=args.samples, hand=(("quickstart", (("mlp", 1152),)),),
        importance=ImportanceConfig(samples=16, seq_len=256), saliency=Saliency(args.saliency, samples=args.samples, seq_len=256))
    dcfg = TrainConfig(steps=args.steps, lr=1e-4, min_lr=1e-5, warmup=3, schedule="cosine", global_batch=4,
                       micro_batch=4, seq_len=256, val_fraction=0.02, precision="bf16", loss="kl_forward",
                       cache_k=64)
    fits = {}

    def latency(source_cfg, source, limit):
        say("measuring latency of the corner shapes")
        fits["fit"] = fit_latency(source_cfg, source, limit, corner_shapes(source, cfg), repeats=3, tokens=8)
        say("latency fit: " + json.dumps(fits["fit"].to_json()))
        return fits["fit"]

    say("blocks ready")
    short = ShortDistill(teacher, train, val, dcfg, out / "search.work")
    res = prune_search(teacher, calib, cfg, out / "search", distill=short, latency=latency if args.latency else None,
                       deploy=False)
    log["search_s"] = time.time() - t0
    if args.latency:
        fit = fits["fit"]
        source_cfg = json.loads((teacher / "config.json").read_text())
        chosen_arch = Arch.from_hf_config(json.loads((out / "search" / "model" / "config.json").read_text()))
        hand_arch = Arch.from_hf_config(source_cfg).with_sizes(mlp=1152)
        log["latency_check_chosen"] = check_chosen(fit, source_cfg, chosen_arch, repeats=3, tokens=8)
        log["latency_check_hand"] = check_chosen(fit, source_cfg, hand_arch, repeats=3, tokens=8)
        log["latency_fit"] = fit.to_json()
    write_json(out / "log.json", log)
    say("search done: " + json.dumps(res.search["chosen_sizes"]))
    # the hand-chosen cut, as the quickstart prunes it
    hand = out / "hand"
    if not (hand / "model" / "config.json").exists():
        prune_width(teacher, calib, WidthTarget(mlp=1152), ImportanceConfig(samples=16, seq_len=256), hand,
                    deploy=False)
    cache = compute_teacher_logits(teacher, train, val, dcfg, out / "teacher_logits").cache_dir
    students = {}
    for name, src in (("search", out / "search" / "model"), ("hand", hand / "model")):
        say(f"distilling {name}")
        r = run_distill(teacher, src, train, val, dcfg, out / f"distill_{name}.work", out / f"distill_{name}",
                        teacher_cache=cache)
        students[name] = out / f"distill_{name}" / "model"
        log[f"distill_{name}"] = {"val_loss_start": r.val_loss_start, "val_loss_end": r.val_loss_end,
                                  "wall_s": r.wall_s}
        write_json(out / "log.json", log)
    say("evaluating")
    ecfg = EvalConfig(tasks=(EvalTask("movie_recommendation_local", 0),), perplexity_data=("heldout",),
                      seq_len=512, precision="bf16")
    held = token_blocks(DataSource("builtin", "wiki-heldout"), tok, 512)
    more = {n: token_blocks(DataSource("builtin", n), tok, 512) for n in args.more}
    ev = evaluate_models({"hand": students["hand"], "search": students["search"]}, lambda p: load_tokenizer(p), ecfg,
                         local_tasks_dir(), held, more_heldout=more, reuse_scores=True)
    a, b = ev.models["hand"], ev.models["search"]
    log["scores"] = {k: {"perplexity": m.perplexity, "more": {n: h.perplexity for n, h in m.more_perplexity.items()},
                         "tasks": {t: s.values for t, s in m.tasks.items()}} for k, m in ev.models.items()}
    log["search_minus_hand"] = [format_difference(metric, d) for metric, d in score_differences(a, b)]
    log["total_s"] = time.time() - t0
    write_json(out / "log.json", log)
    print(json.dumps(log, indent=1, default=str))


if __name__ == "__main__":
    main()
