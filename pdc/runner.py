"""Stage orchestration: `pdc compile`, `pdc run`, `pdc check`.

Stages run in the paper's order, correct -> prune -> distill -> evaluate, into one build
directory. Each stage has a content key (its settings, its inputs' keys, pdc's version); a stage
whose key matches the one recorded in `<stage>/stage.json` is skipped. A stage writes into
`<stage>.tmp/` and is renamed to `<stage>/` only when it succeeded, so nothing downstream ever
reads a half-written checkpoint. Training stages keep their checkpoints in `<stage>.work/`, so an
interrupted run resumes where it stopped.

Which model plays which part:
- sequential correction (the paper's default): the corrected teacher is pruned and teaches;
- parallel correction (the paper's Figure 4): the original teacher is pruned, and the corrected
  teacher (trained independently of pruning) teaches during distillation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from pdc import __version__
from pdc.errors import PdcError
from pdc.stages import DataSource, ModelSource

STAGE_ORDER = ("correct", "prune", "distill", "evaluate")


# ----------------------------------------------------------------------------- helpers
def default_build_dir(spec) -> Path:
    return Path(spec.path).parent / "build" / Path(spec.path).stem


def _norm(x):
    """JSON-able form of stage settings; source spans are left out (moving a line changes nothing)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = {f.name: _norm(getattr(x, f.name)) for f in dataclasses.fields(x)
                  if f.name not in ("span", "check_tolerance")}
        return {"__type__": type(x).__name__, **fields}
    if isinstance(x, (list, tuple)):
        return [_norm(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _norm(v) for k, v in x.items()}
    if isinstance(x, Path):
        return str(x)
    return x


def _key(*parts) -> str:
    blob = json.dumps([__version__, *map(_norm, parts)], sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _file_identity(path: Path) -> list:
    """Cheap identity of a file or directory: names, sizes and mtimes (weights are not hashed)."""
    if path.is_file():
        st = path.stat()
        return [path.name, st.st_size, int(st.st_mtime)]
    if path.is_dir():
        return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(path.iterdir()) if p.is_file()]
    return [str(path), "missing"]


def spec_dir(spec) -> Path:
    return Path(spec.path).resolve().parent


def materialize_model(src: ModelSource, base_dir: Path) -> Path:
    """A local Hugging Face checkpoint directory for `src`."""
    if src.kind == "dir":
        path = Path(src.ref).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not (path / "config.json").exists():
            raise PdcError(f"{path} is not a Hugging Face checkpoint directory (no config.json)", "load")
        return path
    if src.kind == "builtin":
        from pdc import assets

        return assets.builtin_model_dir(src.ref)
    if src.kind == "gguf":
        path = Path(src.ref).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.exists():
            raise PdcError(f"GGUF file not found: {path}", "load")
        return _converted_gguf(path)
    if src.kind == "hf":
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(src.ref, local_files_only=True))
        except Exception:
            raise PdcError(
                f"hub model {src.ref!r} is not in the local Hugging Face cache and pdc never "
                "downloads at run time; download it first and use dir(\"...\")",
                "load",
            ) from None
    raise PdcError(f"unknown model source kind {src.kind!r}", "load")


def _converted_gguf(path: Path) -> Path:
    """A GGUF file dequantized once into a plain HF checkpoint in the cache."""
    from pdc import assets
    from pdc.data import cache_root

    ident = hashlib.sha256(json.dumps([str(path.resolve()), _file_identity(path)]).encode()).hexdigest()[:16]
    final = cache_root() / "models" / f"gguf-{path.stem}-{ident}"
    if (final / "config.json").exists():
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[pdc] converting {path.name} to a Hugging Face checkpoint (once)")
    assets.convert_gguf(path, tmp, verify=False)
    tmp.rename(final)
    return final


def _model_identity(src: ModelSource, base_dir: Path) -> list:
    if src.kind in ("dir", "gguf"):
        p = Path(src.ref).expanduser()
        p = p if p.is_absolute() else base_dir / p
        return [src.kind, str(p), _file_identity(p)]
    return [src.kind, src.ref]


def _data_identity(src: DataSource, base_dir: Path) -> list:
    if src.kind in ("json", "jsonl", "text", "parquet"):
        p = Path(src.ref).expanduser()
        p = p if p.is_absolute() else base_dir / p
        return [dataclasses.astuple(src), _file_identity(p)]
    return [dataclasses.astuple(src)]


# ----------------------------------------------------------------------------- the build
class Build:
    """One build directory and the stages of one spec."""

    def __init__(self, spec, out_dir: Path | None = None, progress: bool = True, artifacts: bool = True,
                 world_size: int = 1):
        self.spec = spec
        self.world_size = world_size  # training processes; the global batch does not change
        self.artifacts = artifacts  # exported program + ONNX beside each pruned checkpoint
        self.out = Path(out_dir) if out_dir else default_build_dir(spec)
        self.base = spec_dir(spec)
        self.progress = progress
        self.stages: dict = {}
        for st in spec.stages:
            if st.name in self.stages:
                raise PdcError(f"the runner supports one {st.name} stage per spec (line {st.span.line})", st.name)
            self.stages[st.name] = st
        self._tokenizers: dict[Path, object] = {}
        self._model_dirs: dict[str, Path] = {}
        self.keys: dict[str, str] = {}

    # -- inputs --
    def model_dir(self, name: str) -> Path:
        if name not in self._model_dirs:
            self._model_dirs[name] = materialize_model(self.spec.models[name], self.base)
        return self._model_dirs[name]

    def tokenizer(self, model_dir: Path):
        if model_dir not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[model_dir] = AutoTokenizer.from_pretrained(model_dir)
        return self._tokenizers[model_dir]

    def blocks(self, data_name: str, model_dir: Path, seq_len: int, stage: str):
        from pdc.data import token_blocks

        return token_blocks(self.spec.data[data_name], self.tokenizer(model_dir), seq_len, self.base, stage)

    @property
    def correction_order(self) -> str | None:
        c = self.stages.get("correct")
        return getattr(c, "order", "sequential") if c else None

    def teacher_dir(self) -> Path:
        """The model that teaches: the corrected teacher when correction ran, else the source."""
        if "correct" in self.stages:
            return self.out / "correct" / "model"
        return self.model_dir(self.spec.source_model)

    @property
    def prune_names(self) -> list[str]:
        """Prune stages in spec order ("prune", "prune2", ...); each prunes the previous one's output."""
        return [n for n in self.stages if n.startswith("prune")]

    def prune_input_dir(self, name: str = "prune") -> Path:
        names = self.prune_names
        i = names.index(name) if name in names else 0
        if i > 0:
            return self.out / names[i - 1] / "model"
        if self.correction_order == "sequential":
            return self.out / "correct" / "model"
        return self.model_dir(self.spec.source_model)

    def student_dir(self) -> Path:
        return self.out / self.prune_names[-1] / "model"

    # -- keys: a stage's key covers its settings and everything upstream of it --
    def stage_key(self, name: str) -> str:
        if name in self.keys:
            return self.keys[name]
        spec, st = self.spec, self.stages[name]
        src = _model_identity(spec.models[spec.source_model], self.base)
        if name == "correct":
            k = _key("correct", st, src, _data_identity(spec.data[st.data], self.base))
        elif name.startswith("prune"):
            i = self.prune_names.index(name)
            if i > 0:
                up = self.stage_key(self.prune_names[i - 1])
            else:
                up = self.stage_key("correct") if self.correction_order == "sequential" else src
            data = _data_identity(spec.data[st.data], self.base) if st.data else None
            k = _key("prune", st, up, data)
        elif name == "distill":
            teacher = self.stage_key("correct") if "correct" in self.stages else src
            k = _key("distill", st, teacher, self.stage_key(self.prune_names[-1]), _data_identity(spec.data[st.data], self.base))
        elif name == "evaluate":
            ups = [self.stage_key(s) for s in self.stages if s != "evaluate"]
            k = _key("evaluate", st, src, ups, st.tasks_dir)
        else:
            raise KeyError(name)
        self.keys[name] = k
        return k

    # -- running --
    def done(self, name: str) -> bool:
        rec = self.out / name / "stage.json"
        if not rec.exists():
            return False
        try:
            return json.loads(rec.read_text()).get("key") == self.stage_key(name)
        except (OSError, ValueError):
            return False

    def run_stage(self, name: str, fn: Callable[[Path], dict | None]) -> Path:
        final = self.out / name
        if self.done(name):
            print(f"[pdc] {name}: up to date, skipped")
            self._record(name, {"status": "skipped"})
            return final
        tmp = self.out / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"[pdc] {name}: running")
        t0 = time.perf_counter()
        try:
            summary = fn(tmp) or {}
        except PdcError as exc:
            exc.stage = exc.stage or name
            raise
        except OSError as exc:
            raise PdcError(f"{exc.strerror or exc} ({exc.filename or ''})".strip(), name) from exc
        seconds = time.perf_counter() - t0
        (tmp / "stage.json").write_text(
            json.dumps({"key": self.stage_key(name), "seconds": round(seconds, 2), "summary": summary}, indent=2, default=str)
        )
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        self._record(name, {"status": "done", "seconds": round(seconds, 2)})
        print(f"[pdc] {name}: done in {seconds:.1f}s")
        return final

    def _record(self, name: str, rec: dict):
        path = self.out / "stages.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        if rec.get("status") == "skipped" and name in data:
            data[name]["status"] = "skipped"
        else:
            data[name] = rec
        path.write_text(json.dumps(data, indent=2))

    def require(self, name: str):
        if name in self.stages and not self.done(name):
            raise PdcError(f"stage {name!r} has not run (or its inputs changed): run it first", name)

    # ------------------------------------------------------------------------- stages
    def correct(self, out: Path) -> dict:
        from pdc.train.correct import run_correct
        from pdc.data import split_blocks

        st = self.stages["correct"]
        src = self.model_dir(st.model)
        train, val = split_blocks(self.blocks(st.data, src, st.train.seq_len, "correct"), st.train.val_fraction)
        work = self._work_dir("correct")
        return run_correct(src, train, val, st.train, work, out, progress=self.progress, world_size=self.world_size)

    def prune(self, out: Path, name: str = "prune") -> dict:
        from pdc.data import take

        st = self.stages[name]
        model_dir = self.prune_input_dir(name)
        if st.kind == "width":
            from pdc.prune_width import prune_width

            imp = st.importance
            calib = take(self.blocks(st.data, model_dir, imp.seq_len, "prune"), imp.samples, imp.seed)
            summary = prune_width(model_dir, calib, st.width, imp, out, progress=self.progress)
        else:
            from pdc.depth import prune_depth

            sal = st.depth.saliency
            blocks = None
            if sal.kind in ("loss", "cosine"):
                data_name = sal.data or st.data
                blocks = take(self.blocks(data_name, model_dir, sal.seq_len, "prune"), sal.samples, 0)
            summary = prune_depth(model_dir, st.depth, blocks, out, tasks_dir=self.tasks_dir(), progress=self.progress)
        if self.artifacts:
            self._emit_artifacts(out)
        return summary

    def _emit_artifacts(self, out: Path):
        """The exported program, the ONNX model and the lock beside the pruned checkpoint."""
        from pdc import artifacts

        artifacts.emit_all(out, progress=self.progress)

    def distill(self, out: Path) -> dict:
        from pdc.data import split_blocks
        from pdc.train.distill import run_distill

        st = self.stages["distill"]
        teacher = self.teacher_dir()
        student = self.student_dir()
        train, val = split_blocks(self.blocks(st.data, teacher, st.train.seq_len, "distill"), st.train.val_fraction)
        return run_distill(teacher, student, train, val, st.train, self._work_dir("distill"), out,
                           progress=self.progress, world_size=self.world_size)

    def tasks_dir(self) -> Path | None:
        st = self.stages.get("evaluate")
        ref = getattr(st, "tasks_dir", None) if st else None
        if ref is None:
            return None
        if ref == "builtin":
            from pdc import assets

            return assets.local_tasks_dir()
        p = Path(ref).expanduser()
        return p if p.is_absolute() else self.base / p

    def evaluate(self, out: Path) -> dict:
        import torch
        from transformers import AutoModelForCausalLM

        from pdc.evaluate import comparison_table, evaluate_model, write_results

        st = self.stages["evaluate"]
        cfg = st.eval
        candidates = {"teacher": self.model_dir(self.spec.source_model)}
        if "correct" in self.stages:
            candidates["corrected teacher"] = self.out / "correct" / "model"
        if self.prune_names:
            candidates["pruned"] = self.student_dir()
        if "distill" in self.stages:
            candidates["distilled"] = self.out / "distill" / "model"
        heldout = None
        if cfg.perplexity_data:
            heldout = self._heldout_blocks(cfg)
        results = {}
        for label, path in candidates.items():
            if not (path / "config.json").exists():
                continue
            print(f"[pdc] evaluate: {label}")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            results[label] = evaluate_model(model, self.tokenizer(path), cfg, self.tasks_dir(), heldout)
            del model
        write_results(results, out)  # results.json and table.md
        print(comparison_table(results))
        return {"models": list(results)}

    def _heldout_blocks(self, cfg):
        from pdc.data import split_blocks

        name = cfg.perplexity_data
        tok_dir = self.model_dir(self.spec.source_model)
        blocks = self.blocks(name, tok_dir, cfg.seq_len, "evaluate")
        distill = self.stages.get("distill")
        if distill is not None and distill.data == name:
            # The same corpus as training: only its held-out tail is fair to measure on.
            blocks = split_blocks(blocks, distill.train.val_fraction)[1]
        # `limit` caps the perplexity blocks as it caps task examples (the first N, fixed).
        return blocks[: cfg.limit] if cfg.limit else blocks

    def _work_dir(self, name: str) -> Path:
        """Persistent checkpoints of a training stage; wiped when the stage's key changes."""
        work = self.out / f"{name}.work"
        key_file = work / "key"
        if work.exists() and (not key_file.exists() or key_file.read_text() != self.stage_key(name)):
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        key_file.write_text(self.stage_key(name))
        return work

    # ------------------------------------------------------------------------- plans
    def write_plan(self):
        from pdc.plan import build_plan

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "plan.json").write_text(json.dumps(build_plan(self.spec), indent=2, default=str))
        (self.out / "spec.pds").write_text(self.spec.text)

    def emit_stage_files(self):
        """The DeepSpeed config and exact launch command of each training stage."""
        from pdc.train.launch import write_stage_files

        for name in ("correct", "distill"):
            if name in self.stages:
                write_stage_files(self.out / f"{name}.work", self.stages[name].train, stage=name,
                                  world_size=self.world_size)

    def write_report(self):
        from pdc.report import write_report

        md, html = write_report(self.out)
        print(f"[pdc] report: {md}")


def _stage_func(build: Build, name: str) -> Callable[[Path], dict | None]:
    if name.startswith("prune"):
        return lambda out: build.prune(out, name)
    return lambda out: getattr(build, name)(out)


def _run(build: Build, names) -> Path:
    build.write_plan()
    build.emit_stage_files()
    order = list(build.stages)
    for name in names:
        for up in order[: order.index(name)]:
            if up not in names:
                build.require(up)
        build.run_stage(name, _stage_func(build, name))
        if name.startswith("prune"):
            _write_lock(build, name)
    build.write_report()
    return build.out


def lock_path_of(build_dir: Path, prune_name: str) -> Path:
    return build_dir / f"{prune_name}.lock.json"


LOCK_CALIB_BLOCKS = 4  # calibration blocks whose LM loss goes into the lock's numeric fingerprint


def _write_lock(build: Build, name: str):
    from pdc.data import take
    from pdc.lock import build_lock, write_lock

    st, source = build.stages[name], build.prune_input_dir(name)
    seq_len = st.importance.seq_len if st.kind == "width" else st.depth.saliency.seq_len
    calib = take(build.blocks(st.data, source, seq_len, name), LOCK_CALIB_BLOCKS) if st.data else None
    # The lock pins what decides the pruned graph (the stage's settings and data identity),
    # not the spec's text: editing a comment or another stage must not fail `pdc check`.
    # No paths or mtimes: a fresh clone elsewhere must give the same lock (the calibration
    # tokens themselves are hashed into the lock's inputs).
    identity = json.dumps(_norm(st), sort_keys=True, default=repr)
    lock = build_lock(build.out, source, identity, calib_blocks=calib, stage_dir=build.out / name)
    write_lock(lock, lock_path_of(build.out, name))


def compile_spec(spec, out_dir: Path | None = None, progress: bool = True) -> Path:
    """Run the stages up to pruning (correction first when it is sequential) and write the plans
    and launch commands of the later stages."""
    build = Build(spec, out_dir, progress)
    names = list(build.prune_names)
    if not names:
        raise PdcError("the spec has no prune stage: nothing to compile (use `pdc run`)")
    if build.correction_order == "sequential":
        names.insert(0, "correct")
    return _run(build, names)


def run_spec(spec, out_dir: Path | None = None, stage: str | None = None, progress: bool = True,
             world_size: int = 1) -> Path:
    """Run every stage in order (or just `stage`), skipping those that are up to date."""
    build = Build(spec, out_dir, progress, world_size=world_size)
    if stage is not None:
        if stage not in build.stages:
            raise PdcError(f"the spec has no stage {stage!r} (it has: {', '.join(build.stages)})")
        return _run(build, [stage])
    return _run(build, list(build.stages))


def check_spec(spec, lock_path: Path | None = None, out_dir: Path | None = None, progress: bool = True,
               rtol: float | None = None, atol: float | None = None) -> int:
    """Recompile the prune stages in a scratch directory and compare each with its committed
    lock (`--lock` names the lock of the first prune stage). Returns the exit code: 0 on a match."""
    from pdc.lock import compare_locks, read_lock, render_mismatches

    home = Path(out_dir) if out_dir else default_build_dir(spec)
    build_probe = Build(spec, home, progress)
    names = build_probe.prune_names
    if not names:
        raise PdcError("the spec has no prune stage: there is no lock to check", "check")
    locks = {n: lock_path_of(home, n) for n in names}
    if lock_path is not None:
        locks[names[0]] = Path(lock_path)
    expected = {}
    for n, p in locks.items():
        if not p.exists():
            raise PdcError(f"no lock at {p}: run `pdc compile {spec.path}` and commit the lock", "check")
        expected[n] = read_lock(p)  # a corrupt lock fails here, before the recompile
    ok_all = True
    with tempfile.TemporaryDirectory(prefix="pdc-check-") as scratch:
        build = Build(spec, Path(scratch), progress, artifacts=False)
        if build.correction_order == "sequential":
            # Reuse the corrected teacher of the real build when it is up to date.
            if not build_probe.done("correct"):
                raise PdcError("the corrected teacher is missing or stale: run `pdc run --stage correct` first", "check")
            shutil.copytree(home / "correct", build.out / "correct")
        build.write_plan()
        for n in names:
            build.run_stage(n, _stage_func(build, n))
            _write_lock(build, n)
            actual = read_lock(lock_path_of(build.out, n))
            spec_rtol, spec_atol = build.stages[n].check_tolerance  # the command line wins
            mismatches = compare_locks(expected[n], actual, rtol=spec_rtol if rtol is None else rtol,
                                       atol=spec_atol if atol is None else atol)
            ok, message = not mismatches, render_mismatches(mismatches, expected[n], actual)
            print(f"{n}: {message}" if len(names) > 1 else message)
            ok_all = ok_all and ok
    return 0 if ok_all else 1
