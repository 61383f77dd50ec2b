"""Deployable files of a rewritten program, each checked against the program before it appears.

- `prune/model/` (the Hugging Face checkpoint, written by `pdc.emit.checkpoint`): loaded back with
  `from_pretrained` and compared with the program's logits (`verify_checkpoint`);
- `prune/program.pt2`: `torch.export.save` of the sealed program (`pdc.graph.export.seal`),
  loaded back and compared (`save_exported_program`);
- `prune/model.onnx`: the dynamo ONNX export of the same `ExportedProgram`, run by onnxruntime on
  the probe and on one more batch size and length (`export_onnx`).

Nothing here traces a model: every file comes from the one `ExportedProgram` that `seal` made of
the rewritten program, and every reference logit from `program.forward`.

Invariants:
- a file at the destination path is always complete and checked: it is written to a temporary
  sibling, verified, and only then renamed into place;
- `torch.export.load(path).module()(ids)` equals the program's logits to `PT2_ATOL` (exact in
  practice: the same kernels run);
- onnxruntime's logits match the program's within `atol + rtol * |logit|`, otherwise `PdcError`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from tqdm import tqdm

from pdc.emit.fingerprint import is_dynamic
from pdc.errors import PdcError
from pdc.files import temp_path_beside
from pdc.graph.program import STAGE, Program
from pdc.inputs.models import load_causal_lm
from pdc.plan.results import ArtifactResult

# Protobuf caps a single ONNX file at 2 GiB; above this the weights go to a side file.
ONNX_INLINE_LIMIT_BYTES = 1_800_000_000
ONNX_DATA_SUFFIX = ".data"
# The build's ONNX check: 1e-4 absolute, widened for large logits by fp32's own noise. Measured
# on SmolLM2-135M (|logits| up to 33): PyTorch fp32 vs fp64 differ by 8.0e-5, onnxruntime vs
# fp64 by 5.7e-5, onnxruntime vs PyTorch fp32 by 7.6e-5 -- 1e-4 alone sits at the noise floor.
ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-5
PT2_ATOL = 1e-5  # the reloaded program runs the same kernels: exact in practice
CHECKPOINT_ATOL = 1e-5  # Hugging Face's modules on the same weights: fp32 rounding only
NOISE_MAX_PARAMS = 2_000_000_000  # above this, no fp64 copy is made to measure fp32 noise


def program_logits(program: Program, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of the program on `ids`: the reference every file is checked against."""
    return program.forward(_check_ids(ids)).detach().float()


# ---- the Hugging Face checkpoint ---------------------------------------------------------
def verify_checkpoint(program: Program, model_dir: Path, ids: torch.Tensor, atol: float = CHECKPOINT_ATOL,
                      noise_inputs: Sequence[torch.Tensor] = ()) -> tuple[float, Optional[float]]:
    """Load the checkpoint `emit_checkpoint` wrote from `program` and compare logits on `ids`.
    Returns (max abs diff, fp32 noise): the noise is max |fp32 - fp64 logits| of the same
    checkpoint over `ids` and `noise_inputs` (the floor any other fp32 runtime can reach on the
    inputs it is checked on; None above `NOISE_MAX_PARAMS`). `PdcError` when the checkpoint does
    not reproduce the program."""
    ids = _check_ids(ids)
    model = load_causal_lm(model_dir, STAGE)
    with torch.no_grad():
        got = model(input_ids=ids, use_cache=False).logits.float()
    diff = _max_abs_diff(got, program_logits(program, ids))
    if not diff <= atol:
        raise PdcError(f"{Path(model_dir).name}/: the checkpoint's logits differ from the rewritten program's "
                       f"by {diff:.3g} > {atol:g}", STAGE)
    noise = None
    if sum(p.numel() for p in model.parameters()) <= NOISE_MAX_PARAMS:
        inputs = [ids] + [_check_ids(x) for x in noise_inputs if x is not ids]
        with torch.no_grad():
            fp32 = [got] + [model(input_ids=x, use_cache=False).logits.float() for x in inputs[1:]]
        model.double()  # in place: the fp32 copy is released
        if getattr(model.config, "_experts_implementation", None) is not None:
            model.config._experts_implementation = "eager"  # grouped_mm kernels take no fp64
        with torch.no_grad():
            noise = max(float((model(input_ids=x, use_cache=False).logits - y.double()).abs().max())
                        for x, y in zip(inputs, fp32))
    del model
    return diff, noise


# ---- program.pt2 -------------------------------------------------------------------------
def save_exported_program(ep: "torch.export.ExportedProgram", program: Program, path: Union[str, Path],
                          atol: float = PT2_ATOL) -> float:
    """`torch.export.save` the sealed `ep` to `path`, load it back and check that the loaded
    program reproduces `program`'s logits on the probe within `atol`. Returns the max abs diff.
    Nothing is left at `path` if any step fails."""
    path = Path(path)
    probe = _check_ids(program.probe)
    reference = program_logits(program, probe)
    tmp = temp_path_beside(path)  # torch.export.save/load insist on the ".pt2" suffix
    try:
        try:
            torch.export.save(ep, str(tmp))
            loaded = torch.export.load(str(tmp))
        except Exception as exc:
            raise PdcError(f"torch.export.save/load of {path.name} failed: {_first_line(exc)}", STAGE) from exc
        with torch.no_grad():
            diff = _max_abs_diff(loaded.module()(probe).float(), reference)
        if not diff <= atol:
            raise PdcError(f"{path.name}: reloaded program's logits differ from the program's by {diff:.3g} > {atol:g}",
                           STAGE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


# ---- model.onnx --------------------------------------------------------------------------
def export_onnx(ep: "torch.export.ExportedProgram", program: Program, path: Union[str, Path],
                external_data: Optional[bool] = None, atol: float = ONNX_ATOL, rtol: float = 0.0) -> float:
    """Convert the sealed `ep` to ONNX at `path` with the dynamo exporter (input `input_ids` int64
    [batch, seq], output `logits` float32 [batch, seq, vocab], both axes dynamic when `ep`'s are).

    `external_data`: None chooses by size (weights over ~1.8 GB go to `<path>.data`, the protobuf
    limit being 2 GiB); True/False forces it. Before the file is moved into place, onnxruntime
    must reproduce the program's logits within `atol + rtol * |logit|` on the probe and, for a
    dynamic export, on one more batch size and length. Returns the max abs diff."""
    path = Path(path)
    probe = _check_ids(program.probe)
    if external_data is None:
        external_data = _param_bytes(ep) > ONNX_INLINE_LIMIT_BYTES
    with _temp_dir_beside(path) as tmp_dir:
        tmp_path = tmp_dir / path.name
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnx_program = torch.onnx.export(
                    ep, (probe,), dynamo=True, input_names=["input_ids"],
                    output_names=["logits"], optimize=True, verbose=False,
                )
                onnx_program.save(str(tmp_path), external_data=external_data)
        except Exception as exc:
            raise PdcError(f"ONNX export failed: {type(exc).__name__}: {_first_line(exc)}", STAGE) from exc
        diffs = [check_onnx(tmp_path, program, ids, atol=atol, rtol=rtol)
                 for ids in check_inputs(probe, dynamic=is_dynamic(ep))]
        # The .onnx file names its data file relatively, so both move together; a data file
        # left from an earlier external-data export would be stale.
        stale = path.with_name(path.name + ONNX_DATA_SUFFIX)
        if not (tmp_dir / stale.name).exists():
            stale.unlink(missing_ok=True)
        for item in sorted(tmp_dir.iterdir()):
            if item.name != path.name:
                os.replace(item, path.parent / item.name)
        os.replace(tmp_path, path)
    return max(diffs)


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


def check_onnx(path: Union[str, Path], program: Program, ids: torch.Tensor, atol: float = ONNX_ATOL,
               rtol: float = 0.0) -> float:
    """Max |onnxruntime logits - program logits| on `ids`; `PdcError` unless every element is
    within `atol + rtol * |program logit|`."""
    ids = _check_ids(ids)
    got = onnx_logits(path, ids)
    expected = program_logits(program, ids)
    if got.shape != expected.shape:
        raise PdcError(f"{Path(path).name}: ONNX logits shape {list(got.shape)} != the program's "
                       f"{list(expected.shape)}", STAGE)
    diff = _max_abs_diff(got, expected)
    if not bool(((got - expected).abs() <= atol + rtol * expected.abs()).all()):
        tol = f"{atol:g}" + (f" + {rtol:g}*|logit|" if rtol else "")
        raise PdcError(f"{Path(path).name}: ONNX logits differ from the program's by {diff:.3g} > {tol}", STAGE)
    return diff


def check_inputs(probe: torch.Tensor, dynamic: bool) -> list[torch.Tensor]:
    """The probe, plus (for a dynamic export) one more batch size and length, so a file whose
    axes were silently fixed at the probe's shape fails its check."""
    if not dynamic:
        return [probe]
    other = torch.cat([probe, probe[:1]], dim=0)[:, : max(2, probe.shape[1] - 3)]
    return [probe, other]


# ---- all of them -------------------------------------------------------------------------
def write_artifacts(program: Program, ep: "torch.export.ExportedProgram", out_dir: Path, onnx: bool = True,
                    progress: bool = False, pt2: bool = True) -> dict[str, ArtifactResult]:
    """Verify `out_dir/model` (already emitted from `program`) and write `program.pt2` and
    `model.onnx` from `ep`, each checked against `program`. Returns one `ArtifactResult` per
    file; `PdcError` when one cannot be produced or verified."""
    out_dir = Path(out_dir)
    steps = ["model"] + (["program.pt2"] if pt2 else []) + (["model.onnx"] if onnx else [])
    bar = tqdm(total=len(steps), desc="artifacts", disable=not progress, unit="file")
    out: dict[str, ArtifactResult] = {}

    start = time.perf_counter()
    # The fp32 noise is measured on every input the ONNX check runs: a dynamic export is also
    # checked at another batch size and length, whose logits can be noisier than the probe's.
    onnx_inputs = check_inputs(_check_ids(program.probe), dynamic=is_dynamic(ep)) if onnx else []
    diff, noise = verify_checkpoint(program, out_dir / "model", program.probe, noise_inputs=onnx_inputs)
    out["model"] = ArtifactResult(path="model", bytes=_size(out_dir / "model"),
                                  seconds=round(time.perf_counter() - start, 2), max_abs_diff=diff,
                                  tolerance=CHECKPOINT_ATOL)
    bar.update(1)

    if pt2:
        start = time.perf_counter()
        path = out_dir / "program.pt2"
        diff = save_exported_program(ep, program, path)
        out[path.name] = ArtifactResult(path=path.name, bytes=path.stat().st_size,
                                        seconds=round(time.perf_counter() - start, 2), max_abs_diff=diff,
                                        tolerance=PT2_ATOL)
        bar.update(1)

    if onnx:
        start = time.perf_counter()
        # ONNX may be off the exact (fp64) logits by twice PyTorch fp32's own error, so off the
        # fp32 program by three times it; 1e-4 when that is smaller. A freshly pruned model is
        # badly conditioned (SmolLM2 at hidden=432: 2.0e-3 fp32-vs-fp64 on the probe, 8e-5
        # before pruning); the corrected quickstart student at mlp=1152 measured program 4.9e-5
        # and onnxruntime 8.5e-5 off fp64, 1.09e-4 off each other.
        atol = ONNX_ATOL if noise is None else max(ONNX_ATOL, 3 * noise)
        path = out_dir / "model.onnx"
        diff = export_onnx(ep, program, path, atol=atol, rtol=ONNX_RTOL)
        out[path.name] = ArtifactResult(path=path.name, bytes=_size(path) + _size(path.with_name(path.name + ONNX_DATA_SUFFIX)),
                                        seconds=round(time.perf_counter() - start, 2), max_abs_diff=diff, tolerance=atol)
        bar.update(1)
    bar.close()
    return out


# ---- helpers -----------------------------------------------------------------------------
def _check_ids(ids) -> torch.Tensor:
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


def _param_bytes(ep: "torch.export.ExportedProgram") -> int:
    seen, total = set(), 0
    for tensor in list(ep.state_dict.values()) + list(ep.constants.values()):
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


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
