"""The prune lock: what a prune stage produced, so CI can tell when a rebuild comes out different.

After each prune stage the runner writes `<spec stem>.<stage>.lock.json` next to the spec (the
file a project commits); `pdc check` recompiles the prune stage and compares the fresh lock with
the committed one through `compare_locks`, the comparison the tests test. A lock is built from
the stage's typed record alone (`build_lock`): the stage computed every hash and fingerprint
while it held the rewritten program, so no checkpoint is reloaded and nothing is traced again.

- `spec`:         sha256 of the prune stage's settings (comments and other stages do not count);
- `inputs`:       every input of the stage by content hash: the model it pruned (the source or
                  the corrected teacher: config, each weight file, and one digest of both, the
                  key a CI cache stores it under), the calibration tokens, the probe, and the
                  task files of task saliency;
- `kept_indices`: the source indices each axis kept, per layer, and the dropped layers;
- `params`, `arch`: parameter counts before and after; the pruned sizes;
- `graph`:        the sealed program's op/shape list (hash, op counts, dynamic axes) and every
                  parameter's shape;
- `numeric`:      the program's logits on the probe (summary numbers and a slice) and next-token
                  loss on the probe and on the first calibration blocks;
- `not_emitted`:  (only with `emit=` leaving some out) the deployable files neither written nor
                  verified;
- `environment`:  torch/transformers/pdc versions -- recorded, never compared.

Structure is compared exactly, numbers within `atol + rtol * |expected|`.

Determinism: floats are rounded to `FLOAT_DIGITS` significant digits and the JSON is written with
sorted keys and fixed layout, so the same record always gives a byte-identical lock.
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
from pdc.errors import PdcError
from pdc.files import write_text
from pdc.plan.results import PruneResult, encode

LOCK_VERSION = 2
STAGE = "check"
LOCK_SUFFIX = ".lock.json"
FLOAT_DIGITS = 6
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-4
REQUIRED_KEYS = ("lock_version", "spec", "inputs", "kept_indices", "params", "arch", "graph", "numeric")


# ---- building ----------------------------------------------------------------------------
def build_lock(result: PruneResult, settings: str, not_emitted: Sequence[str] = ()) -> dict:
    """The lock of a prune stage from its typed result; `settings` is the canonical text of the
    stage's settings; `not_emitted` the deployable files the spec left out (`emit=`), which were
    therefore neither written nor verified. Invariant: equal results and settings give equal locks (and byte-equal
    `write_lock`); no path is recorded, so two build directories give the same lock."""
    fp = result.fingerprint
    lock = {
        "lock_version": LOCK_VERSION,
        "spec": {"sha256": hashlib.sha256(settings.encode()).hexdigest()},
        "inputs": encode(result.inputs),
        "kept_indices": result.kept,
        "params": {"before": result.params_before, "after": result.params_after},
        "arch": dict(result.arch_after),
        "graph": {"hash": fp.graph_sha256, "nodes": fp.nodes, "op_counts": fp.op_counts, "dynamic": fp.dynamic,
                  "param_shapes": fp.param_shapes},
        "numeric": {"logits": encode(fp.logits), "probe_loss": fp.probe_loss,
                    "calibration_loss": fp.calibration_loss, "calibration_blocks": fp.calibration_blocks},
        "environment": {"pdc": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
    }
    if result.reconstruct is not None:  # absent otherwise: locks without it stay byte for byte
        lock["reconstruct"] = result.reconstruct
    if result.search is not None:
        lock["search"] = search_lock(result.search)
    if not_emitted:  # absent otherwise, as above
        lock["not_emitted"] = {"files": sorted(not_emitted), "verified": False}
    return _rounded(lock)


def search_lock(search: dict) -> dict:
    """What a `prune search` chose and why: the space, every candidate's exact size and scores,
    both rankings. Latencies are left out: they are measured on the machine that ran it."""
    keys = ("sizes", "params", "memory", "cheap_loss", "cheap_rank", "distill_loss", "distill_rank", "dropped_layers")
    return {
        "limits": search["limits"], "axes": search["axes"], "keep": search["keep"], "slack": search["slack"],
        "top": search["top"], "steps": search["steps"], "space_size": search["space_size"],
        "candidates": [{k: c[k] for k in keys} for c in search["candidates"]],
        "chosen": search["chosen_sizes"], "chosen_cheap_rank": search["chosen_cheap_rank"],
        "reordered": search["reordered"],
    }


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


# ---- canonical text ----------------------------------------------------------------------
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
    if p[:3] == ["inputs", "model", "weights_sha256"] and len(p) == 4:
        return f"prune input weight file {p[3]} (sha256)"
    if p[:2] == ["inputs", "tasks"] and len(p) == 3:
        return f"task file {p[2]} (sha256)"
    names = {
        ("spec", "sha256"): "prune settings (sha256)",
        ("inputs", "model", "sha256"): "prune input (sha256)",
        ("inputs", "model", "config_sha256"): "prune input config (sha256)",
        ("inputs", "probe"): "probe ids",
        ("inputs", "calibration"): "calibration tokens",
        ("graph", "hash"): "graph structure (op/shape list hash)",
        ("graph", "op_counts"): "graph op counts",
    }
    for n in range(len(p), 0, -1):
        if tuple(p[:n]) in names:
            return " ".join([names[tuple(p[:n])]] + p[n:])
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
