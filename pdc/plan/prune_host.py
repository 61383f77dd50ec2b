"""Host memory (RAM) of a prune stage on a streamed source, from the architectures alone.

A source over 4 GiB is never loaded: calibration and slicing read one weight at a time, the
student is held in the source's precision and computed in fp32 (each weight widened while the op
that reads it runs), and the files are checked one at a time after the student is released
(`pdc.graph.storage`, `pdc.emit.lean`). The peak is therefore the student plus the largest
weight widened to fp32 (the output head: vocab x hidden) plus the fingerprint's bounded logits
(`pdc.emit.fingerprint.LOSS_LOGITS_BYTES`, twice: the logits and their log-softmax) plus the
process itself (Python, torch, transformers, the traced graph: `PROCESS_BYTES`, measured as
the peak of pruning a 0.2 GB model, tests/test_prune_memory_guard.py). The checks after the
student is released cost about as much, not more: program.pt2 is loaded once, in a child process
(one copy), and onnxruntime maps the ONNX data file (resident as it is read, plus the head's
fp32 cast and transpose). Measured on the 8B width recipe (bench/bench_prune_8b.py): peak
11.97 GiB against 11.27 planned (x1.06); the pt2 child 10.3 GiB, onnxruntime's check ~11.9 GiB.
"""

from __future__ import annotations

from pathlib import Path

STREAM_BYTES = 4 * 2**30  # a source whose weight files exceed this is streamed, never loaded
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROCESS_BYTES = int(0.9 * 2**30)  # imports, traced graph, ONNX exporter (a small model's whole peak)
LOSS_LOGITS_BYTES = 256 * 2**20  # pdc.emit.fingerprint's bound on one forward's fp32 logits


def streams(model_dir: Path) -> bool:
    """Whether the checkpoint in `model_dir` is streamed by a prune stage (never loaded whole)."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) > STREAM_BYTES


def prune_host_bytes(student_params: int, vocab: int, hidden: int, stored_bytes: int = 2) -> dict[str, int]:
    """Peak host memory of pruning to a student of `student_params` parameters (stored in
    `stored_bytes` each) with output head vocab x hidden, by part, the sum under "total"."""
    parts = {
        "student": student_params * stored_bytes,
        "widened head": vocab * hidden * 4,
        "fingerprint logits": 2 * LOSS_LOGITS_BYTES,
        "process": PROCESS_BYTES,
    }
    parts["total"] = sum(parts.values())
    return parts


def streamed_prune_host(config: dict, params_before: int, params_after: int, vocab: int,
                        hidden: int) -> dict[str, int] | None:
    """The plan above for a prune whose source (`config`, `params_before` parameters) is streamed;
    None for a source small enough to be loaded (that path is not planned here)."""
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    stored = DTYPE_BYTES.get(name, 4)
    if params_before * stored <= STREAM_BYTES:
        return None
    return prune_host_bytes(params_after, vocab, hidden, stored)
