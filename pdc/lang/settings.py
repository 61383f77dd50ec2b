"""Resolved stage configurations: the contract between the spec front end and the back ends.

The checker (`pdc.lang.checker`) lowers a parsed, checked spec into these plain frozen dataclasses;
the graph passes, trainers and evaluators consume only these, never the AST. Every field has a
usable default so back ends and their tests can build them directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, Optional

# What a prune stage can write (`emit=`): the checkpoint, program.pt2, the ONNX model, the lock.
EMIT_OUTPUTS = ("hf", "pt2", "onnx", "lock")
# The files of the deployable outputs, as the lock names them when they were left out.
EMIT_FILES = {"pt2": "program.pt2", "onnx": "model.onnx"}

ModelKind = Literal["hf", "dir", "gguf", "builtin"]
DataKind = Literal["hf", "json", "jsonl", "text", "parquet", "builtin", "generate", "mix"]


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. `hf`: a hub id (only its bundled config is known offline);
    `dir`: a local Hugging Face directory; `gguf`: a local GGUF file; `builtin`: an asset that
    `pdc setup` installs (e.g. "smollm2-135m")."""

    kind: ModelKind
    ref: str


@dataclass(frozen=True)
class DataSource:
    """A text corpus. `hf` goes through `datasets.load_dataset(ref, split=...)`; local kinds are
    files read the same way; `builtin` names a `pdc setup` asset (e.g. "wiki")."""

    kind: DataKind
    ref: str
    split: str = "train"
    field: str = "text"
    # `generate`: text the model `ref` samples (`GenerateConfig`); `mix`: the named corpora
    # (name, source, share), shares summing to 1
    generate: Optional["GenerateConfig"] = None
    parts: tuple[tuple[str, "DataSource", float], ...] = ()


@dataclass(frozen=True)
class GenerateConfig:
    """Text a model samples (`data gen = generate(teacher, prompts=wiki, tokens=200k)`): each
    document of `prompts`, cut to its first `prompt_tokens` tokens, starts samples of up to
    `length` new tokens at `temperature` (prompts cycle) until `tokens` new tokens are written;
    `batch` samples run together, and each part of `batch` samples draws from its own seed."""

    model: ModelSource
    prompts: DataSource
    tokens: int
    length: int = 256
    prompt_tokens: int = 32
    temperature: float = 1.0
    seed: int = 0
    batch: int = 64  # throughput on a CPU core: 61 tok/s at 16, 111 at 64 (SmolLM2-135M, shared cores)


@dataclass(frozen=True)
class ImportanceConfig:
    """How to rank channels/neurons/heads. `activation` is the paper's (forward-only)."""

    method: Literal["activation", "magnitude", "random"] = "activation"
    samples: int = 1024
    seq_len: int = 8192
    seq_agg: Literal["mean", "l2"] = "mean"  # over the sequence first
    batch_agg: Literal["l2", "mean"] = "l2"  # then over the batch
    seed: int = 0
    # routed experts ranked by the routing weight they receive ("mass") or by the norm of their
    # weighted output ("output"); both are reported in importance.json (bench/bench_expert_score.py)
    expert_score: Literal["mass", "output"] = "mass"


@dataclass(frozen=True)
class ReconstructConfig:
    """Reconstruction after a width cut (`reconstruct=lsq(damp=0.01)`): the projections that read
    pruned units (the MLP down projection, the attention output projection) are refit by damped
    least squares so their output on the calibration activations matches the unpruned layer's.
    `damp` scales the ridge term by the mean diagonal of the kept units' second moments. Default 1:
    on SmolLM2's quickstart cut with 16 x 256 calibration tokens, damp <= 0.01 fits the calibration
    outputs best and held-out ones worse than plain slicing (overfit); damp 1 was the best of
    0..1 on held-out text (bench/bench_reconstruct.py)."""

    method: Literal["lsq"] = "lsq"
    damp: float = 1.0


@dataclass(frozen=True)
class WidthTarget:
    """Target sizes; None keeps the source size on that axis."""

    hidden: Optional[int] = None
    mlp: Optional[int] = None
    heads: Optional[int] = None
    kv_heads: Optional[int] = None
    # mixture of experts: routed experts kept per layer, the MLP width of each kept expert, the
    # shared expert's MLP width
    experts: Optional[int] = None
    expert_mlp: Optional[int] = None
    shared_mlp: Optional[int] = None


@dataclass(frozen=True)
class Saliency:
    """Depth saliency: `loss` (LM loss on `data`), `task` (lm-eval or local MC task `task` with
    `shots`), `cosine` (block influence, 1 - cos(input, output))."""

    kind: Literal["loss", "task", "cosine"] = "loss"
    data: Optional[str] = None  # name of a `data` declaration (loss, cosine)
    task: Optional[str] = None
    shots: int = 0
    samples: int = 64
    seq_len: int = 512
    limit: Optional[int] = None  # task examples scored per candidate
    precision: Optional[str] = None  # task: "bf16" scores the candidates in bf16 where the CPU/GPU has it


@dataclass(frozen=True)
class DepthTarget:
    depth: int
    saliency: Saliency = field(default_factory=Saliency)
    contiguous: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """Shared by teacher correction and distillation. `tokens` and `steps` are alternatives: the
    plan turns tokens into steps with global_batch * seq_len tokens per step."""

    tokens: Optional[int] = None
    steps: Optional[int] = None
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 0
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    global_batch: int = 8
    micro_batch: int = 1
    seq_len: int = 512
    zero: int = 0  # DeepSpeed ZeRO stage of the trained model: 0, 1, 2 or 3
    # bf16: bf16 weights on a GPU that has it, bf16 autocast on a CPU with bf16 matrix units
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward pass
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 1
    val_fraction: float = 0.05
    val_every: int = 0  # validate every N optimizer steps as well (0: at the start and the end only)
    # teacher correction only
    method: Literal["full", "lora", "norm"] = "full"
    lora_rank: int = 16
    # distillation only. `ce` trains on next-token cross-entropy alone (no teacher: an ablation).
    loss: Literal["kl_forward", "kl_reverse", "ce"] = "kl_forward"
    temperature: float = 1.0
    ce_weight: float = 0.0
    top_k: Optional[int] = None
    # Teacher logits read from a cache of the teacher's top-`cache_k` log-probabilities per token
    # (plus the mass outside them), computed once by a `teacher_logits` stage; None: the teacher
    # runs online in every step.
    cache_k: Optional[int] = None

    @property
    def uses_teacher(self) -> bool:
        """Whether training needs teacher logits at all (online or cached)."""
        return self.loss != "ce"

    @property
    def online_teacher(self) -> bool:
        """Whether the training ranks load the teacher and run it in every step."""
        return self.uses_teacher and self.cache_k is None

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def total_steps(self) -> int:
        """`steps`, or enough whole steps to see `tokens` (rounded up); 0 when neither is set.
        The one step count: the checker, the plan and the training loop all use it."""
        if self.steps is not None:
            return int(self.steps)
        if self.tokens is not None:
            return -(-int(self.tokens) // self.tokens_per_step)
        return 0


# The teacher cache's k where a spec says `teacher_logits=cached` without one (and no top_k),
# measured by bench/bench_teacher_topk.py (SmolLM2-135M and its hidden=432 mlp=1024 student, 8
# wiki blocks of 256 tokens): the top 64 hold 88% of the teacher's probability, the bucketed KL is
# 0.91 of the full one and its gradient is 2.2% off the full KL's (cosine 0.9999), at 258 bytes
# per token; k=32 is 3.3% off at 130 bytes, k=128 1.4% off at 514.
DEFAULT_CACHE_K = 64


# The paper's teacher correction where a spec says nothing: peak LR one fifth of distillation's,
# 120 warm-up steps (at most half the steps), cosine decay.
PAPER_CORRECTION_LR_FRACTION = 0.2
PAPER_CORRECTION_WARMUP = 120


def paper_correction(correct: TrainConfig, distill: Optional[TrainConfig], given: frozenset) -> TrainConfig:
    """`correct` with the paper's defaults filled in for every key not in `given`."""
    out = correct
    if distill is not None and "lr" not in given:
        out = replace(out, lr=distill.lr * PAPER_CORRECTION_LR_FRACTION)
        if "min_lr" not in given:
            out = replace(out, min_lr=min(distill.min_lr * PAPER_CORRECTION_LR_FRACTION, out.lr))
    if "warmup" not in given:
        out = replace(out, warmup=min(PAPER_CORRECTION_WARMUP, out.total_steps() // 2))
    return out


@dataclass(frozen=True)
class EvalTask:
    name: str
    shots: int = 0


@dataclass(frozen=True)
class EvalConfig:
    tasks: tuple[EvalTask, ...] = ()
    # names of `data` declarations measured for held-out perplexity, in the order written (the
    # first is the headline); a distillation's own data gives only its validation tail
    perplexity_data: tuple[str, ...] = ()
    limit: Optional[int] = None
    seq_len: int = 512
    allow_code_execution: bool = False  # run tasks that execute model-written code (humaneval, mbpp)
    # None: bf16 on a GPU with bf16, fp32 elsewhere; "bf16" also on a CPU with bf16 matrix units;
    # "fp32" everywhere
    precision: Optional[str] = None
    # measure the teacher's and the student's inference speed and memory (`pdc.stages.speed`)
    speed: bool = False
