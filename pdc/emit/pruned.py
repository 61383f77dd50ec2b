"""Every output of a prune stage, from the one rewritten program.

    program --emit_checkpoint--> model/ (config, safetensors, tokenizer)
            --kept-------------> kept_indices.json
            --seal-------------> ExportedProgram --> program.pt2, model.onnx, graph fingerprint
            --forward----------> numeric fingerprint (probe logits, calibration loss)

`seal` is the only `torch.export.export` call here (the source was traced once, by the stage,
before its passes ran); each file is checked against `program.forward` before it appears
(`pdc.emit.artifacts`). With `deploy=False` (what `pdc check` recompiles) only the checkpoint,
the kept indices and the fingerprint are produced.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from pdc.emit.artifacts import write_artifacts
from pdc.emit.checkpoint import emit_checkpoint
from pdc.emit.fingerprint import program_fingerprint
from pdc.emit.lean import check_staged, write_unchecked
from pdc.errors import PdcError
from pdc.files import write_json
from pdc.graph.export import seal
from pdc.graph.program import STAGE, Program
from pdc.graph.storage import release_weights, stored_below_fp32
from pdc.plan.counts import count_arch
from pdc.plan.results import ArtifactResult, ProgramFingerprint


@dataclass(frozen=True)
class Emitted:
    artifacts: dict[str, ArtifactResult]
    fingerprint: ProgramFingerprint
    seconds: dict[str, float]


def emit_pruned(program: Program, out_dir: Path, source_dir: Optional[Path], calibration: Optional[torch.Tensor],
                deploy: bool = True, pt2: bool = True, onnx: bool = True, progress: bool = False) -> Emitted:
    """Write `model/` and `kept_indices.json` into `out_dir` (the stage's staging directory),
    seal the program once, fingerprint it and (with `deploy`) write and verify `program.pt2` and
    (with `onnx`) `model.onnx`; with `deploy` but not `pt2`, only the checkpoint is verified (a student stored below fp32 is released after they are written and each file is
checked alone: `pdc.emit.lean`). `source_dir` provides the tokenizer files copied beside the weights.
    Precondition, checked before anything is written: the program has exactly the parameter
    count of the config it emits (built by transformers on the meta device)."""
    params, expected = program.num_params(), count_arch(program.hf_config, program.arch).total
    if params != expected:
        raise PdcError(f"pruned model has {params} parameters, its emitted config builds {expected}", STAGE)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {}
    start = time.perf_counter()
    emit_checkpoint(program, out_dir / "model", source_dir=source_dir)
    write_json(out_dir / "kept_indices.json", program.kept, indent=None)
    seconds["emit"] = time.perf_counter() - start
    start = time.perf_counter()
    ep = seal(program)
    seconds["seal"] = time.perf_counter() - start
    start = time.perf_counter()
    fingerprint = program_fingerprint(program, ep, calibration)
    seconds["fingerprint"] = time.perf_counter() - start
    artifacts = {}
    if deploy and stored_below_fp32(program):  # a large student: never two copies at once
        start = time.perf_counter()
        staged = write_unchecked(program, ep, out_dir, pt2=pt2, onnx=onnx, progress=progress)
        seconds["write_artifacts"] = time.perf_counter() - start
        del ep
        release_weights(program)
        gc.collect()
        start = time.perf_counter()
        artifacts = check_staged(staged, progress=progress)
        seconds["verify_artifacts"] = time.perf_counter() - start
    elif deploy:
        start = time.perf_counter()
        artifacts = write_artifacts(program, ep, out_dir, pt2=pt2, onnx=onnx, progress=progress)
        seconds["artifacts"] = time.perf_counter() - start
    return Emitted(artifacts=artifacts, fingerprint=fingerprint, seconds=seconds)
