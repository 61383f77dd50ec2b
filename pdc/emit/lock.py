"""`prune.lock.json`: what a prune build produced, so CI can tell when a rebuild comes out different.

`pdc compile` writes the lock next to the build (`build_lock` + `write_lock`); `pdc check`
recompiles the prune stage into a scratch directory and calls `check_build`, which compares the
committed lock with the fresh one. A lock records:

- `spec`:        sha256 of the spec text;
- `source`:      the pruned-from checkpoint: sha256 of its config (volatile keys dropped) and of
                 each weight file;
- `inputs`:      shape and sha256 of the probe ids and of the calibration slice;
- `kept_indices`: `prune/kept_indices.json` as written by the pruning stage;
- `params`:      total / non-embedding parameter counts before and after;
- `arch`:        the pruned architecture (sizes per axis);
- `graph`:       structural fingerprint of `torch.export` of the pruned model (op/shape list hash,
                 op counts) and every parameter's shape;
- `numeric`:     logits on the probe (summary numbers and a slice) and LM loss on the
                 calibration slice (or on the probe when there is none);
- `environment`: torch/transformers/pdc versions -- recorded, never compared.

Structure is compared exactly, numbers within `atol + rtol * |expected|`.

Determinism: floats are rounded to `FLOAT_DIGITS` significant digits and the JSON is written with
sorted keys and fixed layout, so the same build directory and inputs give a byte-identical lock.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import transformers

from pdc import __version__
from pdc.arch import Arch
from pdc.emit.artifacts import export_program, graph_fingerprint
from pdc.errors import PdcError
from pdc.files import write_text
from pdc.graph.probe import default_probe
from pdc.inputs.models import load_causal_lm
from pdc.inputs.verify import content_hashes

LOCK_VERSION = 1
STAGE = "check"
LOCK_NAME = "prune.lock.json"
FLOAT_DIGITS = 6
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4
REQUIRED_KEYS = ("lock_version", "spec", "source", "inputs", "kept_indices", "params", "arch", "graph", "numeric")
LOGITS_SLICE = 8  # logits of the first vocab entries at each probe row's last position
# ---- building ----------------------------------------------------------------------------
def build_lock(build_dir: Union[str, Path], source_dir: Optional[Union[str, Path]], spec_text: str,
               probe_ids: Optional[torch.Tensor] = None, calib_blocks: Optional[torch.Tensor] = None,
               stage_dir: Optional[Union[str, Path]] = None) -> dict:
    """The lock of the pruned model in `stage_dir/model` (default `build_dir/prune`; a spec with
    several prune stages locks each: `build_dir/prune2`, ...), pruned from `source_dir`.

    `probe_ids` defaults to `default_probe(model_dir)`; the LM loss is measured on
    `calib_blocks` (LongTensor [N, L]) when given, else on the probe.
    Invariant: same directory contents and inputs -> equal dicts (and byte-equal `write_lock`);
    no path is recorded, so two build directories with the same contents give the same lock."""
    stage_dir = Path(stage_dir) if stage_dir is not None else Path(build_dir) / "prune"
    model_dir = stage_dir / "model"
    model = load_model(model_dir)
    probe_ids = default_probe(model.config.vocab_size, model_dir) if probe_ids is None else probe_ids.long()
    kept_path = stage_dir / "kept_indices.json"
    kept = _read_json(kept_path, "lock") if kept_path.exists() else None

    with torch.no_grad():
        ep = export_program(model, probe_ids)
    graph = graph_fingerprint(ep)
    graph["param_shapes"] = {name: list(p.shape) for name, p in sorted(model.state_dict().items())}
    del ep

    lock = {
        "lock_version": LOCK_VERSION,
        "spec": {"sha256": hashlib.sha256(spec_text.encode()).hexdigest()},
        "source": source_identity(Path(source_dir)) if source_dir is not None else None,
        "inputs": {"probe": tensor_identity(probe_ids), "calibration": tensor_identity(calib_blocks)},
        "kept_indices": kept,
        "params": {
            "before": _source_counts(source_dir),
            "after": _arch_counts(model.config.to_dict(), counted=_count_params(model)),
        },
        "arch": _arch_fields(model.config.to_dict()),
        "graph": graph,
        "numeric": numeric_fingerprint(model, probe_ids, calib_blocks),
        "environment": _environment(),
    }
    return _rounded(lock)


def write_lock(lock: dict, path: Union[str, Path]) -> Path:
    """Write `lock` as canonical JSON (sorted keys; lists of numbers on one line), atomically."""
    return write_text(path, dumps_lock(lock))


def dumps_lock(lock: dict) -> str:
    return _dumps(_rounded(lock), 0) + "\n"


def read_lock(path: Union[str, Path]) -> dict:
    """Load and validate a lock; any problem is a one-line `PdcError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise PdcError(f"lock file not found: {path}", STAGE)
    try:
        lock = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PdcError(f"lock file {path} is not valid JSON ({exc})".splitlines()[0], STAGE) from exc
    if not isinstance(lock, dict):
        raise PdcError(f"lock file {path} does not hold a JSON object", STAGE)
    version = lock.get("lock_version")
    if version != LOCK_VERSION:
        raise PdcError(
            f"lock file {path} has lock_version {version!r}; this pdc reads version {LOCK_VERSION} "
            "(rebuild it with `pdc compile`)", STAGE,
        )
    missing = [k for k in REQUIRED_KEYS if k not in lock]
    if missing:
        raise PdcError(f"lock file {path} lacks {', '.join(missing)} (rebuild it with `pdc compile`)", STAGE)
    return lock


# ---- pieces ------------------------------------------------------------------------------
def load_model(model_dir: Path):
    """The checkpoint in `model_dir` in fp32 with SDPA attention (fixed, so the graph
    fingerprint does not depend on how the model was loaded elsewhere)."""
    return load_causal_lm(model_dir, STAGE, attn_implementation="sdpa")


def source_identity(source_dir: Path) -> dict:
    """sha256 of the config (canonical JSON without volatile keys) and of every weight file."""
    return content_hashes(Path(source_dir), "lock")


def tensor_identity(t: Optional[torch.Tensor]) -> Optional[dict]:
    if t is None:
        return None
    data = t.detach().to(torch.int64).contiguous().numpy().tobytes()
    return {"shape": list(t.shape), "sha256": hashlib.sha256(data).hexdigest()}


def numeric_fingerprint(model, probe_ids: torch.Tensor, calib_blocks: Optional[torch.Tensor] = None,
                        batch_size: int = 4) -> dict:
    """Logit summary on the probe and mean next-token loss (calibration slice, else the probe)."""
    with torch.no_grad():
        logits = model(input_ids=probe_ids, use_cache=False).logits.float()
        probe_loss = _lm_loss(logits, probe_ids)
        if calib_blocks is not None and calib_blocks.numel():
            total, count = 0.0, 0
            for start in range(0, calib_blocks.shape[0], batch_size):
                chunk = calib_blocks[start : start + batch_size].long()
                chunk_logits = model(input_ids=chunk, use_cache=False).logits.float()
                n = chunk.shape[0] * (chunk.shape[1] - 1)
                total += _lm_loss(chunk_logits, chunk) * n
                count += n
            calib_loss = total / count
        else:
            calib_loss = None
    last = logits[:, -1, :]
    return {
        "logits": {
            "mean": float(logits.mean()),
            "std": float(logits.std()),
            "abs_max": float(logits.abs().max()),
            "rms": float(logits.pow(2).mean().sqrt()),
            "last_slice": last[:, :LOGITS_SLICE].tolist(),
            "last_logsumexp": torch.logsumexp(last, dim=-1).tolist(),
        },
        "probe_loss": probe_loss,
        "calibration_loss": calib_loss,
    }


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    ))


def _arch_fields(cfg: dict) -> dict:
    a = Arch.from_hf_config(cfg)
    return {k: getattr(a, k) for k in ("model_type", "vocab", "hidden", "mlp", "layers", "heads", "kv_heads", "head_dim", "tied")}


def _arch_counts(cfg: dict, counted: Optional[int] = None) -> dict:
    a = Arch.from_hf_config(cfg)
    out = {"total": a.total_params(), "non_embedding": a.non_embedding_params()}
    if counted is not None:
        out["counted"] = counted  # sum(numel) of the loaded model; equals "total" when consistent
    return out


def _source_counts(source_dir: Optional[Union[str, Path]]) -> Optional[dict]:
    if source_dir is None or not (Path(source_dir) / "config.json").exists():
        return None
    return _arch_counts(_config_of(Path(source_dir)))


def _count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def _config_of(model_dir: Path) -> dict:
    return _read_json(Path(model_dir) / "config.json", "lock")


def _environment() -> dict:
    return {"pdc": __version__, "torch": torch.__version__, "transformers": transformers.__version__}



def _read_json(path: Path, stage: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PdcError(f"file not found: {path}", stage) from None
    except json.JSONDecodeError as exc:
        raise PdcError(f"{path} is not valid JSON ({exc})", stage) from exc


def _round_float(x: float) -> Any:
    if math.isnan(x) or math.isinf(x):
        return str(x)  # JSON has no NaN/inf; a string still compares (and fails) visibly
    if x == 0:
        return 0.0
    return float(f"{x:.{FLOAT_DIGITS}g}")


def _rounded(obj: Any) -> Any:
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return _round_float(obj)
    if isinstance(obj, dict):
        return {str(k): _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    raise TypeError(f"lock values must be JSON data, got {type(obj).__name__}")


def _dumps(obj: Any, depth: int) -> str:
    """Sorted keys, two-space indent; a list of scalars stays on one line (kept indices)."""
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k)}: {_dumps(obj[k], depth + 1)}" for k in sorted(obj)]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return "[" + ", ".join(json.dumps(v) for v in obj) + "]"
        return "[\n" + ",\n".join(f"{inner}{_dumps(v, depth + 1)}" for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


# ---- comparing ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Mismatch:
    """One difference between the committed lock (`expected`) and the rebuilt one (`actual`).
    `path` is the key path in the lock, `kind` "structure" or "number", `message` one line."""

    path: tuple
    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


# Lock sections and how each is compared (the rest default by value type).
IGNORED_SECTIONS = ("environment",)


def compare_locks(expected: dict, actual: dict, rtol: Optional[float] = None,
                  atol: Optional[float] = None) -> list[Mismatch]:
    """Every difference: structure (ints, strings, hashes, index lists) exactly, floats within
    `atol + rtol * |expected|`. Empty list iff the locks agree. `environment` is not compared."""
    rtol = DEFAULT_RTOL if rtol is None else float(rtol)
    atol = DEFAULT_ATOL if atol is None else float(atol)
    out: list[Mismatch] = []
    keys = sorted(set(expected) | set(actual))
    for key in keys:
        if key in IGNORED_SECTIONS:
            continue
        _compare((key,), expected.get(key, _MISSING), actual.get(key, _MISSING), rtol, atol, out)
    return out


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _compare(path: tuple, exp: Any, act: Any, rtol: float, atol: float, out: list) -> None:
    where = describe_path(path)
    if exp is _MISSING or act is _MISSING:
        side = "the rebuilt lock" if act is _MISSING else "the committed lock"
        out.append(Mismatch(path, "structure", f"{where}: missing in {side}"))
        return
    if path and path[0] == "kept_indices" and (_is_int_list(exp) or _is_int_list(act)):
        if exp != act:
            what = "layers differ" if path[-1] == "dropped_layers" else "kept indices differ"
            out.append(Mismatch(path, "structure", f"{where}: {_index_diff(exp, act, what)}"))
        return
    if isinstance(exp, dict) and isinstance(act, dict):
        if path == ("graph", "op_counts"):
            diffs = [
                f"{op} {exp.get(op, 0)} -> {act.get(op, 0)}"
                for op in sorted(set(exp) | set(act)) if exp.get(op, 0) != act.get(op, 0)
            ]
            if diffs:
                out.append(Mismatch(path, "structure", f"{where}: {_clip(diffs)}"))
            return
        for key in sorted(set(exp) | set(act)):
            _compare(path + (key,), exp.get(key, _MISSING), act.get(key, _MISSING), rtol, atol, out)
        return
    if _is_float_data(exp) and _is_float_data(act):
        e, a = _flatten(exp), _flatten(act)
        if len(e) != len(a):
            out.append(Mismatch(path, "structure", f"{where}: {len(e)} values -> {len(a)} values"))
            return
        worst, worst_excess, worst_tol = 0.0, -1.0, 0.0
        for x, y in zip(e, a):
            diff = abs(float(x) - float(y))
            tol = atol + rtol * abs(float(x))
            if diff - tol > worst_excess:
                worst, worst_excess, worst_tol = diff, diff - tol, tol
        if worst_excess > 0:
            what = "max abs diff" if len(e) > 1 else f"{_num(e[0])} -> {_num(a[0])}, abs diff"
            out.append(Mismatch(path, "number", f"{where}: {what} {worst:.2g} > tol {worst_tol:.2g}"))
        return
    if exp != act:
        out.append(Mismatch(path, "structure", f"{where}: {_short(exp)} -> {_short(act)}"))


def describe_path(path: Sequence) -> str:
    """A key path in words: ("kept_indices", "layers", "3", "mlp") -> "layer 3 mlp"."""
    p = [str(x) for x in path]
    if p[:2] == ["kept_indices", "layers"] and len(p) >= 3:
        return " ".join([f"layer {p[2]}"] + p[3:])
    if p[:1] == ["kept_indices"] and len(p) == 2:
        return {"dropped_layers": "dropped layers"}.get(p[1], p[1])
    if p[:2] == ["graph", "param_shapes"] and len(p) == 3:
        return f"parameter {p[2]} shape"
    if p[:2] == ["numeric", "logits"]:
        return "logits probe " + " ".join(p[2:])
    names = {
        ("spec", "sha256"): "spec text",
        ("source", "config_sha256"): "source config",
        ("graph", "hash"): "graph structure (op/shape list hash)",
        ("graph", "op_counts"): "graph op counts",
        ("inputs", "probe"): "probe ids",
        ("inputs", "calibration"): "calibration slice",
    }
    for n in range(len(p), 0, -1):
        if tuple(p[:n]) in names:
            return " ".join([names[tuple(p[:n])]] + p[n:])
    if p[:2] == ["source", "weights_sha256"] and len(p) == 3:
        return f"source weight file {p[2]}"
    return " ".join(p)


def _index_diff(exp: Any, act: Any, what: str = "kept indices differ") -> str:
    if not _is_int_list(exp) or not _is_int_list(act):
        return f"{_short(exp)} -> {_short(act)}"
    removed = sorted(set(exp) - set(act))
    added = sorted(set(act) - set(exp))
    parts = []
    if len(exp) != len(act):
        parts.append(f"count {len(exp)} -> {len(act)}")
    if removed:
        parts.append(f"{len(removed)} removed {_clip(removed)}")
    if added:
        parts.append(f"{len(added)} added {_clip(added)}")
    if not parts:
        parts.append("same indices in a different order")
    return f"{what}: " + ", ".join(parts)


def _is_int_list(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in x)


def _is_float_data(x: Any) -> bool:
    """A float, or a (nested) list of numbers containing at least one float."""
    flat = _flatten(x) if isinstance(x, list) else [x]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat)
    return numeric and any(isinstance(v, float) for v in flat) if flat else False


def _flatten(x: Any) -> list:
    if isinstance(x, list):
        return [v for item in x for v in _flatten(item)]
    return [x]


def _clip(items: Sequence, n: int = 8) -> str:
    shown = ", ".join(str(v) for v in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"


def _short(x: Any, limit: int = 80) -> str:
    text = json.dumps(x) if not isinstance(x, str) else x
    if isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x):
        text = x[:12]  # a sha256: the prefix is enough to tell them apart
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _num(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def render_mismatches(mismatches: Iterable[Mismatch], expected: Optional[dict] = None,
                      actual: Optional[dict] = None) -> str:
    """A readable report: structural differences first, then numeric ones, one per line."""
    mismatches = list(mismatches)
    if not mismatches:
        return "lock matches: structure identical, numbers within tolerance"
    structure = [m for m in mismatches if m.kind == "structure"]
    numbers = [m for m in mismatches if m.kind != "structure"]
    lines = [f"lock mismatch: {len(structure)} structural, {len(numbers)} numeric difference(s)"]
    lines += [f"  - {m.message}" for m in structure + numbers]
    if numbers and expected and actual and expected.get("environment") != actual.get("environment"):
        e, a = expected.get("environment") or {}, actual.get("environment") or {}
        changed = [f"{k} {e.get(k)} -> {a.get(k)}" for k in sorted(set(e) | set(a)) if e.get(k) != a.get(k)]
        lines.append(f"  note: the environment differs ({', '.join(changed)}); numeric drift may come from it")
    return "\n".join(lines)


# ---- pdc check ---------------------------------------------------------------------------
def check_build(build_dir: Union[str, Path], lock_path: Union[str, Path], *,
                rtol: Optional[float] = None, atol: Optional[float] = None,
                source_dir: Optional[Union[str, Path]] = None, spec_text: Optional[str] = None,
                probe_ids: Optional[torch.Tensor] = None,
                calib_blocks: Optional[torch.Tensor] = None,
                stage_dir: Optional[Union[str, Path]] = None) -> tuple[bool, str]:
    """Compare the committed lock at `lock_path` with the build in `build_dir`.

    The build's own lock (`build_dir/prune.lock.json`, written by the recompile) is used when no
    inputs are given; with `spec_text` (and optionally `source_dir`, `probe_ids`,
    `calib_blocks`, `stage_dir`) the lock is rebuilt here from the build. Returns
    (matches, report)."""
    expected = read_lock(lock_path)
    if spec_text is None:
        actual = read_lock(Path(build_dir) / LOCK_NAME)
    else:
        actual = build_lock(build_dir, source_dir, spec_text, probe_ids, calib_blocks, stage_dir=stage_dir)
    mismatches = compare_locks(expected, actual, rtol=rtol, atol=atol)
    return (not mismatches), render_mismatches(mismatches, expected, actual)
