"""The models a speed measurement reads: the teacher (with its ONNX export), a pruned student
(with the `model.onnx` its prune stage emitted), and the precision the spec asks for; and the
measurement `evaluate { speed=true }` makes inside `pdc run` (the teacher column against the
pruned student, else the distilled one: a distilled student has its pruned model's architecture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from pdc.emit.fingerprint import model_identity
from pdc.inputs.cache import cache_root
from pdc.lang.checked import CheckedSpec, EvaluateStage
from pdc.lang.settings import EvalConfig
from pdc.plan.results import SpeedResult
from pdc.stages.evaluate import eval_dtype
from pdc.stages.speed import SpeedModel, SpeedSettings, measure_speed, teacher_onnx

TEACHER = "teacher"


def spec_precision(spec: CheckedSpec, device: str) -> str:
    """The precision the spec's evaluation runs in on `device` (fp32 on a CPU unless it says bf16
    and the CPU has bf16 units; bf16 on a GPU that has it)."""
    evaluate = next((s for s in spec.stages if isinstance(s, EvaluateStage)), None)
    cfg = evaluate.eval if evaluate else EvalConfig()
    return "bf16" if eval_dtype(cfg, torch.device(device)) == torch.bfloat16 else "fp32"


def teacher_model(model_dir: Path, onnx: bool) -> SpeedModel:
    """The teacher, with (for `onnx`) its ONNX export, made once per checkpoint content in the pdc
    cache (`<cache>/onnx/<sha256>.onnx`: every build and variant of one teacher shares it)."""
    if not onnx:
        return SpeedModel(model_dir)
    key = model_identity(model_dir).sha256[:24]
    return SpeedModel(model_dir, teacher_onnx(model_dir, cache_root() / "onnx" / f"{key}.onnx"))


def student_model(stage_dir: Path) -> SpeedModel:
    onnx = stage_dir / "model.onnx"
    return SpeedModel(stage_dir / "model", onnx if onnx.exists() else None)


def evaluation_speed(spec: CheckedSpec, cfg: EvalConfig, teacher: Path, student: str, student_dir: Path,
                     stage_dir: Optional[Path], progress: bool = True) -> Optional[SpeedResult]:
    """`evaluate { speed=true }`: the teacher column (the source `teacher`) against the column
    `student` (its checkpoint `student_dir`; `stage_dir` the prune stage that wrote it, whose
    `model.onnx` onnxruntime runs, None for a distilled model)."""
    if not cfg.speed:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = student_model(stage_dir) if stage_dir is not None else SpeedModel(student_dir)
    onnx = device == "cpu" and model.onnx is not None
    models = {TEACHER: teacher_model(teacher, onnx), student: model}
    settings = SpeedSettings(device=device, precision=spec_precision(spec, device),
                             backends=("torch", "onnx") if onnx else ("torch",))
    return measure_speed(models, TEACHER, settings, progress=progress)
