"""Deployable outputs of the prune stage: the exported program (`prune/program.pt2`) and ONNX
(`prune/model.onnx`), each written only after it has been loaded back and shown to reproduce the
PyTorch logits.

What can be handed in (`model_or_ep` below):
- a Hugging Face causal LM (e.g. loaded from `prune/model/`): wrapped so the graph maps
  `input_ids -> logits` (no cache, no attention mask);
- a `torch.export.ExportedProgram` (e.g. the width pass's re-export), used as it is;
- the width pass's `pdc.graph.manager.Program` (anything with `.gm` and `.export()`);
- any other `nn.Module` whose forward maps `input_ids -> logits`.

Batch and sequence are dynamic dimensions wherever the model allows it (sequence >= 2: torch.export
specialises sizes 0 and 1), so one file serves every prompt shape.

Invariants:
- a file at the destination path is always complete and checked: it is written to a temporary
  sibling, verified, and only then renamed into place;
- `torch.export.load(path).module()(ids)` equals the reference logits to `atol` (exact in
  practice: the same kernels run);
- onnxruntime's logits on `ids` match PyTorch's to `atol` (default 1e-4; the build's check adds
  `ONNX_RTOL * |logit|` for fp32 noise on large logits), otherwise `PdcError`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from tqdm import tqdm

from pdc.errors import PdcError
from pdc.files import temp_path_beside
from pdc.graph.export import LogitsOnly, dynamic_shapes, seal
from pdc.graph.probe import default_probe
from pdc.graph.program import Program
from pdc.inputs.models import load_causal_lm
from pdc.plan.results import ArtifactResult

STAGE = "prune"

# Protobuf caps a single ONNX file at 2 GiB; above this the weights go to a side file.
ONNX_INLINE_LIMIT_BYTES = 1_800_000_000
ONNX_DATA_SUFFIX = ".data"
# The build's ONNX check: 1e-4 absolute, widened for large logits by fp32's own noise. Measured
# on SmolLM2-135M (|logits| up to 33): PyTorch fp32 vs fp64 differ by 8.0e-5, onnxruntime vs
# fp64 by 5.7e-5, onnxruntime vs PyTorch fp32 by 7.6e-5 -- 1e-4 alone sits at the noise floor.
ONNX_ATOL = 1e-4
PT2_ATOL = 1e-5  # the reloaded program runs the same kernels: exact in practice
ONNX_RTOL = 1e-5


def _is_hf_causal_lm(module: Any) -> bool:
    return isinstance(module, torch.nn.Module) and hasattr(module, "config") and hasattr(
        module, "get_input_embeddings"
    )


def as_logits_module(model_or_ep: Any) -> torch.nn.Module:
    """A module whose call maps `input_ids -> logits`, in eval mode."""
    if isinstance(model_or_ep, torch.export.ExportedProgram):
        return model_or_ep.module()
    if isinstance(model_or_ep, Program):
        return model_or_ep.gm
    if _is_hf_causal_lm(model_or_ep):
        return LogitsOnly(model_or_ep).eval()
    if isinstance(model_or_ep, torch.nn.Module):
        return model_or_ep.eval()
    raise PdcError(f"cannot export a {type(model_or_ep).__name__}: expected a model or an ExportedProgram", STAGE)


def reference_logits(model_or_ep: Any, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of `model_or_ep` on `ids` (no grad)."""
    module = as_logits_module(model_or_ep)
    with torch.no_grad():
        out = module(ids)
    if hasattr(out, "logits"):
        out = out.logits
    return out.detach().float()


def export_program(model_or_ep: Any, probe_ids: torch.Tensor, dynamic: bool = True) -> torch.export.ExportedProgram:
    """`torch.export` of `model_or_ep` traced on `probe_ids` (an ExportedProgram passes through).

    If the dynamic-shape export fails (a model that guards on its length), falls back to the
    probe's static shape; `is_dynamic(ep)` tells which one was used."""
    if isinstance(model_or_ep, torch.export.ExportedProgram):
        return model_or_ep
    if isinstance(model_or_ep, Program):
        return seal(model_or_ep)
    module = as_logits_module(model_or_ep)
    probe_ids = _check_ids(probe_ids)
    if dynamic and probe_ids.shape[0] == 1:
        # torch.export specialises an example size of 1 to a constant; trace on two rows.
        probe_ids = probe_ids.repeat(2, 1)
    attempts = [True, False] if dynamic else [False]
    last_exc: Optional[BaseException] = None
    for use_dynamic in attempts:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ep = torch.export.export(
                    module, (probe_ids,), strict=False,
                    dynamic_shapes=dynamic_shapes() if use_dynamic else None,
                )
            return ep
        except Exception as exc:  # torch.export raises many types; retried static, then reported
            last_exc = exc
    raise PdcError(f"torch.export failed: {type(last_exc).__name__}: {_first_line(last_exc)}", STAGE) from last_exc


def save_exported_program(model_or_ep: Any, probe_ids: torch.Tensor, path: Union[str, Path],
                          atol: float = 1e-5) -> Path:
    """Export (unless given an ExportedProgram), `torch.export.save` to `path`, load it back and
    check that the loaded program's logits on `probe_ids` match the reference within `atol`.

    Returns `path`. Nothing is left at `path` if any step fails."""
    path = Path(path)
    probe_ids = _check_ids(probe_ids)
    reference = reference_logits(model_or_ep, probe_ids)
    ep = export_program(model_or_ep, probe_ids)
    tmp = temp_path_beside(path)  # torch.export.save/load insist on the ".pt2" suffix
    try:
        try:
            torch.export.save(ep, str(tmp))
            loaded = torch.export.load(str(tmp))
        except Exception as exc:
            raise PdcError(f"torch.export.save/load of {path.name} failed: {_first_line(exc)}", STAGE) from exc
        diff = _max_abs_diff(reference_logits(loaded, probe_ids), reference)
        if not diff <= atol:
            raise PdcError(
                f"{path.name}: reloaded program's logits differ from the model's by {diff:.3g} > {atol:g}", STAGE
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_exported_program(path: Union[str, Path]) -> torch.export.ExportedProgram:
    path = Path(path)
    if not path.exists():
        raise PdcError(f"exported program not found: {path}", STAGE)
    try:
        return torch.export.load(str(path))
    except Exception as exc:
        raise PdcError(f"cannot load exported program {path}: {_first_line(exc)}", STAGE) from exc


def export_onnx(model: Any, probe_ids: torch.Tensor, path: Union[str, Path],
                external_data: Optional[bool] = None, check: bool = True, atol: float = 1e-4,
                rtol: float = 0.0) -> Path:
    """Export `model` to ONNX at `path` with the dynamo exporter (input `input_ids` int64
    [batch, seq], output `logits` float32 [batch, seq, vocab], both axes dynamic when export
    allows). The TorchScript exporter cannot handle transformers 5.x Llama (`aten::diff`).

    `external_data`: None chooses by size (weights over ~1.8 GB go to `<path>.data`, the
    protobuf limit being 2 GiB); True/False forces it. With `check`, onnxruntime must reproduce
    the model's logits within `atol + rtol * |logit|` before the file is moved into place: on
    `probe_ids` and,
    for a dynamic export, on one more batch size and length.
    Returns `path`."""
    path = Path(path)
    probe_ids = _check_ids(probe_ids)
    ep = export_program(model, probe_ids)
    if external_data is None:
        external_data = _param_bytes(ep) > ONNX_INLINE_LIMIT_BYTES
    with _temp_dir_beside(path) as tmp_dir:
        tmp_path = tmp_dir / path.name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.onnx.export(
                    ep, (probe_ids,), dynamo=True, input_names=["input_ids"],
                    output_names=["logits"], optimize=True, verbose=False,
                )
                program.save(str(tmp_path), external_data=external_data)
        except Exception as exc:
            raise PdcError(f"ONNX export failed: {type(exc).__name__}: {_first_line(exc)}", STAGE) from exc
        if check:
            for ids in _check_inputs(probe_ids, dynamic=is_dynamic(ep)):
                check_onnx(tmp_path, model, ids, atol=atol, rtol=rtol)
        # The .onnx file names its data file relatively, so both move together; a data file
        # left from an earlier external-data export would be stale.
        stale = path.with_name(path.name + ONNX_DATA_SUFFIX)
        if not (tmp_dir / stale.name).exists():
            stale.unlink(missing_ok=True)
        for item in sorted(tmp_dir.iterdir()):
            if item.name != path.name:
                os.replace(item, path.parent / item.name)
        os.replace(tmp_path, path)
    return path


def onnx_session(path: Union[str, Path], threads: int = 1):
    import onnxruntime as ort

    path = Path(path)
    if not path.exists():
        raise PdcError(f"ONNX file not found: {path}", STAGE)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise PdcError(f"onnxruntime cannot load {path.name}: {_first_line(exc)}", STAGE) from exc


def onnx_logits(path: Union[str, Path], ids: torch.Tensor, threads: int = 1) -> torch.Tensor:
    session = onnx_session(path, threads)
    ids = _check_ids(ids)
    try:
        (logits,) = session.run(["logits"], {"input_ids": ids.numpy()})
    except Exception as exc:
        raise PdcError(
            f"{Path(path).name} rejects input_ids of shape {list(ids.shape)}: {_first_line(exc)}", STAGE
        ) from exc
    return torch.from_numpy(logits).float()


def check_onnx(path: Union[str, Path], model: Any, ids: torch.Tensor, atol: float = 1e-4,
               rtol: float = 0.0) -> float:
    """Max |onnxruntime logits - PyTorch logits| on `ids`; `PdcError` unless every element is
    within `atol + rtol * |PyTorch logit|`."""
    ids = _check_ids(ids)
    got = onnx_logits(path, ids)
    expected = reference_logits(model, ids)
    if got.shape != expected.shape:
        raise PdcError(
            f"{Path(path).name}: ONNX logits shape {list(got.shape)} != PyTorch {list(expected.shape)}", STAGE
        )
    diff = _max_abs_diff(got, expected)
    within = bool(((got - expected).abs() <= atol + rtol * expected.abs()).all())
    if not within:
        tol = f"{atol:g}" + (f" + {rtol:g}*|logit|" if rtol else "")
        raise PdcError(f"{Path(path).name}: ONNX logits differ from PyTorch by {diff:.3g} > {tol}", STAGE)
    return diff


# ---- structural fingerprint --------------------------------------------------------------
def graph_fingerprint(ep: torch.export.ExportedProgram) -> dict:
    """Operators and output shapes of `ep`'s graph, canonically.

    Each `call_function` node becomes `"<op>:<dtype>[d0,d1,...]"` in graph order; symbolic sizes
    are renamed `b0, b1, ...` by first appearance (torch's own symbol names depend on tracing
    history), and assertion/metadata nodes that have no output are skipped. Returns
    `{"hash": sha256 of the list, "nodes": len, "op_counts": {op: n}, "dynamic": bool}`.
    Invariant: two programs have the same hash iff they have the same op sequence and shapes."""
    symbols: dict[str, str] = {}
    entries: list[str] = []
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue  # _assert_* and other side-effect nodes carry no output tensor
        dims = []
        for d in val.shape:
            if isinstance(d, int):
                dims.append(str(d))
            else:
                key = str(d)
                dims.append(symbols.setdefault(key, f"b{len(symbols)}"))
        dtype = str(val.dtype).replace("torch.", "")
        entries.append(f"{_op_name(node.target)}:{dtype}[{','.join(dims)}]")
    counts: dict[str, int] = {}
    for entry in entries:
        op = entry.split(":", 1)[0]
        counts[op] = counts.get(op, 0) + 1
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()
    return {
        "hash": digest,
        "nodes": len(entries),
        "op_counts": dict(sorted(counts.items())),
        "dynamic": is_dynamic(ep),
    }


def _op_name(target: Any) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)  # "aten.linear.default"
    return getattr(target, "__name__", str(target))


def is_dynamic(ep: torch.export.ExportedProgram) -> bool:
    """Whether any user input of `ep` has a symbolic (dynamic) size."""
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and any(not isinstance(d, int) for d in val.shape):
                return True
    return False


def _check_inputs(probe_ids: torch.Tensor, dynamic: bool) -> list[torch.Tensor]:
    """The probe, plus (for a dynamic export) one more batch size and length, so a file whose
    axes were silently fixed at the probe's shape fails its check."""
    if not dynamic:
        return [probe_ids]
    other = torch.cat([probe_ids, probe_ids[:1]], dim=0)[:, : max(2, probe_ids.shape[1] - 3)]
    return [probe_ids, other]


# ---- helpers -----------------------------------------------------------------------------
def _check_ids(ids: Any) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        shape = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise PdcError(f"probe ids must be an integer tensor [batch, seq], got {shape}", STAGE)
    if ids.shape[1] < 2:
        raise PdcError("probe ids need at least 2 tokens per row (torch.export specialises length 1)", STAGE)
    return ids.long()


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _param_bytes(ep: torch.export.ExportedProgram) -> int:
    seen, total = set(), 0
    for tensor in list(ep.state_dict.values()) + list(ep.constants.values()):
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


class _temp_dir_beside:
    """A temporary directory next to `path`, removed on exit with whatever is left in it."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", dir=self.path.parent))
        return self.tmp

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---- the prune stage's artifacts ---------------------------------------------------------
def fp32_noise(model, ids: torch.Tensor, max_params: int = 2_000_000_000) -> Optional[float]:
    """Max |fp32 logits - fp64 logits| on `ids`: the floor any other fp32 runtime can reach.
    None for models too large to copy in fp64 here."""
    import copy

    if sum(p.numel() for p in model.parameters()) > max_params:
        return None
    with torch.no_grad():
        ref32 = reference_logits(model, ids).double()
        m64 = copy.deepcopy(model).double()
        ref64 = reference_logits(m64, ids)
    del m64
    return float((ref32 - ref64).abs().max())


def emit_all(prune_dir: Union[str, Path], probe_ids: Optional[torch.Tensor] = None, onnx: bool = True,
             progress: bool = False) -> dict[str, ArtifactResult]:
    """Write `program.pt2` and `model.onnx` for the checkpoint in `prune_dir/model`, each
    verified against the PyTorch logits on the probe (and, for ONNX, on a second batch/length to
    exercise the dynamic axes). Returns one `ArtifactResult` per file. Raises `PdcError` when an
    artifact cannot be produced or verified."""
    prune_dir = Path(prune_dir)
    model_dir = prune_dir / "model"
    steps = ["load", "program.pt2"] + (["model.onnx"] if onnx else [])
    bar = tqdm(total=len(steps), desc="artifacts", disable=not progress, unit="step")
    model = load_causal_lm(model_dir, STAGE, attn_implementation="sdpa")
    if probe_ids is None:
        probe_ids = default_probe(model.config.vocab_size, model_dir)
    probe_ids = _check_ids(probe_ids)
    bar.update(1)
    out: dict[str, ArtifactResult] = {}

    bar.set_postfix_str("torch.export")
    start = time.perf_counter()
    ep = export_program(model, probe_ids)
    reference = reference_logits(model, probe_ids)
    pt2 = save_exported_program(ep, probe_ids, prune_dir / "program.pt2", atol=PT2_ATOL)
    diff = _max_abs_diff(reference_logits(load_exported_program(pt2), probe_ids), reference)
    out["program.pt2"] = ArtifactResult(path=pt2.name, bytes=pt2.stat().st_size,
                                        seconds=round(time.perf_counter() - start, 2),
                                        max_abs_diff=diff, tolerance=PT2_ATOL)
    bar.update(1)

    if onnx:
        bar.set_postfix_str("onnx")
        start = time.perf_counter()
        noise = fp32_noise(model, probe_ids)
        # ONNX must agree with PyTorch to 1e-4, or within twice PyTorch fp32's own error against
        # fp64 when that is larger (a freshly pruned model is badly conditioned: SmolLM2 at
        # hidden=432 measured 2.0e-3 fp32-vs-fp64 on the probe, against 8e-5 before pruning).
        atol = ONNX_ATOL if noise is None else max(ONNX_ATOL, 2 * noise)
        tol = dict(atol=atol, rtol=ONNX_RTOL)
        path = export_onnx(ep, probe_ids, prune_dir / "model.onnx", **tol)
        export_seconds = time.perf_counter() - start
        diffs = [check_onnx(path, model, ids, **tol) for ids in _check_inputs(probe_ids, is_dynamic(ep))]
        data = path.with_name(path.name + ONNX_DATA_SUFFIX)
        out["model.onnx"] = ArtifactResult(
            path=path.name, bytes=path.stat().st_size + (data.stat().st_size if data.exists() else 0),
            seconds=round(export_seconds, 2), max_abs_diff=max(diffs), tolerance=atol)
        bar.update(1)
    bar.close()
    return out
