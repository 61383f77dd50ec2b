"""Inference speed and memory of a teacher and its students, measured in one interleaved session.

`measure_speed({label: SpeedModel}, teacher_label, settings)` returns a `SpeedResult`. What it
measures, for every model and backend:

- `torch prefill@L` / `onnx prefill@L`: one forward pass over a batch-1 prompt of L tokens and
  the pick of the first new token (argmax of the last logits). Its seconds are the time to first
  token at that length; its tokens/s the prefill throughput.
- `torch decode@bB`: `decode_tokens` greedy steps of B sequences with the KV cache, after an
  untimed prefill of `context` tokens; tokens/s = B x steps / seconds.
- memory: the weights' bytes and the KV cache's bytes (read off the cache tensors after the
  largest decode); their sum is the peak (activations of one step are small beside them; every
  model shares the device, so an allocator's peak would mix them).

ONNX Runtime runs prefill only: the emitted `model.onnx` is `input_ids -> logits` without past
keys and values, so a decode step there would recompute the whole prefix (quadratic) and say
nothing about serving with a cache.

Honest timing: every model is loaded first, each measure runs `warmup` untimed times per model,
then `repeats` rounds in which every model runs the measure once, in turn (teacher, student,
student, teacher, teacher, student, ...: the order reverses every round, so neither side always
goes first): load from other processes on a shared machine lands on both sides alike. A student's speed-up on a measure is the median over rounds of (teacher seconds / student
seconds of the same round); medians carry a distribution-free interval from the order statistics
of the repeats (`median_interval`). The thread count and the hardware are recorded.
"""

from __future__ import annotations

import inspect
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from pdc.emit.artifacts import export_onnx, onnx_session
from pdc.errors import PdcError
from pdc.graph.export import export_model, seal
from pdc.inputs.models import load_causal_lm
from pdc.plan.results import Estimate, Measure, ModelSpeed, SpeedResult

STAGE = "bench"
CONFIDENCE = 0.95
ONNX_NOTE = ("onnx: prefill only -- the emitted model.onnx is input_ids -> logits without past keys and "
             "values, so decoding there would recompute the whole prefix every step")


@dataclass(frozen=True)
class SpeedSettings:
    prompt_lens: tuple[int, ...] = (128, 512)
    batches: tuple[int, ...] = (1, 16)
    context: int = 64
    decode_tokens: int = 16
    warmup: int = 1
    repeats: int = 7
    backends: tuple[str, ...] = ("torch", "onnx")
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    threads: Optional[int] = None  # CPU threads of both backends (None: PyTorch's current setting)


@dataclass(frozen=True)
class SpeedModel:
    """A checkpoint to measure and, for the ONNX backend, its ONNX file (None: torch only)."""

    path: Path
    onnx: Optional[Path] = None


# ---- statistics --------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def median_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, low, high): the order statistics x(k) <= median <= x(n+1-k) with the largest k
    whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least `CONFIDENCE` (k=1, min..max, covers
    98.4% at 7 repeats). Below 6 repeats no k reaches 95%: min..max, with less coverage."""
    v = sorted(values)
    if not v:
        raise PdcError("no repeats to summarize", STAGE)
    k = _order(len(v))
    return median(v), v[k - 1], v[len(v) - k]


def interval_coverage(n: int) -> float:
    """The coverage of `median_interval`'s interval for n repeats."""
    return 1 - 2 * _binom_cdf(_order(n) - 1, n)


def _order(n: int) -> int:
    k = 1
    while k + 1 <= n // 2 and 1 - 2 * _binom_cdf(k, n) >= CONFIDENCE:  # coverage of k + 1
        k += 1
    return k


def _binom_cdf(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def estimate(values: Sequence[float]) -> Estimate:
    m, lo, hi = median_interval(values)
    return Estimate(m, lo, hi)


# ---- one model ---------------------------------------------------------------------------------
class _Runner:
    """A loaded model and the measures it runs (each returns its wall seconds)."""

    def __init__(self, model_dir: Path, onnx: Optional[Path], settings: SpeedSettings, threads: int):
        self.settings = settings
        self.device = torch.device(settings.device)
        dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
        self.model = load_causal_lm(model_dir, STAGE, dtype, attn_implementation="sdpa").to(self.device)
        self.session = None
        if onnx is not None and "onnx" in settings.backends:
            self.session = onnx_session(onnx, threads)
        # transformers 5 names the KV cache `cache` (`past_key_values` is its deprecated alias)
        self.cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self.kv_bytes = 0
        self.kv_positions = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> float:
        ids = ids.to(self.device)
        self._sync()
        t0 = time.perf_counter()
        out = self.model(input_ids=ids, use_cache=True)
        out.logits[:, -1].argmax(-1).tolist()  # the first new token, on the host
        return time.perf_counter() - t0

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor, steps: int) -> float:
        ids = ids.to(self.device)
        out = self.model(input_ids=ids, use_cache=True)  # the prompt: not timed
        past, token = out[self.cache_arg], out.logits[:, -1:].argmax(-1)
        self._sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = self.model(input_ids=token, use_cache=True, **{self.cache_arg: past})
            past, token = out[self.cache_arg], out.logits[:, -1:].argmax(-1)
        token.tolist()
        seconds = time.perf_counter() - t0
        kv = _cache_bytes(past)
        if kv > self.kv_bytes:
            self.kv_bytes, self.kv_positions = kv, ids.shape[0] * (ids.shape[1] + steps)
        return seconds

    def onnx_prefill(self, ids: torch.Tensor) -> float:
        feed = {"input_ids": ids.numpy()}
        t0 = time.perf_counter()
        (logits,) = self.session.run(["logits"], feed)
        logits[:, -1].argmax(-1).tolist()
        return time.perf_counter() - t0


def _cache_bytes(past) -> int:
    """Bytes of every key and value tensor a transformers cache holds."""
    layers = getattr(past, "layers", None)
    if layers is None:
        return 0
    total = 0
    for layer in layers:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _sizes(model) -> tuple[int, int, int]:
    """(parameters, weight bytes, matmul FLOPs per token): 2 x the parameters a token is
    multiplied with -- every parameter but the input embedding (a lookup), plus the head when it
    is tied to the embedding (attention scores excluded: they grow with the context)."""
    params = {id(p): p for p in model.parameters()}.values()
    count = sum(p.numel() for p in params)
    nbytes = sum(p.numel() * p.element_size() for p in params)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    flops = 2 * (count - emb.numel() + (emb.numel() if tied else 0))
    return count, nbytes, flops


# ---- the session -------------------------------------------------------------------------------
def hardware(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(torch.device(device))} (CUDA)"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


def measure_speed(models: Mapping[str, SpeedModel], teacher: str, settings: SpeedSettings = SpeedSettings(),
                  progress: bool = True) -> SpeedResult:
    """Measure every model of `models` (the teacher `teacher` among them) interleaved."""
    if teacher not in models:
        raise PdcError(f"no teacher {teacher!r} among the models to measure", STAGE)
    if settings.device != "cpu" and not settings.device.startswith("cuda"):
        raise PdcError(f"device {settings.device!r}: expected cpu, cuda or cuda:N", STAGE)
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise PdcError(f"device {settings.device!r}: no CUDA device here", STAGE)
    if settings.repeats < 1 or min(settings.prompt_lens + settings.batches) < 1 or settings.decode_tokens < 1:
        raise PdcError("speed measures need repeats, prompt lengths, batches and decode tokens of at least 1", STAGE)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    threads = torch.get_num_threads()
    labels = [teacher] + [k for k in models if k != teacher]
    runners = {k: _Runner(models[k].path, models[k].onnx, settings, threads) for k in labels}
    vocab = min(r.model.config.vocab_size for r in runners.values())
    onnx = "onnx" in settings.backends and all(r.session is not None for r in runners.values())
    gen = torch.Generator().manual_seed(settings.seed)
    prompts = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in settings.prompt_lens}
    contexts = {b: torch.randint(0, vocab, (b, settings.context), generator=gen) for b in settings.batches}
    runs: dict[str, tuple[int, Callable[[_Runner], float]]] = {}
    for n in settings.prompt_lens:
        runs[f"torch prefill@{n}"] = (n, lambda r, ids=prompts[n]: r.prefill(ids))
    for b in settings.batches:
        runs[f"torch decode@b{b}"] = (b * settings.decode_tokens,
                                      lambda r, ids=contexts[b]: r.decode(ids, settings.decode_tokens))
    if onnx:
        for n in settings.prompt_lens:
            runs[f"onnx prefill@{n}"] = (n, lambda r, ids=prompts[n]: r.onnx_prefill(ids))
    seconds = {k: {m: [] for m in runs} for k in labels}
    bar = _bar(progress, len(runs) * (settings.warmup + settings.repeats) * len(labels))
    for name, (_, run) in runs.items():
        for _ in range(settings.warmup):
            for k in labels:
                run(runners[k])
                bar.update(1)
        for i in range(settings.repeats):
            # interleaved: round i of every model back to back, in turn forwards and backwards
            # (teacher, student, student, teacher, ...) so neither side always runs first
            for k in labels if i % 2 == 0 else labels[::-1]:
                seconds[k][name].append(run(runners[k]))
                bar.update(1)
    bar.close()
    out = {}
    for k in labels:
        r = runners[k]
        count, nbytes, flops = _sizes(r.model)
        measures = {m: Measure(tuple(seconds[k][m]), tokens, estimate([tokens / s for s in seconds[k][m]]))
                    for m, (tokens, _) in runs.items()}
        speedup = {} if k == teacher else {
            m: estimate([t / s for t, s in zip(seconds[teacher][m], seconds[k][m])]) for m in runs}
        peak = nbytes + r.kv_bytes  # measured tensors: all models share the device, so no allocator peak
        out[k] = ModelSpeed(path=str(models[k].path), params=count, weights_bytes=nbytes,
                            kv_bytes_per_token=r.kv_bytes // max(1, r.kv_positions), peak_bytes=peak,
                            flops_per_token=flops, measures=measures, speedup=speedup,
                            onnx=str(models[k].onnx) if onnx else None)
    notes = [ONNX_NOTE] if onnx else []
    if "onnx" in settings.backends and not onnx:
        notes.append("onnx: not measured -- a model has no ONNX file")
    return SpeedResult(teacher=teacher, models=out, device=settings.device, hardware=hardware(settings.device),
                       threads=threads, precision=settings.precision, prompt_lens=settings.prompt_lens,
                       batches=settings.batches, context=settings.context, decode_tokens=settings.decode_tokens,
                       warmup=settings.warmup, repeats=settings.repeats,
                       confidence=round(interval_coverage(settings.repeats), 4), notes=tuple(notes))


def _bar(progress: bool, total: int):
    return tqdm(total=total, desc="speed", unit="run", leave=False, disable=not progress)


# ---- the teacher's ONNX file -------------------------------------------------------------------
def teacher_onnx(model_dir: Path, path: Path, progress: bool = True) -> Path:
    """The teacher as ONNX by the path the prune stage emits its students (trace, seal, dynamo
    export checked by onnxruntime against the program), written once at `path`."""
    if path.exists():
        return path
    bar = tqdm(total=3, desc="teacher onnx (once)", unit="step", leave=False, disable=not progress)
    model = load_causal_lm(model_dir, STAGE, torch.float32)
    program = export_model(model)
    bar.update(1)
    ep = seal(program)
    bar.update(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(ep, program, path)
    bar.update(1)
    bar.close()
    return path
