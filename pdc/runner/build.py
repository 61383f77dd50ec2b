"""A build directory and the stages of one spec: `pdc compile` and `pdc run`.

Stages run in the order of the plan's stage graph (`pdc.plan.stage_graph`), each into
`<build>/<stage>/`. A stage's content key covers its settings, the identities of the data it
reads and the keys of the stages it reads from (so a changed setting reruns exactly the stages
downstream of it); a stage whose recorded key matches is skipped. A stage writes into
`<stage>.tmp/` (`pdc.files.staged_dir`) and is renamed only when it succeeded, so nothing
downstream ever reads a half-written checkpoint. Training stages keep their checkpoints in
`<stage>.work/`, so an interrupted run resumes where it stopped.

Each stage returns its typed result (`pdc.plan.results`), stored with its key in
`<stage>/stage.json`; the report, the lock and `pdc check` read that record.

Before a run writes anything, it checks every input that already exists: each model a stage
to run will read (`pdc.inputs.verify.verify_checkpoint`: headers, sizes, shapes against the
config, tokenizer, NaN/Inf), each corpus (`check_corpus`), and the teacher's and student's
vocabularies for distillation; a model written by an earlier stage of the same run is checked
when it is handed to the next one. A bad input therefore stops the run with one line and leaves
the build directory as it was. Then, holding the build directory's lock, the run removes what an
interrupted run left behind (staging directories, temporary files; `<stage>.work/` checkpoints
are kept so training resumes) and says so in one line; `stages.json` marks a stage `running`
while it runs, so the next run can name the stage that was interrupted.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

from pdc.errors import PdcError, one_line
from pdc.files import exclusive_lock, replace_path_with_link, staged_dir, write_json, write_text
from pdc.lang.checked import CheckedSpec
from pdc.plan.dry_run import build_plan
from pdc.plan.results import ModelIdentity, StageRecord, StageResult, write_record
from pdc.plan.stage_graph import Node, StageGraph, build_graph
from pdc.plan.training import Launch
from pdc.runner.build_cards import BuildCards
from pdc.runner.build_inputs import BuildInputs, HELDOUT_MORE, stage_blocks
from pdc.runner.build_locks import BuildLocks
from pdc.runner.build_status import BUILD_LOCK, BuildStatus
from pdc.runner.comparison_report import write_comparison_report
from pdc.runner.report import write_report
from pdc.runner.search_stage import run_search
from pdc.runner.speed_models import evaluation_speed
from pdc.runner.speed_table import render_text
from pdc.runner.stage_keys import StageKeys
from pdc.stages.correct import run_correct
from pdc.stages.distill import run_distill
from pdc.stages.evaluate import comparison_table, evaluate_models, write_results
from pdc.stages.prune_depth import prune_depth
from pdc.stages.prune_width import prune_width
from pdc.stages.teacher_logits import compute_teacher_logits
from pdc.stages.train.launch_files import write_stage_files

def default_build_dir(spec: CheckedSpec) -> Path:
    return Path(spec.path).parent / "build" / Path(spec.path).stem


class Build(BuildInputs, StageKeys, BuildStatus, BuildLocks, BuildCards):
    """One build directory and the stage graph of one spec: its inputs (`build_inputs`), stage keys
    and records (`stage_keys`), statuses and clean-up (`build_status`), prune locks (`build_locks`)
    and model cards (`build_cards`); here, running a stage and the files beside the stages."""

    def __init__(self, spec: CheckedSpec, out_dir: Optional[Path] = None, progress: bool = True,
                 artifacts: bool = True, launch: Launch = Launch(), shared: Optional[dict[str, Path]] = None,
                 variant: Optional[str] = None):
        self.spec = spec
        self.variant = variant  # the comparison variant this build is, if any
        # Finished stages of sibling builds (a comparison's variants) by content key: a stage
        # whose key is there is not run again but linked to.
        self.shared = shared
        self.graph: StageGraph = build_graph(spec)
        self.launch = launch  # where training (and evaluation) ranks run; the global batch does not change
        self.artifacts = artifacts  # exported program + ONNX beside each pruned checkpoint
        self.out = Path(out_dir) if out_dir else default_build_dir(spec)
        self.base = spec.base_dir
        self.progress = progress
        self._tokenizers: dict[Path, object] = {}
        self._sources: dict[str, Path] = {}
        self._corpora: dict = {}  # data name -> the corpus on disk (`BuildInputs.corpus`)
        self._keys: dict[str, str] = {}
        self._overrides: dict[str, Path] = {}  # stage -> an existing model dir standing in for it
        self._verified: set[Path] = set()
        self._identities: dict[str, ModelIdentity] = {}  # source model -> content hashes (model cards)

    # -- running --
    def run_stage(self, name: str) -> StageRecord:
        if self.done(name):
            print(f"[pdc] {name}: up to date, skipped")
            self.log_status(name, "skipped")
            self._share(name)
            return self.record(name)
        key = self.stage_key(name)
        if self.shared is not None and key in self.shared:
            return self._link_shared(name, self.shared[key])
        node = self.graph.node(name)
        print(f"[pdc] {name}: running")
        self.log_status(name, "running")
        t0 = time.perf_counter()
        try:
            with staged_dir(self.out / name) as tmp:
                try:
                    result = STAGE_RUNNERS[node.kind](self, node, tmp)
                except PdcError as exc:
                    exc.stage = exc.stage or name
                    raise
                except OSError as exc:
                    where = f" ({exc.filename})" if exc.filename else ""
                    raise PdcError(f"{exc.strerror or one_line(exc)}{where}", name) from exc
                except Exception as exc:  # a dependency's failure (transformers, lm-eval, DeepSpeed, ...)
                    raise PdcError(f"{one_line(exc)} (set PDC_TRACEBACK=1 for the traceback)", name) from exc
                record = StageRecord(name=name, kind=node.kind, key=self.stage_key(name),
                                     seconds=round(time.perf_counter() - t0, 2), result=result)
                write_record(tmp, record)
        except PdcError as exc:
            self.log_status(name, "failed", message=exc.message)
            raise
        self.log_status(name, "done", record.seconds)
        print(f"[pdc] {name}: done in {record.seconds:.1f}s")
        self._share(name)
        return record

    def _share(self, name: str) -> None:
        if self.shared is not None:
            self.shared.setdefault(self.stage_key(name), (self.out / name).resolve())

    def _link_shared(self, name: str, target: Path) -> StageRecord:
        """Make `<out>/<name>` a relative link to an equal stage built by a sibling."""
        link = self.out / name
        replace_path_with_link(link, target)
        print(f"[pdc] {name}: same settings and inputs as {target.parent.name}/{target.name}, shared")
        self.log_status(name, "shared")
        return self.record(name)

    # -- files beside the stages --
    def write_plan(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "plan.json", build_plan(self.spec))
        write_text(self.out / "spec.pds", self.spec.text)

    def emit_stage_files(self) -> None:
        """The DeepSpeed config and exact launch command of each training stage."""
        for node in self.graph.nodes.values():
            if node.kind in ("correct", "distill"):
                write_stage_files(self.out / f"{node.name}.work", node.decl.train, stage=node.name,
                                  launch=self.launch)


# ---- the stage functions: (build, node, staging dir) -> typed result --------------------------
def _run_correct(build: Build, node: Node, out: Path) -> StageResult:
    st = node.decl
    src = build.input_model(node.inputs["model"], node.name)
    data = stage_blocks(build, node, src)
    train, val = data["train"], data["val"]
    return run_correct(src, train, val, st.train, build.work_dir(node.name), out,
                       progress=build.progress, launch=build.launch)


def _run_prune(build: Build, node: Node, out: Path) -> StageResult:
    st = node.decl
    model_dir = build.input_model(node.inputs["model"], node.name)
    data = stage_blocks(build, node, model_dir)
    work = build.out / f"{node.name}.work"  # job files when importance or saliency runs on several ranks
    if st.kind == "search":
        return run_search(build, node, out, data.get("calibration"))
    deploy, pt2, onnx = build.artifacts, "pt2" in st.emit, "onnx" in st.emit  # `emit=`
    if st.kind == "width":
        # magnitude/random importance reads no data
        return prune_width(model_dir, data.get("calibration"), st.width, st.importance, out, progress=build.progress,
                           deploy=deploy, pt2=pt2, onnx=onnx, nproc=build.launch.nproc_per_node, work_dir=work,
                           reconstruct=st.reconstruct)
    return prune_depth(model_dir, st.depth, data.get("saliency"), out, tasks_dir=build.tasks_dir(),
                       progress=build.progress, deploy=deploy, pt2=pt2, onnx=onnx, nproc=build.launch.nproc_per_node,
                       work_dir=work)


def _run_teacher_logits(build: Build, node: Node, out: Path) -> StageResult:
    teacher = build.input_model(node.inputs["teacher"], node.name)
    data = stage_blocks(build, node, teacher)
    return compute_teacher_logits(teacher, data["train"], data["val"], node.decl.train, out, progress=build.progress,
                                  nproc=build.launch.nproc_per_node, work_dir=build.out / f"{node.name}.work")


def _run_distill(build: Build, node: Node, out: Path) -> StageResult:
    st = node.decl
    teacher = build.input_model(node.inputs["teacher"], node.name)
    student = build.input_model(node.inputs["student"], node.name)
    build.check_vocabularies(teacher, student, node.name)
    data = stage_blocks(build, node, teacher)
    train, val = data["train"], data["val"]
    cache = next((build.record(up).result.cache_dir for up in node.needs
                  if build.graph.node(up).kind == "teacher_logits"), None)
    return run_distill(teacher, student, train, val, st.train, build.work_dir(node.name), out,
                       progress=build.progress, launch=build.launch, teacher_cache=cache,
                       teacher_correction=st.teacher_correction)


def _run_evaluate(build: Build, node: Node, out: Path) -> StageResult:
    cfg = node.decl.eval
    models = {label: build.input_model(ref, node.name) for label, ref in node.inputs.items()}
    blocks = stage_blocks(build, node, build.source_dir(build.spec.source_model))
    more = {role[len(HELDOUT_MORE):]: b for role, b in blocks.items() if role.startswith(HELDOUT_MORE)}
    result = evaluate_models(models, build.tokenizer, cfg, build.tasks_dir(), blocks.get("heldout"), build.progress,
                             launch=build.launch, work_dir=build.out / f"{node.name}.work", more_heldout=more,
                             reuse_scores=True)
    student = next((c for c in ("pruned", "distilled") if c in models), None)
    if cfg.speed and student is not None and "teacher" in models:
        ref = node.inputs[student]
        result = dataclasses.replace(result, speed=evaluation_speed(
            build.spec, cfg, models["teacher"], student, models[student],
            build.out / ref.stage if student == "pruned" else None, build.progress))
    write_results(result, out)  # results.json and table.md
    print(comparison_table(result))
    if result.speed is not None:
        print(render_text(result.speed))
    return result


STAGE_RUNNERS: dict[str, Callable[[Build, Node, Path], StageResult]] = {
    "correct": _run_correct,
    "prune": _run_prune,
    "teacher_logits": _run_teacher_logits,
    "distill": _run_distill,
    "evaluate": _run_evaluate,
}


# ---- commands ----------------------------------------------------------------------------------
def _run(build: Build, names: list[str]) -> Path:
    for name in names:
        for up in build.graph.ancestors(name):
            if up not in names:
                build.require(up)
    build.check_inputs(names)  # nothing is written before the inputs are known to be good
    with exclusive_lock(build.out / BUILD_LOCK, f"another pdc run is writing into {build.out}"):
        build.clean_leftovers()
        build.write_plan()
        build.write_data_record()
        build.emit_stage_files()
        try:
            for name in names:
                build.run_stage(name)
                if build.graph.node(name).kind == "prune":
                    print(f"[pdc] lock: {build.write_lock(name)}")
                build.write_cards()
        except PdcError:
            try:
                write_report(build.out)  # the report shows the stage that failed and why
            except PdcError:
                pass  # the stage's error is the one to report
            raise
        md, _ = write_report(build.out)
    print(f"[pdc] report: {md}")
    return build.out


def _recipes(spec: CheckedSpec, out_dir: Optional[Path]) -> list[tuple[CheckedSpec, Path, Optional[str]]]:
    """The recipes a spec builds, where, and their variant names: itself, or each variant of its
    comparison in `<build>/<variant>/`."""
    out = Path(out_dir) if out_dir else default_build_dir(spec)
    if spec.comparison is None:
        return [(spec, out, None)]
    return [(v.spec, out / v.name, v.name) for v in spec.comparison.variants]


def _finish_comparison(spec: CheckedSpec, out_dir: Optional[Path]) -> None:
    if spec.comparison is not None:
        out = Path(out_dir) if out_dir else default_build_dir(spec)
        md, _ = write_comparison_report(out, spec.comparison)
        print(f"[pdc] comparison report: {md}")


def compile_spec(spec: CheckedSpec, out_dir: Optional[Path] = None, progress: bool = True) -> Path:
    """Run the stages up to pruning (correction first when it is sequential) and write the plans
    and launch commands of the later stages; for a comparison, of every variant (stages equal
    across variants run once)."""
    shared: dict[str, Path] = {}
    for recipe, out, variant in _recipes(spec, out_dir):
        build = Build(recipe, out, progress, shared=shared, variant=variant)
        prunes = [n.name for n in build.graph.of_kind("prune")]
        if not prunes:
            raise PdcError("the spec has no prune stage: nothing to compile (use `pdc run`)")
        names = sorted({a for p in prunes for a in build.graph.ancestors(p)} | set(prunes),
                       key=build.graph.names.index)
        _run(build, names)
    return Path(out_dir) if out_dir else default_build_dir(spec)


def run_spec(spec: CheckedSpec, out_dir: Optional[Path] = None, stage: Optional[str] = None,
             progress: bool = True, launch: Launch = Launch()) -> Path:
    """Run every stage in order (or just `stage`), skipping those that are up to date; for a
    comparison, every variant, sharing the stages that are equal across variants, then the
    comparison report."""
    shared: dict[str, Path] = {}
    for recipe, out, variant in _recipes(spec, out_dir):
        build = Build(recipe, out, progress, launch=launch, shared=shared, variant=variant)
        if stage is not None:
            if stage not in build.graph.nodes:
                raise PdcError(f"the spec has no stage {stage!r} (it has: {', '.join(build.graph.names)})")
            _run(build, [stage])
        else:
            _run(build, build.graph.names)
    _finish_comparison(spec, out_dir)
    return Path(out_dir) if out_dir else default_build_dir(spec)
