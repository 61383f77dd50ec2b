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
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import AutoTokenizer

from pdc import __version__
from pdc.emit.fingerprint import model_identity
from pdc.emit.launch_files import write_stage_files
from pdc.emit.lock import LOCK_SUFFIX, build_lock, write_lock
from pdc.emit.model_card import ROLES, CardEvaluation, CardSource, render_card, write_card
from pdc.errors import PdcError
from pdc.files import sha256_json, staged_dir, write_json, write_text
from pdc.inputs.assets import local_tasks_dir
from pdc.inputs.data import split_blocks, take, token_blocks
from pdc.inputs.models import data_identity, materialize_model, source_identity
from pdc.lang.checked import CheckedSpec
from pdc.plan.dry_run import build_plan
from pdc.plan.results import EvaluateResult, ModelIdentity, StageRecord, StageResult, read_record, write_record
from pdc.plan.stage_graph import (
    ModelRef,
    Node,
    SourceRef,
    StageGraph,
    StageRef,
    build_graph,
)
from pdc.runner.report import write_report
from pdc.stages.correct import run_correct
from pdc.stages.distill import run_distill
from pdc.stages.evaluate import comparison_rows, comparison_table, evaluate_models, write_results
from pdc.stages.prune_depth import prune_depth
from pdc.stages.prune_width import prune_width

STAGES_FILE = "stages.json"


def default_build_dir(spec: CheckedSpec) -> Path:
    return Path(spec.path).parent / "build" / Path(spec.path).stem


def lock_path_of(spec: CheckedSpec, prune_name: str) -> Path:
    """Where a prune stage's lock lives: next to the spec, `<spec stem>.<stage>.lock.json` (a file
    to commit with the spec, outside the ignored build directory)."""
    spec_path = Path(spec.path)
    return spec_path.with_name(f"{spec_path.stem}.{prune_name}{LOCK_SUFFIX}")


def settings_identity(x):
    """JSON-able form of stage settings; source spans and check tolerances are left out (moving a
    line or loosening `pdc check` changes nothing that a stage computes)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = {f.name: settings_identity(getattr(x, f.name)) for f in dataclasses.fields(x)
                  if f.name not in ("span", "check_tolerance")}
        return {"__type__": type(x).__name__, **fields}
    if isinstance(x, (list, tuple)):
        return [settings_identity(v) for v in x]
    if isinstance(x, dict):
        return {str(k): settings_identity(v) for k, v in x.items()}
    if isinstance(x, Path):
        return str(x)
    return x


class Build:
    """One build directory and the stage graph of one spec."""

    def __init__(self, spec: CheckedSpec, out_dir: Optional[Path] = None, progress: bool = True,
                 artifacts: bool = True, world_size: int = 1):
        self.spec = spec
        self.graph: StageGraph = build_graph(spec)
        self.world_size = world_size  # training processes; the global batch does not change
        self.artifacts = artifacts  # exported program + ONNX beside each pruned checkpoint
        self.out = Path(out_dir) if out_dir else default_build_dir(spec)
        self.base = spec.base_dir
        self.progress = progress
        self._tokenizers: dict[Path, object] = {}
        self._sources: dict[str, Path] = {}
        self._keys: dict[str, str] = {}
        self._overrides: dict[str, Path] = {}  # stage -> an existing model dir standing in for it
        self._identities: dict[str, ModelIdentity] = {}  # source model -> content hashes (model cards)

    # -- models and data --
    def source_dir(self, name: str) -> Path:
        if name not in self._sources:
            self._sources[name] = materialize_model(self.spec.models[name], self.base)
        return self._sources[name]

    def model_dir(self, ref: ModelRef) -> Path:
        if isinstance(ref, SourceRef):
            return self.source_dir(ref.model)
        if ref.stage in self._overrides:
            return self._overrides[ref.stage]
        return self.out / ref.stage / "model"

    def use_model(self, ref: ModelRef, model_dir: Path) -> None:
        """Read `model_dir` wherever the graph reads `ref` (`pdc check --prune-input/--build`)."""
        if isinstance(ref, SourceRef):
            self._sources[ref.model] = Path(model_dir)
        else:
            self._overrides[ref.stage] = Path(model_dir)

    def tokenizer(self, model_dir: Path):
        if model_dir not in self._tokenizers:
            self._tokenizers[model_dir] = AutoTokenizer.from_pretrained(model_dir)
        return self._tokenizers[model_dir]

    def blocks(self, data_name: str, model_dir: Path, seq_len: int, stage: str) -> torch.Tensor:
        return token_blocks(self.spec.data[data_name], self.tokenizer(model_dir), seq_len, self.base, stage)

    def tasks_dir(self) -> Optional[Path]:
        evaluate = self.graph.of_kind("evaluate")
        ref = evaluate[0].decl.tasks_dir if evaluate else None
        if ref is None:
            return None
        if ref == "builtin":
            return local_tasks_dir()
        path = Path(ref).expanduser()
        return path if path.is_absolute() else self.base / path

    # -- keys: a stage's key covers its settings and everything upstream of it --
    def _ref_key(self, ref: ModelRef):
        if isinstance(ref, SourceRef):
            return source_identity(self.spec.models[ref.model], self.base)
        return self.stage_key(ref.stage)

    def stage_key(self, name: str) -> str:
        if name not in self._keys:
            node = self.graph.node(name)
            parts = [__version__, node.kind, settings_identity(node.decl),
                     {role: self._ref_key(ref) for role, ref in node.inputs.items()},
                     [data_identity(self.spec.data[d], self.base) for d in node.data]]
            if node.kind == "evaluate":
                parts.append(str(self.tasks_dir()) if self.tasks_dir() else None)
            self._keys[name] = sha256_json(parts)[:16]
        return self._keys[name]

    def record(self, name: str) -> Optional[StageRecord]:
        return read_record(self.out / name)

    def done(self, name: str) -> bool:
        try:
            rec = self.record(name)
        except PdcError:
            return False  # a record of another pdc version: the stage runs again
        return rec is not None and rec.key == self.stage_key(name)

    def require(self, name: str) -> None:
        if not self.done(name):
            raise PdcError(f"stage {name!r} has not run (or its inputs changed): run it first", name)

    # -- running --
    def run_stage(self, name: str) -> StageRecord:
        if self.done(name):
            print(f"[pdc] {name}: up to date, skipped")
            self._log_status(name, "skipped")
            return self.record(name)
        node = self.graph.node(name)
        print(f"[pdc] {name}: running")
        t0 = time.perf_counter()
        with staged_dir(self.out / name) as tmp:
            try:
                result = STAGE_RUNNERS[node.kind](self, node, tmp)
            except PdcError as exc:
                exc.stage = exc.stage or name
                raise
            except OSError as exc:
                raise PdcError(f"{exc.strerror or exc} ({exc.filename or ''})".strip(), name) from exc
            record = StageRecord(name=name, kind=node.kind, key=self.stage_key(name),
                                 seconds=round(time.perf_counter() - t0, 2), result=result)
            write_record(tmp, record)
        self._log_status(name, "done", record.seconds)
        print(f"[pdc] {name}: done in {record.seconds:.1f}s")
        return record

    def _log_status(self, name: str, status: str, seconds: Optional[float] = None) -> None:
        """`stages.json`: what this invocation did with each stage (ran or skipped)."""
        path = self.out / STAGES_FILE
        data = json.loads(path.read_text()) if path.exists() else {}
        data[name] = {"status": status, **({"seconds": seconds} if seconds is not None else {})}
        write_json(path, data)

    def work_dir(self, name: str) -> Path:
        """Persistent checkpoints of a training stage; wiped when the stage's key changes."""
        work = self.out / f"{name}.work"
        key_file = work / "key"
        if work.exists() and (not key_file.exists() or key_file.read_text() != self.stage_key(name)):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        key_file.write_text(self.stage_key(name))
        return work

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
                                  world_size=self.world_size)

    def lock(self, name: str) -> dict:
        """The lock of prune stage `name`, from its record. It pins what decides the pruned
        graph (the stage's settings), not the spec's text: editing a comment or another stage
        must not fail `pdc check`."""
        record = self.record(name)
        if record is None:
            raise PdcError(f"stage {name!r} has not run: no lock to write", name)
        settings = json.dumps(settings_identity(self.graph.node(name).decl), sort_keys=True, default=repr)
        return build_lock(record.result, settings)

    def write_lock(self, name: str) -> Path:
        return write_lock(self.lock(name), lock_path_of(self.spec, name))

    # -- model cards: README.md in every stage's model/, derived from the records --
    def write_cards(self) -> list[Path]:
        """Write (or refresh) the card of every stage model that exists; a stage whose record
        or upstream records are missing or unreadable gets none (yet)."""
        written = []
        for node in self.graph.nodes.values():
            model_dir = self.out / node.name / "model"
            if node.kind not in ROLES or not (model_dir / "config.json").exists():
                continue
            try:
                lineage = [self.record(n) for n in self.graph.ancestors(node.name) + [node.name]]
            except PdcError:
                continue
            if any(r is None for r in lineage):
                continue
            text = render_card(node.name, str(self.spec.path), self.spec.text, self._card_source(), lineage,
                               self._card_evaluation(node.name))
            written.append(write_card(model_dir, text))
        return written

    def _card_source(self) -> CardSource:
        name = self.spec.source_model
        if name not in self._identities:  # hashed once per invocation
            self._identities[name] = model_identity(self.source_dir(name))
        src = self.spec.models[name]
        return CardSource(name=name, kind=src.kind, ref=src.ref, identity=self._identities[name])

    def _card_evaluation(self, stage: str) -> Optional[CardEvaluation]:
        """The build's comparison table with `stage`'s column marked (None before evaluation)."""
        for node in self.graph.of_kind("evaluate"):
            try:
                record = self.record(node.name)
            except PdcError:
                return None
            if record is None or not isinstance(record.result, EvaluateResult):
                return None
            columns, rows = comparison_rows(record.result)
            column = next((label for label, ref in node.inputs.items()
                           if ref == StageRef(stage) and label in record.result.models), None)
            return CardEvaluation(columns=columns, rows=rows, column=column, limit=record.result.limit)
        return None


# ---- the stage functions: (build, node, staging dir) -> typed result --------------------------
def _run_correct(build: Build, node: Node, out: Path) -> StageResult:
    st = node.decl
    src = build.model_dir(node.inputs["model"])
    train, val = split_blocks(build.blocks(st.data, src, st.train.seq_len, node.name), st.train.val_fraction)
    return run_correct(src, train, val, st.train, build.work_dir(node.name), out,
                       progress=build.progress, world_size=build.world_size)


def _run_prune(build: Build, node: Node, out: Path) -> StageResult:
    st = node.decl
    model_dir = build.model_dir(node.inputs["model"])
    if st.kind == "width":
        imp = st.importance
        calib = take(build.blocks(st.data, model_dir, imp.seq_len, node.name), imp.samples, imp.seed)
        return prune_width(model_dir, calib, st.width, imp, out, progress=build.progress, deploy=build.artifacts)
    sal = st.depth.saliency
    blocks = None
    if sal.kind in ("loss", "cosine"):
        blocks = take(build.blocks(sal.data or st.data, model_dir, sal.seq_len, node.name), sal.samples, 0)
    return prune_depth(model_dir, st.depth, blocks, out, tasks_dir=build.tasks_dir(), progress=build.progress,
                       deploy=build.artifacts)


def _run_distill(build: Build, node: Node, out: Path) -> StageResult:
    st = node.decl
    teacher, student = build.model_dir(node.inputs["teacher"]), build.model_dir(node.inputs["student"])
    train, val = split_blocks(build.blocks(st.data, teacher, st.train.seq_len, node.name), st.train.val_fraction)
    return run_distill(teacher, student, train, val, st.train, build.work_dir(node.name), out,
                       progress=build.progress, world_size=build.world_size)


def _run_evaluate(build: Build, node: Node, out: Path) -> StageResult:
    cfg = node.decl.eval
    models = {label: build.model_dir(ref) for label, ref in node.inputs.items()}
    heldout = _heldout_blocks(build, cfg) if cfg.perplexity_data else None
    result = evaluate_models(models, build.tokenizer, cfg, build.tasks_dir(), heldout, build.progress)
    write_results(result, out)  # results.json and table.md
    print(comparison_table(result))
    return result


def _heldout_blocks(build: Build, cfg) -> torch.Tensor:
    name = cfg.perplexity_data
    blocks = build.blocks(name, build.source_dir(build.spec.source_model), cfg.seq_len, "evaluate")
    for node in build.graph.of_kind("distill"):
        if node.decl.data == name:
            # The same corpus as training: only its held-out tail is fair to measure on.
            blocks = split_blocks(blocks, node.decl.train.val_fraction)[1]
    # `limit` caps the perplexity blocks as it caps task examples (the first N, fixed).
    return blocks[: cfg.limit] if cfg.limit else blocks


STAGE_RUNNERS: dict[str, Callable[[Build, Node, Path], StageResult]] = {
    "correct": _run_correct,
    "prune": _run_prune,
    "distill": _run_distill,
    "evaluate": _run_evaluate,
}


# ---- commands ----------------------------------------------------------------------------------
def _run(build: Build, names: list[str]) -> Path:
    build.write_plan()
    build.emit_stage_files()
    for name in names:
        for up in build.graph.ancestors(name):
            if up not in names:
                build.require(up)
        build.run_stage(name)
        if build.graph.node(name).kind == "prune":
            print(f"[pdc] lock: {build.write_lock(name)}")
        build.write_cards()
    md, _ = write_report(build.out)
    print(f"[pdc] report: {md}")
    return build.out


def compile_spec(spec: CheckedSpec, out_dir: Optional[Path] = None, progress: bool = True) -> Path:
    """Run the stages up to pruning (correction first when it is sequential) and write the plans
    and launch commands of the later stages."""
    build = Build(spec, out_dir, progress)
    prunes = [n.name for n in build.graph.of_kind("prune")]
    if not prunes:
        raise PdcError("the spec has no prune stage: nothing to compile (use `pdc run`)")
    names = sorted({a for p in prunes for a in build.graph.ancestors(p)} | set(prunes), key=build.graph.names.index)
    return _run(build, names)


def run_spec(spec: CheckedSpec, out_dir: Optional[Path] = None, stage: Optional[str] = None,
             progress: bool = True, world_size: int = 1) -> Path:
    """Run every stage in order (or just `stage`), skipping those that are up to date."""
    build = Build(spec, out_dir, progress, world_size=world_size)
    if stage is not None:
        if stage not in build.graph.nodes:
            raise PdcError(f"the spec has no stage {stage!r} (it has: {', '.join(build.graph.names)})")
        return _run(build, [stage])
    return _run(build, build.graph.names)
