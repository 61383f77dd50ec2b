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
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from pdc import __version__
from pdc.emit.fingerprint import model_identity
from pdc.emit.launch_files import write_stage_files
from pdc.emit.lock import LOCK_SUFFIX, build_lock, write_lock
from pdc.emit.model_card import ROLES, CardEvaluation, CardSource, render_card, write_card
from pdc.errors import PdcError, one_line
from pdc.files import (
    exclusive_lock,
    remove_temp_leftovers,
    replace_path_with_link,
    sha256_json,
    staged_dir,
    write_json,
    write_text,
)
from pdc.inputs.assets import local_tasks_dir
from pdc.inputs.data import check_corpus, split_blocks, take, token_blocks
from pdc.inputs.models import data_identity, materialize_model, source_identity
from pdc.inputs.shards import Blocks
from pdc.inputs.teacher_cache import TeacherLogits
from pdc.inputs.verify import check_same_vocabulary, load_tokenizer, verify_checkpoint
from pdc.lang.checked import CheckedSpec
from pdc.plan.dry_run import build_plan
from pdc.plan.results import (
    EvaluateResult,
    ModelIdentity,
    StageRecord,
    StageResult,
    TeacherLogitsResult,
    read_record,
    write_record,
)
from pdc.plan.search_plan import short_distill_stage
from pdc.plan.stage_graph import (
    ModelRef,
    Node,
    SourceRef,
    StageGraph,
    StageRef,
    build_graph,
)
from pdc.plan.training import Launch
from pdc.runner.comparison_report import write_comparison_report
from pdc.runner.report import write_report
from pdc.runner.speed_models import evaluation_speed
from pdc.runner.speed_table import render_text
from pdc.stages.correct import run_correct
from pdc.runner.search_stage import run_search
from pdc.stages.distill import run_distill
from pdc.stages.evaluate import comparison_rows, comparison_table, evaluate_models, write_results
from pdc.stages.prune_depth import prune_depth
from pdc.stages.prune_width import prune_width
from pdc.stages.teacher_logits import compute_teacher_logits

STAGES_FILE = "stages.json"
BUILD_LOCK = ".pdc-build.lock"  # held while a run writes into the build directory


def default_build_dir(spec: CheckedSpec) -> Path:
    return Path(spec.path).parent / "build" / Path(spec.path).stem


def lock_path_of(spec: CheckedSpec, prune_name: str, variant: Optional[str] = None) -> Path:
    """Where a prune stage's lock lives: next to the spec, `<spec stem>.<stage>.lock.json` (a file
    to commit with the spec, outside the ignored build directory); a comparison variant's is
    `<spec stem>.<variant>.<stage>.lock.json`."""
    spec_path = Path(spec.path)
    parts = [spec_path.stem] + ([variant] if variant else []) + [prune_name]
    return spec_path.with_name(".".join(parts) + LOCK_SUFFIX)


# Part of every stage key. A setting at its default is left out of the keys (below), so a
# changed default would reuse stages computed with the old one: bump this with it
# (tests/test_stage_keys.py pins every default).
SETTINGS_EPOCH = 1


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def settings_identity(x):
    """JSON-able form of stage settings. Source spans and check tolerances are left out (moving a
    line or loosening `pdc check` changes nothing that a stage computes), and so is every setting
    at its default: a new setting with a default leaves the keys and locks of the specs that do
    not use it unchanged."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = {f.name: settings_identity(getattr(x, f.name)) for f in dataclasses.fields(x)
                  if f.name not in ("span", "check_tolerance", "setting_spans")
                  and getattr(x, f.name) != _field_default(f)}
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
        self._keys: dict[str, str] = {}
        self._overrides: dict[str, Path] = {}  # stage -> an existing model dir standing in for it
        self._verified: set[Path] = set()
        self._identities: dict[str, ModelIdentity] = {}  # source model -> content hashes (model cards)

    # -- models and data --
    def source_dir(self, name: str) -> Path:
        if name not in self._sources:
            checked = self.spec.source_config if name == self.spec.source_model else None
            self._sources[name] = materialize_model(self.spec.models[name], self.base, checked)
        return self._sources[name]

    def model_dir(self, ref: ModelRef) -> Path:
        if isinstance(ref, SourceRef):
            return self.source_dir(ref.model)
        if ref.stage in self._overrides:
            return self._overrides[ref.stage]
        return self.out / ref.stage / ref.output

    def use_model(self, ref: ModelRef, model_dir: Path) -> None:
        """Read `model_dir` wherever the graph reads `ref` (`pdc check --prune-input/--build`)."""
        if isinstance(ref, SourceRef):
            self._sources[ref.model] = Path(model_dir)
        else:
            self._overrides[ref.stage] = Path(model_dir)

    def tokenizer(self, model_dir: Path, stage: Optional[str] = None):
        if model_dir not in self._tokenizers:
            self._tokenizers[model_dir] = load_tokenizer(model_dir, stage=stage)
        return self._tokenizers[model_dir]

    def input_model(self, ref: ModelRef, stage: str) -> Path:
        """The model `ref` as `stage` reads it, verified (once per run) before it is trusted."""
        path = self.model_dir(ref)
        if path not in self._verified:
            try:
                self._tokenizers[path] = verify_checkpoint(path, stage).tokenizer
            except PdcError as exc:
                if isinstance(ref, StageRef) and ref.stage not in self._overrides:
                    exc.message += f" [written by stage {ref.stage}: delete {self.out / ref.stage} and run again]"
                exc.stage = exc.stage or stage
                raise
            self._verified.add(path)
        return path

    def check_vocabularies(self, teacher: Path, student: Path, stage: str) -> None:
        check_same_vocabulary(teacher, self.tokenizer(teacher, stage), student, self.tokenizer(student, stage), stage)

    def blocks(self, data_name: str, model_dir: Path, seq_len: int, stage: str) -> Blocks:
        """The token shards of a data declaration (tokenized once, memory-mapped)."""
        return token_blocks(self.spec.data[data_name], self.tokenizer(model_dir), seq_len, self.base, stage,
                            progress=self.progress, label=f"data '{data_name}'")

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
            parts = [__version__, SETTINGS_EPOCH, node.kind, settings_identity(node.decl),
                     {role: self._ref_key(ref) for role, ref in node.inputs.items()},
                     [data_identity(self.spec.data[d], self.base) for d in node.data]]
            if node.kind == "evaluate":
                parts.append(str(self.tasks_dir()) if self.tasks_dir() else None)
            if node.kind == "prune" and node.decl.kind == "search":  # it distills as the distill stage does
                d = short_distill_stage(self.spec, node.decl)
                parts.append(d and [settings_identity(d.train), data_identity(self.spec.data[d.data], self.base)])
            if node.needs:
                parts.append({up: self.stage_key(up) for up in node.needs})
            self._keys[name] = sha256_json(parts)[:16]
        return self._keys[name]

    def record(self, name: str) -> Optional[StageRecord]:
        return read_record(self.out / name)

    def done(self, name: str) -> bool:
        try:
            rec = self.record(name)
        except PdcError:
            return False  # a record of another pdc version: the stage runs again
        if rec is not None and isinstance(rec.result, TeacherLogitsResult) and not cache_holds(rec.result):
            return False  # its cache (or some of its parts) was deleted since: the pass runs again
        return rec is not None and rec.key == self.stage_key(name)

    def require(self, name: str) -> None:
        if not self.done(name):
            raise PdcError(f"stage {name!r} has not run (or its inputs changed): run it first", name)

    # -- running --
    def run_stage(self, name: str) -> StageRecord:
        if self.done(name):
            print(f"[pdc] {name}: up to date, skipped")
            self._log_status(name, "skipped")
            self._share(name)
            return self.record(name)
        key = self.stage_key(name)
        if self.shared is not None and key in self.shared:
            return self._link_shared(name, self.shared[key])
        node = self.graph.node(name)
        print(f"[pdc] {name}: running")
        self._log_status(name, "running")
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
            self._log_status(name, "failed", message=exc.message)
            raise
        self._log_status(name, "done", record.seconds)
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
        self._log_status(name, "shared")
        return self.record(name)

    def _log_status(self, name: str, status: str, seconds: Optional[float] = None,
                    message: Optional[str] = None) -> None:
        """`stages.json`: what this invocation did with each stage (running, done, failed, skipped, shared)."""
        path = self.out / STAGES_FILE
        data = self._statuses()
        data[name] = {"status": status, **({"seconds": seconds} if seconds is not None else {}),
                      **({"message": message} if message else {})}
        write_json(path, data)

    def _statuses(self) -> dict:
        try:
            data = json.loads((self.out / STAGES_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # -- before a run writes anything --
    def check_inputs(self, names: list[str]) -> None:
        """Verify every model and corpus that the stages to run will read and that exists now
        (a model written later in this run is verified when it is handed over)."""
        t0 = time.perf_counter()
        to_run = [n for n in names if not self.done(n)]
        models, corpora = set(), set()
        for name in to_run:
            node = self.graph.node(name)
            ready = {role: ref for role, ref in node.inputs.items()
                     if isinstance(ref, SourceRef) or ref.stage not in to_run}
            for ref in ready.values():
                models.add(self.input_model(ref, name))
            for d in node.data:
                check_corpus(self.spec.data[d], self.base, name)
                corpora.add(d)
            # the token blocks the stage will read: enough text for its samples and sequences
            tokenizer_of = self.model_dir(ready.get("model") or ready.get("teacher") or SourceRef(self.spec.source_model))
            stage_blocks(self, node, tokenizer_of if tokenizer_of.exists() else self.source_dir(self.spec.source_model))
            if node.kind == "distill" and {"teacher", "student"} <= set(ready):
                self.check_vocabularies(self.model_dir(ready["teacher"]), self.model_dir(ready["student"]), name)
        if models or corpora:
            counted = [f"{len(models)} model{'s' * (len(models) != 1)}"] if models else []
            counted += [f"{len(corpora)} corpus" if len(corpora) == 1 else f"{len(corpora)} corpora"] if corpora else []
            print(f"[pdc] inputs checked: {', '.join(counted)} ({time.perf_counter() - t0:.1f}s)")

    def clean_leftovers(self) -> None:
        """Remove what an interrupted run left behind (staging directories, temporary files;
        never `<stage>.work/` checkpoints) and say so in one line."""
        if not self.out.is_dir():
            return
        removed = remove_temp_leftovers(self.out, recurse=[p for p in self.out.glob("*.work") if p.is_dir()])
        statuses = self._statuses()
        interrupted = [n for n, v in statuses.items()
                       if isinstance(v, dict) and v.get("status") == "running" and n in self.graph.nodes]
        if not removed and not interrupted:
            return
        what = f"removed {', '.join(str(p.relative_to(self.out)) for p in removed)}" if removed else "nothing to remove"
        if not interrupted:
            print(f"[pdc] an earlier run was interrupted: {what}")
            return
        fates = []
        for n in interrupted:
            if self.done(n):
                fates.append(f"{n} had finished")
            elif (self.out / f"{n}.work" / "checkpoints" / "resume.json").exists():
                fates.append(f"{n} resumes from its last checkpoint")
            else:
                fates.append(f"{n} runs again")
            statuses[n] = {"status": "interrupted"}
        write_json(self.out / STAGES_FILE, statuses)
        print(f"[pdc] the last run was interrupted during {', '.join(interrupted)}: {what}; {', '.join(fates)}")

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
                                  launch=self.launch)

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
        return write_lock(self.lock(name), lock_path_of(self.spec, name, self.variant))

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
def stage_blocks(build: Build, node: Node, model_dir: Path) -> dict[str, Blocks]:
    """The token blocks `node` reads, by role ("train"/"val", "calibration", "saliency",
    "heldout"), tokenized with `model_dir`'s tokenizer. The runner asks for them before a run
    writes anything (too little text is refused with how much there is and how much was asked)
    and the stage reads them: one place decides what each stage reads."""
    st = node.decl
    if node.kind in ("correct", "teacher_logits", "distill"):
        blocks = build.blocks(st.data, model_dir, st.train.seq_len, node.name)
        train, val = split_blocks(blocks, st.train.val_fraction, node.name)
        return {"train": train, "val": val}
    if node.kind == "prune" and st.kind in ("width", "search") and st.importance.method == "activation":
        imp = st.importance
        return {"calibration": take(build.blocks(st.data, model_dir, imp.seq_len, node.name), imp.samples,
                                    imp.seed, "samples", node.name)}
    if node.kind == "prune" and st.kind == "depth" and st.depth.saliency.kind in ("loss", "cosine"):
        sal = st.depth.saliency
        return {"saliency": take(build.blocks(sal.data or st.data, model_dir, sal.seq_len, node.name), sal.samples,
                                 0, "samples", node.name)}
    if node.kind == "evaluate" and st.eval.perplexity_data:
        # "heldout": the first data named; "heldout:NAME" each further one
        first, *more = st.eval.perplexity_data
        out = {"heldout": _heldout_blocks(build, st.eval, first)}
        out.update({f"{HELDOUT_MORE}{name}": _heldout_blocks(build, st.eval, name) for name in more})
        return out
    return {}


HELDOUT_MORE = "heldout:"


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
    if st.kind == "width":
        # magnitude/random importance reads no data
        return prune_width(model_dir, data.get("calibration"), st.width, st.importance, out, progress=build.progress,
                           deploy=build.artifacts, nproc=build.launch.nproc_per_node, work_dir=work)
    return prune_depth(model_dir, st.depth, data.get("saliency"), out, tasks_dir=build.tasks_dir(),
                       progress=build.progress, deploy=build.artifacts, nproc=build.launch.nproc_per_node,
                       work_dir=work)


def cache_holds(result: TeacherLogitsResult) -> bool:
    """Whether the teacher logits cache a pass filled still holds as many blocks as it recorded."""
    try:
        return len(TeacherLogits(Path(result.cache_dir))) >= result.blocks
    except PdcError:
        return False


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


def _heldout_blocks(build: Build, cfg, name: str) -> Blocks:
    blocks = build.blocks(name, build.source_dir(build.spec.source_model), cfg.seq_len, "evaluate")
    for node in build.graph.of_kind("distill"):
        if node.decl.data == name:
            # The same corpus as training: only its held-out tail is fair to measure on.
            blocks = split_blocks(blocks, node.decl.train.val_fraction, "evaluate")[1]
    # `limit` caps the perplexity blocks as it caps task examples (the first N, fixed).
    return blocks[: cfg.limit] if cfg.limit else blocks


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
