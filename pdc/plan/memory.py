"""Per-GPU memory of each stage, estimated from the architecture and the stage settings alone
(no weights), and the fewest GPUs on which it fits: `pdc compile --dry-run --gpu-mem 80G`.

Training (correct, distill), per GPU at world size N, as DeepSpeed keeps the model states
(its `estimate_zero2/3_model_states_mem_needs`, which the plan never undercuts:
tests/test_plan_memory.py), Psi = parameters, T = trainable parameters:
  weights      2 Psi bytes in bf16 (4 in fp32); /N under ZeRO-3
  gradients    the 16-bit gradients, 2 T (4 T in fp32), /N under ZeRO-2 and 3; and the fp32
               gradients the optimizer steps on, 4 T, /N under ZeRO-1, 2 and 3 (a bf16 run keeps
               them at ZeRO-0 too; fp32 at ZeRO-0 steps on its own gradients)
  optimizer    Adam: fp32 master weights + two moments = 12 T, /N under ZeRO-1, 2 and 3 (8 T at
               ZeRO-0 in fp32: torch's AdamW keeps no master copy)
  gathered     ZeRO-3: the largest layer gathered whole, its 16-bit weights and gradients
               (4 x its parameters: DeepSpeed's estimate; for Llama the embedding)
  activations  per token per layer, what a Llama layer keeps for its backward pass with fused
               (SDPA / flash) attention: two RMSNorms (input, normalised, output: 6h), the
               attention's q, k, v, their rotated q and k and its output (3q + 3kv; q, kv = heads,
               kv_heads x head_dim), the MLP's gate, up, SiLU and product (4m) elements;
               x micro_batch x seq_len x layers, plus the final norm (3h). Checked against the
               tensors a transformers Llama saves on CPU (within 15 %: tests/test_plan_memory.py). With activation
               checkpointing each layer keeps only its input (h), plus one layer's full set while
               it is recomputed.
  logits       micro_batch x seq_len x vocab entries of 16-bit logits (4 bytes in fp32)
  loss         the loss's vocabulary-sized temporaries per logit entry at its peak, with the
               logits' gradient: next-token CE 14 bytes (an fp32 copy, the log-softmax and its
               gradient), the online KL 30 (seven fp32 tensors: both sides' fp32 copies, log-
               softmaxes, p_T, the difference and the product), the KL from a cache 22 (five);
               measured on CPU with bf16 logits (tests/test_plan_memory.py). 8192 x 128,256
               tokens x vocabulary: 15, 32 and 23 GB
  teacher      (distillation) its weights, replicated or /N as a ZeRO-3 inference engine
               (`teacher_partitioned`; then one gathered layer more), its 16-bit logits and one
               layer's forward working set; a teacher corrected in the same loop
               (`order=concurrent`) what its correction would take (weights, gradients,
               optimizer, activations, logits, loss)
  reserve      a flat 2 GB for the CUDA context, NCCL buffers and allocator slack
Forward-only stages (prune, evaluate) hold the model in bf16, one layer's working set at their
batch (calibration: 8 blocks; evaluation: 1 sequence), the bf16 + fp32 logits where the stage
computes them (not for activation importance, which never runs the output head) and the reserve.

Not counted (docs/architecture.md repeats this): fragmentation beyond the reserve, DeepSpeed's
communication buckets (its estimator leaves them out too), attention kernels that materialise
the seq_len x seq_len scores (eager attention), lm-eval's automatic batch size (it fills what is
left), and the data path (memory-mapped shards live in host memory).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

from pdc.arch import Arch
from pdc.errors import PdcError
from pdc.lang.checked import CheckedSpec, CorrectStage, DistillStage, EvaluateStage, PruneStage
from pdc.lang.settings import TrainConfig
from pdc.plan.training import divisors

GB = 10**9
# A frozen teacher is replicated on every GPU while its weights take at most this share of one.
TEACHER_REPLICATE_FRACTION = 0.5
CALIBRATION_BATCH = 8  # blocks per forward pass of the importance / saliency pass
# Bytes per logit entry of each loss's temporaries (with the logits' gradient): module docstring.
LOSS_BYTES = {"ce": 14, "kl": 30, "cached_kl": 22}
LOGIT_BYTES_FORWARD = 6  # bf16 logits + an fp32 copy
MAX_GPUS = 1 << 16
RESERVE = 2 * GB  # CUDA context, NCCL buffers, allocator slack


def teacher_partitioned(zero: int, teacher_bytes: int, device_bytes: Optional[int]) -> bool:
    """Whether a distillation teacher runs as a ZeRO-3 inference engine (weights partitioned over
    the ranks) rather than replicated: when the student is trained under ZeRO-3, or when the
    teacher's weights would take more than half of one GPU."""
    if zero == 3:
        return True
    return device_bytes is not None and teacher_bytes > TEACHER_REPLICATE_FRACTION * device_bytes


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|GB|G|TiB|TB|T|MiB|MB|M)?\s*$", re.IGNORECASE)
_UNITS = {"": GB, "g": GB, "gb": GB, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40,
          "m": 10**6, "mb": 10**6, "mib": 1 << 20}


def parse_size(text: str) -> int:
    """'80G' / '80GB' -> 80e9 bytes, '80GiB' -> 80 x 2^30; a bare number is GB."""
    m = _SIZE.match(text)
    if not m:
        raise PdcError(f"cannot read the memory size {text!r} (e.g. 80G, 141GB, 80GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


# ---- the parts ---------------------------------------------------------------------------------
def layer_activation_elements(arch: Arch) -> int:
    """Elements per token one decoder layer keeps for its backward pass (fused attention)."""
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    return 6 * arch.hidden + 3 * q + 3 * kv + 4 * arch.mlp


ParamsOf = Callable[[Arch], int]  # exact parameter count of a model of these sizes


def trainable_params(arch: Arch, cfg: TrainConfig, kind: str, params_of: ParamsOf) -> int:
    if kind == "correct" and cfg.method == "norm":
        return arch.layers * 2 * arch.hidden + arch.hidden
    if kind == "correct" and cfg.method == "lora":
        h, q, kv, m = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim, arch.mlp
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + m) + (m + h)  # r x (in + out) per matrix
        return arch.layers * cfg.lora_rank * per_layer
    return params_of(arch)


def largest_layer_params(arch: Arch) -> int:
    """Parameters of the largest module ZeRO-3 gathers whole: the embedding (or output head), a
    projection, or a mixture's fused experts."""
    q = arch.heads * arch.head_dim
    experts = arch.experts * 3 * arch.expert_mlp * arch.hidden
    return max(arch.vocab * arch.hidden, arch.mlp * arch.hidden, q * arch.hidden, experts)


def loss_bytes(cfg: TrainConfig, kind: str) -> int:
    """Bytes per logit entry of the stage's loss temporaries (`LOSS_BYTES`)."""
    if kind == "correct" or not cfg.uses_teacher:
        return LOSS_BYTES["ce"]
    kl = LOSS_BYTES["kl" if cfg.online_teacher else "cached_kl"]
    return kl + (LOSS_BYTES["ce"] if cfg.ce_weight else 0)


def model_states(psi: int, t: int, zero: int, bf16: bool, n: int, largest: int) -> dict[str, float]:
    """Weights, gradients, optimizer state and ZeRO-3's gathered layer per GPU (bytes)."""
    w = 2 if bf16 else 4
    master = bf16 or zero >= 1  # DeepSpeed steps fp32 partitions; fp32 at ZeRO-0 is torch's AdamW
    return {
        "weights": psi * w / (n if zero >= 3 else 1),
        "gradients": t * w / (n if zero >= 2 else 1) + (4 * t / (n if zero >= 1 else 1) if master else 0),
        "optimizer": t * (12 if master else 8) / (n if zero >= 1 else 1),
        "gathered": 2 * w * largest if zero >= 3 else 0,
    }


def activations(arch: Arch, tokens: int, bytes_per: int, checkpointing: bool) -> int:
    """Saved activations of the decoder layers and the final norm (3h a token)."""
    full_layer = layer_activation_elements(arch) * tokens * bytes_per
    final_norm = 3 * arch.hidden * tokens * bytes_per
    if checkpointing:
        return arch.layers * arch.hidden * tokens * bytes_per + full_layer + final_norm
    return arch.layers * full_layer + final_norm


def train_memory(arch: Arch, cfg: TrainConfig, kind: str, n: int, teacher: Optional[Arch],
                 gpu_mem: Optional[int], params_of: ParamsOf,
                 teacher_correction: Optional[TrainConfig] = None) -> dict[str, Any]:
    """Bytes per GPU of a training stage at world size `n`, by part. A teacher corrected in the
    same loop (`teacher_correction`) takes what its own correction would, less the reserve."""
    bf16 = cfg.precision == "bf16"
    w = 2 if bf16 else 4
    psi, t = params_of(arch), trainable_params(arch, cfg, kind, params_of)
    tokens = cfg.micro_batch * cfg.seq_len
    z = cfg.zero
    parts = {
        **model_states(psi, t, z, bf16, n, largest_layer_params(arch)),
        "activations": activations(arch, tokens, w, cfg.activation_checkpointing),
        "logits": tokens * arch.vocab * w,
        "loss": tokens * arch.vocab * loss_bytes(cfg, kind),
        "reserve": RESERVE,
    }
    out: dict[str, Any] = {"parts": parts}
    if teacher is not None and teacher_correction is not None:
        trained = train_memory(teacher, teacher_correction, "correct", n, None, gpu_mem, params_of)["parts"]
        parts["teacher"] = sum(v for k, v in trained.items() if k != "reserve")
        out["teacher_placement"] = "trained"
    elif teacher is not None:
        t_bytes = params_of(teacher) * w
        split = teacher_partitioned(z, t_bytes, gpu_mem)
        parts["teacher"] = (t_bytes / n + largest_layer_params(teacher) * w if split else t_bytes) + \
            tokens * teacher.vocab * w + layer_activation_elements(teacher) * tokens * w
        out["teacher_placement"] = "zero3" if split else "replicated"
    out["activations_without_checkpointing"] = activations(arch, tokens, w, False)
    out["activations_with_checkpointing"] = activations(arch, tokens, w, True)
    out["total"] = sum(parts.values())
    return out


def forward_memory(arch: Arch, batch: int, seq_len: int, params: int, logits: bool = True) -> dict[str, Any]:
    tokens = batch * seq_len
    parts = {
        "weights": params * 2,
        "activations": layer_activation_elements(arch) * tokens * 2,
        "logits": tokens * arch.vocab * LOGIT_BYTES_FORWARD if logits else 0,
        "reserve": RESERVE,
    }
    return {"parts": parts, "total": sum(parts.values())}


# ---- the plan ----------------------------------------------------------------------------------
def _fewest(memory_at, valid, gpu_mem: int) -> tuple[Optional[int], dict]:
    """The smallest valid world size whose memory fits, and the memory there (at 1 GPU when none)."""
    for n in valid:
        m = memory_at(n)
        if m["total"] <= gpu_mem:
            return n, m
    return None, memory_at(valid[0])


def memory_plan(spec: CheckedSpec, gpu_mem: int, params_of: ParamsOf) -> list[dict[str, Any]]:
    """Per stage: the memory per GPU by part at the fewest GPUs that fit (`gpus`; None when no
    world size does), JSON-able for `plan.json`. `params_of` gives exact parameter counts (the
    plan's, from the emitted config)."""
    out = []
    arch = spec.source_arch
    for st in spec.stages:
        entry: dict[str, Any] = {"name": st.name, "kind": st.stage_kind, "gpu_mem": gpu_mem}
        if isinstance(st, (CorrectStage, DistillStage)):
            model = arch if isinstance(st, CorrectStage) else spec.final_arch
            # the teacher is the source model (corrected or not), never the pruned `arch`; a cache or CE loads none
            teacher = spec.source_arch if isinstance(st, DistillStage) and st.train.online_teacher else None
            corrected = st.teacher_correction if isinstance(st, DistillStage) else None
            cfg = st.train
            valid = [n for n in divisors(cfg.global_batch) if n <= MAX_GPUS]
            gpus, mem = _fewest(lambda n: train_memory(model, cfg, st.stage_kind, n, teacher, gpu_mem, params_of,
                                                         corrected),
                                valid, gpu_mem)
            entry.update(mem, gpus=gpus, params=params_of(model), zero=cfg.zero, precision=cfg.precision,
                         micro_batch=cfg.micro_batch, seq_len=cfg.seq_len, global_batch=cfg.global_batch,
                         activation_checkpointing=cfg.activation_checkpointing)
            # what the other choices would take: each ZeRO stage, with and without checkpointing
            entry["alternatives"] = {}
            for ckpt in (False, True):
                for zero in range(4):
                    alt_cfg = dataclasses.replace(cfg, zero=zero, activation_checkpointing=ckpt)
                    alt, _ = _fewest(lambda n: train_memory(model, alt_cfg, st.stage_kind, n, teacher, gpu_mem,
                                                            params_of, corrected), valid, gpu_mem)
                    entry["alternatives"][f"zero={zero}{' checkpointing' if ckpt else ''}"] = alt
        elif isinstance(st, PruneStage):
            before = st.source_arch or arch
            seq = st.importance.seq_len if st.kind in ("width", "search") else st.depth.saliency.seq_len
            mem = forward_memory(before, CALIBRATION_BATCH, seq, params_of(before), logits=st.kind == "depth")
            entry.update(mem, gpus=1 if mem["total"] <= gpu_mem else None, params=params_of(before),
                         batch=CALIBRATION_BATCH, seq_len=seq)
            arch = st.target_arch
        elif isinstance(st, EvaluateStage):
            mem = forward_memory(spec.source_arch, 1, st.eval.seq_len, params_of(spec.source_arch))  # the largest it scores
            entry.update(mem, gpus=1 if mem["total"] <= gpu_mem else None,
                         params=params_of(spec.source_arch), batch=1, seq_len=st.eval.seq_len)
        out.append(entry)
    return out


def _gb(x: float) -> str:
    return f"{x / GB:,.1f} GB"


def render_memory(stages: list[dict[str, Any]]) -> str:
    """The memory plan as text (one table per stage)."""
    if not stages:
        return ""
    gpu_mem = stages[0]["gpu_mem"]
    lines = [f"memory per GPU of {_gb(gpu_mem)} (an estimate from the architecture; what it leaves out: "
             "docs/architecture.md, memory plan)"]
    for i, st in enumerate(stages, 1):
        parts = st["parts"]
        at = st["gpus"] or 1
        if st["kind"] in ("correct", "distill"):
            head = (f"[{i}] {st['name']}: {st['params'] / 1e9:.2f}B params, ZeRO-{st['zero']} {st['precision']}, "
                    f"micro_batch {st['micro_batch']} x seq_len {st['seq_len']}"
                    + (", activation checkpointing" if st["activation_checkpointing"] else ""))
        else:
            head = (f"[{i}] {st['name']}: {st['params'] / 1e9:.2f}B params in bf16, batch {st['batch']} x "
                    f"seq_len {st['seq_len']}, forward only")
        lines += ["", head]
        for name, value in sorted(parts.items(), key=lambda kv: kv[0] == "reserve"):
            if not value:
                continue
            note = ""
            if name == "activations" and "activations_with_checkpointing" in st:
                note = (f"(without checkpointing {_gb(st['activations_without_checkpointing'])}, "
                        f"with {_gb(st['activations_with_checkpointing'])})")
            if name == "teacher":
                note = f"({st['teacher_placement']})"
            if name == "gathered":
                note = "(ZeRO-3: the largest layer whole)"
            if name == "loss":
                note = "(the loss's vocabulary-sized temporaries)"
            if name == "reserve":
                note = "(CUDA context, NCCL, allocator)"
            lines.append(f"    {name:<12} {_gb(value):>12}  {note}".rstrip())
        where = f"at {at} GPU{'s' if at > 1 else ''}"
        lines.append(f"    {'total':<12} {_gb(st['total']):>12}  {where}")
        if st["gpus"] is not None:
            lines.append(f"    fits on {st['gpus']} GPU{'s' if st['gpus'] > 1 else ''}"
                         + (" (the fewest world size dividing global_batch "
                            f"{st['global_batch']})" if "global_batch" in st else ""))
        else:
            lines.append(f"    does not fit in {_gb(gpu_mem)} at any world size")
        if "alternatives" in st:
            for ckpt in ("", " checkpointing"):
                alts = ", ".join(f"{k.split()[0]}: {v if v is not None else '-'}"
                                 for k, v in st["alternatives"].items() if k.endswith(ckpt) and
                                 (ckpt or "checkpointing" not in k))
                lines.append(f"    fewest GPUs {'with' if ckpt else 'without'} activation checkpointing by ZeRO stage: "
                             f"{alts}")
    return "\n".join(lines)
