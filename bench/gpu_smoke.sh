#!/usr/bin/env bash
# Device check on a CUDA machine: the quickstart in bf16 on one GPU, compared with the same
# stages on the CPU in fp32; then importance on 2 processes when two GPUs exist.
#
#   bash bench/gpu_smoke.sh [OUT_DIR]          (PYTHON=... to pick the interpreter)
#
# Needs: a CUDA build of torch that sees a GPU, and the `pdc setup` assets (SmolLM2-135M, wiki,
# social_iqa; `pdc setup` installs them, which needs the package index once). Prints tokens/s of
# every training stage on the GPU and how far the GPU run agrees with the CPU one: validation loss
# of the teacher before correction (bf16 vs fp32), the kept channels/neurons of the prune stage
# (overlap %), the lock's probe loss, held-out perplexities. Exit status: 0 done, 2 no CUDA
# device (nothing is run), 1 a stage failed.
set -euo pipefail
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

"$PY" -c "from pdc.inputs import assets; assets.smollm2_dir(); assets.builtin_data_path('wiki'); assets.local_tasks_dir()" \
  2>/dev/null || "$PY" -m pdc.cli setup

# The quickstart with both training stages in bf16 (the CPU reference trains in fp32).
sed 's/precision=fp32/precision=bf16/' examples/quickstart.pds > "$OUT/quickstart_bf16.pds"
cp examples/quickstart.pds "$OUT/quickstart_fp32.pds"  # its lock is written next to it, not into examples/

echo "== 1 GPU, bf16: pdc run (correct, prune, distill, evaluate)"
start=$(date +%s)
CUDA_VISIBLE_DEVICES=0 "$PY" -m pdc.cli run "$OUT/quickstart_bf16.pds" --out "$OUT/gpu"
echo "gpu_smoke: GPU run took $(( $(date +%s) - start )) s"

echo "== CPU, fp32: pdc compile (correct, prune) for the reference"
start=$(date +%s)
CUDA_VISIBLE_DEVICES= "$PY" -m pdc.cli compile "$OUT/quickstart_fp32.pds" --out "$OUT/cpu"
echo "gpu_smoke: CPU reference took $(( $(date +%s) - start )) s"

"$PY" - "$OUT" <<'EOF'
import json
import sys
from pathlib import Path

from pdc.plan.results import read_record

out = Path(sys.argv[1])
gpu, cpu = out / "gpu", out / "cpu"
print("\n== tokens/s on the GPU")
for stage in ("correct", "distill"):
    r = read_record(gpu / stage).result
    ref = read_record(cpu / stage).result if (cpu / stage / "stage.json").exists() else None
    line = f"{stage:8s} {r.tokens_per_s:10.0f} tokens/s ({r.precision}, {r.steps} steps of {r.global_batch} x {r.seq_len})"
    if ref is not None:
        line += f"; CPU {ref.tokens_per_s:.0f} tokens/s ({ref.precision}): {r.tokens_per_s / ref.tokens_per_s:.1f}x"
    print(line)

print("\n== agreement with the CPU (fp32) run")
g, c = read_record(gpu / "correct").result, read_record(cpu / "correct").result
print(f"teacher validation loss before correction: GPU {g.val_loss_start:.4f}, CPU {c.val_loss_start:.4f} "
      f"({100 * abs(g.val_loss_start - c.val_loss_start) / c.val_loss_start:.2f} % apart)")
print(f"after correction:                          GPU {g.val_loss_end:.4f}, CPU {c.val_loss_end:.4f}")
kg, kc = read_record(gpu / "prune").result.kept, read_record(cpu / "prune").result.kept
def overlap(a, b):
    return 100.0 * len(set(a) & set(b)) / max(1, len(b))
print(f"kept hidden channels: {overlap(kg['hidden'], kc['hidden']):.1f} % the same")
mlp = [overlap(kg['layers'][l]['mlp'], kc['layers'][l]['mlp']) for l in kc['layers']]
print(f"kept MLP neurons: {sum(mlp) / len(mlp):.1f} % the same on average (lowest layer {min(mlp):.1f} %)")
lg = json.loads((out / "quickstart_bf16.prune.lock.json").read_text())["numeric"]
lc = json.loads((out / "quickstart_fp32.prune.lock.json").read_text())["numeric"]
for key in ("probe_loss", "calibration_loss"):
    if lg.get(key) is not None and lc.get(key) is not None:
        print(f"lock {key}: GPU {lg[key]:.5f}, CPU {lc[key]:.5f}")
ev = read_record(gpu / "evaluate").result
print("\n== held-out perplexity on the GPU (bf16); the README's CPU figures are for the same spec in fp32")
for label, scores in ev.models.items():
    tasks = ", ".join(f"{t} {100 * s.values[s.primary]:.1f} % {s.primary}" for t, s in scores.tasks.items())
    print(f"{label:18s} perplexity {scores.perplexity:.2f}; {tasks}")
EOF

echo
echo "== importance on 2 processes"
if [ "$NGPU" -lt 2 ]; then
  echo "gpu_smoke: one GPU only: the 2-process importance check needs two"
else
  rm -rf "$OUT/gpu2" && cp -r "$OUT/gpu" "$OUT/gpu2" && rm -rf "$OUT/gpu2/prune"
  CUDA_VISIBLE_DEVICES=0,1 "$PY" -m pdc.cli run "$OUT/quickstart_bf16.pds" --out "$OUT/gpu2" --stage prune --nproc-per-node 2
  "$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path
from pdc.plan.results import read_record
out = Path(sys.argv[1])
a, b = read_record(out / "gpu" / "prune").result.kept, read_record(out / "gpu2" / "prune").result.kept
print(f"2 processes vs 1: kept hidden channels identical: {a['hidden'] == b['hidden']}; "
      f"layers identical: {a['layers'] == b['layers']}")
EOF
fi
