"""The deployable files of a program too large to hold twice: write all, then check each alone.

`pdc.emit.artifacts` checks each file while the program still holds its weights: two copies of
the model at once. A student stored below fp32 (`pdc.graph.storage`, a large source) takes this
path instead:

    references = program logits on every check input          (the program's last forward)
    program.pt2 written from the sealed program                (into a temporary directory)
    the program's weights are released                         (by the caller: `emit_pruned`)
    model/ loaded, checked, dropped
    program.pt2 loaded in a child process: its logits, and     (`pdc.emit.pt2_child`: the ONNX
      model.onnx exported from it; the process exits            exporter keeps its last graph)
    model.onnx run by onnxruntime, checked, dropped
    the files move into place

The checks and tolerances are those of `pdc.emit.artifacts`, against the same references. The
checkpoint is loaded in its stored precision and run in fp32 (each weight widened on read, as
the program does); onnxruntime maps the external data file, runs without graph optimisations
(which would fold every widened weight into an fp32 copy) and in priority order. No fp64 noise
measurement: it needs a second copy.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pdc.emit.artifacts import (
    CHECKPOINT_ATOL, ONNX_ATOL, ONNX_DATA_SUFFIX, ONNX_RTOL, PT2_ATOL, _check_ids, _first_line, _max_abs_diff,
    _size, _temp_dir_beside, check_inputs,
)
from pdc.emit.checkpoint import source_dtype
from pdc.emit.pt2_child import EXCHANGE
from pdc.emit.fingerprint import is_dynamic
from pdc.errors import PdcError
from pdc.graph.program import STAGE, Program
from pdc.inputs.models import load_causal_lm
from pdc.plan.results import ArtifactResult


@dataclass
class Staged:
    """Files written but not yet checked, and the logits they must reproduce."""
    out_dir: Path
    tmp: "_temp_dir_beside"
    tmp_dir: Path
    inputs: list[torch.Tensor]  # the probe first, then (dynamic) one more shape
    references: list[torch.Tensor]
    dtype: torch.dtype
    seconds: dict
    pt2: bool  # program.pt2 was written and is checked
    onnx: bool  # model.onnx is exported (from program.pt2) and checked


def write_unchecked(program: Program, ep: "torch.export.ExportedProgram", out_dir: Path, onnx: bool = True,
                    progress: bool = False, pt2: bool = True) -> Staged:
    """Reference logits, then program.pt2 into a temporary directory beside
    `out_dir/model.onnx`; nothing is checked yet (model.onnx is exported from program.pt2 when
    it is checked: `check_staged`)."""
    out_dir = Path(out_dir)
    onnx = onnx and pt2  # exported from program.pt2
    inputs = check_inputs(_check_ids(program.probe), dynamic=onnx and is_dynamic(ep))
    references = [program.forward(ids).detach().float() for ids in inputs]
    tmp = _temp_dir_beside(out_dir / "model.onnx")
    tmp_dir = tmp.__enter__()
    seconds = {}
    try:
        start = time.perf_counter()
        if pt2:
            torch.export.save(ep, str(tmp_dir / "program.pt2"))
        seconds["program.pt2"] = time.perf_counter() - start
    except Exception as exc:
        tmp.__exit__(None, None, None)
        raise PdcError(f"writing program.pt2 failed: {type(exc).__name__}: {_first_line(exc)}", STAGE) from exc
    return Staged(out_dir, tmp, tmp_dir, inputs, references, source_dtype(program.hf_config), seconds, pt2, onnx)


def check_staged(staged: Staged, progress: bool = False) -> dict[str, ArtifactResult]:
    """Check model/, then program.pt2 (loaded in a child process that also exports model.onnx
    from it), then model.onnx, one at a time against the references (the program's weights are
    released by now); then move the files into place."""
    out: dict[str, ArtifactResult] = {}
    onnx = staged.tmp_dir / "model.onnx"
    bar = tqdm(total=1 + staged.pt2 + staged.onnx, desc="check artifacts", disable=not progress, unit="file")
    try:
        start = time.perf_counter()
        diff = _check(_checkpoint_logits(staged.out_dir / "model", staged.dtype, staged.inputs[:1]),
                      staged.references[:1], CHECKPOINT_ATOL, 0.0, "model/: the checkpoint")
        out["model"] = ArtifactResult(path="model", bytes=_size(staged.out_dir / "model"),
                                      seconds=round(time.perf_counter() - start, 2), max_abs_diff=diff,
                                      tolerance=CHECKPOINT_ATOL)
        bar.update(1)
        gc.collect()  # each loaded copy is gone before the next is read
        if staged.pt2:
            logits, seconds = _in_child(staged)
            pt2 = staged.tmp_dir / "program.pt2"
            diff = _check([logits], staged.references[:1], PT2_ATOL, 0.0, "program.pt2")
            out[pt2.name] = ArtifactResult(path=pt2.name, bytes=pt2.stat().st_size,
                                           seconds=round(seconds["program.pt2"] + staged.seconds["program.pt2"], 2),
                                           max_abs_diff=diff, tolerance=PT2_ATOL)
            bar.update(1)
            shutil.rmtree(staged.tmp_dir / EXCHANGE)
        if staged.onnx:
            start = time.perf_counter()
            diff = _check(_onnx_logits(onnx, staged.inputs), staged.references, ONNX_ATOL, ONNX_RTOL, "model.onnx")
            out[onnx.name] = ArtifactResult(
                path=onnx.name, bytes=_size(onnx) + _size(onnx.with_name(onnx.name + ONNX_DATA_SUFFIX)),
                seconds=round(time.perf_counter() - start + seconds["model.onnx"], 2), max_abs_diff=diff,
                tolerance=ONNX_ATOL)
            bar.update(1)
        stale = staged.out_dir / ("model.onnx" + ONNX_DATA_SUFFIX)
        if not (staged.tmp_dir / stale.name).exists():
            stale.unlink(missing_ok=True)
        for item in sorted(staged.tmp_dir.iterdir(), key=lambda p: p.name == "model.onnx"):
            os.replace(item, staged.out_dir / item.name)  # the .onnx last: it names its data file
    finally:
        bar.close()
        staged.tmp.__exit__(None, None, None)
    return out


def _in_child(staged: Staged) -> tuple[torch.Tensor, dict]:
    """program.pt2's logits on the first check input, and model.onnx exported from it, by
    `pdc.emit.pt2_child` in a process of its own; (logits, seconds per file)."""
    exchange = staged.tmp_dir / EXCHANGE
    exchange.mkdir()
    torch.save(staged.inputs, exchange / "inputs.pt")
    done = subprocess.run([sys.executable, "-m", "pdc.emit.pt2_child", str(staged.tmp_dir)]
                          + (["--onnx"] if staged.onnx else []), capture_output=True, text=True)
    if done.returncode:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        raise PdcError(f"loading program.pt2{' and exporting model.onnx' if staged.onnx else ''} failed: {lines[-1]}",
                       STAGE)
    return (torch.load(exchange / "logits.pt", weights_only=True),
            json.loads((exchange / "seconds.json").read_text()))


def _check(got: list[torch.Tensor], expected: list[torch.Tensor], atol: float, rtol: float, what: str) -> float:
    diffs = []
    for g, e in zip(got, expected):
        diff = _max_abs_diff(g, e)
        if g.shape != e.shape or not bool(((g - e).abs() <= atol + rtol * e.abs()).all()):
            tol = f"{atol:g}" + (f" + {rtol:g}*|logit|" if rtol else "")
            raise PdcError(f"{what}'s logits differ from the rewritten program's by {diff:.3g} > {tol}", STAGE)
        diffs.append(diff)
    return max(diffs)


class _Fp32(torch.nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float()


@torch.no_grad()
def _checkpoint_logits(model_dir: Path, dtype: torch.dtype, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The checkpoint loaded as stored, each weight widened to fp32 when read (as the program)."""
    from torch.nn.utils import parametrize

    model = load_causal_lm(model_dir, STAGE, dtype=dtype)
    for module in list(model.modules()):
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_floating_point() and param.element_size() < 4:
                parametrize.register_parametrization(module, name, _Fp32(), unsafe=True)
    return [model(input_ids=ids, use_cache=False).logits.float() for ids in inputs]


def _onnx_logits(path: Path, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fp32 copies
    options.add_session_config_entry("session.disable_prepacking", "1")
    # the default order runs every weight's Cast first (they depend on nothing): all of them
    # widened at once; priority order runs each right before its consumer
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [torch.from_numpy(session.run(["logits"], {"input_ids": ids.numpy()})[0]).float() for ids in inputs]
    except Exception as exc:
        raise PdcError(f"onnxruntime cannot run {path.name}: {_first_line(exc)}", STAGE) from exc
