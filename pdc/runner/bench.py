"""`pdc bench SPEC`: the teacher against every student of a build, measured in one session.

The students are the models of the build's prune stages (for a comparison, of every variant's),
read from a build that `pdc run` or `pdc compile` made; a distilled student has its pruned
model's architecture and dtype, so its speed is the pruned model's. The teacher is the spec's
source model; for the ONNX backend it is exported once by the path the prune stage emits its
students' `model.onnx` (kept in the pdc cache by the teacher's content hash). The result goes to
`<build>/bench/speed.json`, which the report reads, and to stdout (a table, or JSON).

`evaluate { ... speed=true }` measures the same way inside `pdc run`
(`pdc.runner.speed_models.evaluation_speed`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from pdc.errors import PdcError
from pdc.lang.checked import CheckedSpec
from pdc.plan.results import SpeedResult
from pdc.runner.build import Build, _recipes, default_build_dir
from pdc.runner.comparison_report import write_comparison_report
from pdc.runner.report import write_report
from pdc.runner.speed_models import TEACHER, spec_precision, student_model, teacher_model
from pdc.runner.speed_table import write_speed
from pdc.stages.speed import SpeedModel, SpeedSettings, measure_speed

def bench_models(spec: CheckedSpec, out: Path, onnx: bool) -> dict[str, SpeedModel]:
    """The teacher and each prune stage's student of the build(s) of `spec`, by label."""
    models: dict[str, SpeedModel] = {}
    for recipe, recipe_out, variant in _recipes(spec, out):
        build = Build(recipe, recipe_out, progress=False, variant=variant)
        if TEACHER not in models:
            models[TEACHER] = teacher_model(build.source_dir(recipe.source_model), onnx)
        for node in build.graph.of_kind("prune"):
            if not build.done(node.name):
                where = f" of variant {variant}" if variant else ""
                raise PdcError(f"stage {node.name!r}{where} has not run (or its inputs changed): run "
                               f"`pdc run {spec.path}` first", "bench")
            label = "/".join(x for x in (variant, node.name) if x)
            models[label] = student_model(recipe_out / node.name)
    if len(models) < 2:
        raise PdcError("the spec has no prune stage: no student to measure against the teacher", "bench")
    return models


def bench_spec(spec: CheckedSpec, out_dir: Optional[Path] = None, device: str = "cpu",
               repeats: Optional[int] = None, progress: bool = True, threads: Optional[int] = None) -> SpeedResult:
    """Measure the build of `spec` and write `<build>/bench/speed.json`."""
    out = Path(out_dir) if out_dir else default_build_dir(spec)
    settings = SpeedSettings(device=device, precision=spec_precision(spec, device))
    if repeats is not None:
        settings = dataclasses.replace(settings, repeats=repeats)
    if threads is not None:
        settings = dataclasses.replace(settings, threads=threads)
    models = bench_models(spec, out, onnx=device == "cpu")
    if device != "cpu":
        settings = dataclasses.replace(settings, backends=("torch",))
    result = measure_speed(models, TEACHER, settings, progress=progress)
    write_speed(out, result)
    if spec.comparison is not None:  # the reports show it
        write_comparison_report(out, spec.comparison)
    else:
        write_report(out)
    return result
