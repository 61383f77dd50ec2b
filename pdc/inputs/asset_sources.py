"""The carried data files (`pdc/data/`) and how they are rebuilt from their upstream.

pdc carries its default text domains and its bundled task, compressed, inside the package, so
`pdc setup` downloads no third-party data (the `bigbench==1.0.0` sdist they first came from is
no longer served). `pdc/data/manifest.json` lists each carried file with the sha256 of its
contents, the upstream file it was taken from (repository, commit, path, sha256), the license
and what was taken. `scripts/rebuild_assets.py` runs `build_carried` on the upstream files and
compares the result with the manifest, byte for byte.

What is taken:

* SQuAD-shifts (modestyachts/squadshifts-website): the paragraphs (`data[].paragraphs[].context`,
  whitespace folded, first occurrence kept) of the "new Wikipedia" set -- `wiki` and
  `wiki-heldout`, split by content hash -- and of the Reddit and Amazon-review sets (`reddit`,
  `amazon`, evaluation only). The same files the bigbench sdist held, so the same paragraphs and
  the same held-out split as before.
* BIG-Bench Hard (suzgunmirac/BIG-Bench-Hard): `movie_recommendation`, 250 of BIG-bench's 500
  questions; the options are parsed out of the prompt into choices, shuffled with a fixed seed,
  the first 20 kept for few-shot context only.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from pdc.errors import PdcError

STAGE = "setup"

HELDOUT_FRACTION = 0.1
TASK_FEWSHOT = 20  # examples reserved for few-shot context, never scored
TASK_SEED = 1234


@dataclass(frozen=True)
class Upstream:
    """A public repository at a pinned commit, and the license its files are under."""
    repo: str
    commit: str
    license: str


UPSTREAMS = {
    "squadshifts": Upstream(
        "https://github.com/modestyachts/squadshifts-website", "b7cc4d50af791c36c49417fb94dd739d6a9e7bef",
        "no license stated by the repository; the paragraphs are Wikipedia (CC BY-SA 4.0), Reddit and "
        "Amazon-review text, distributed with BIG-bench (Apache-2.0) since 2021"),
    "bbh": Upstream(
        "https://github.com/suzgunmirac/BIG-Bench-Hard", "9ee07bd481feebf959a6b59d61ea57bdcf30964d",
        "MIT (repository); the questions are BIG-bench's movie_recommendation task (Apache-2.0)"),
}

# Upstream files: key -> (upstream, path in the repository, sha256 of the file at that commit).
UPSTREAM_FILES = {
    "new_wiki": ("squadshifts", "datasets/new_wiki_v1.0.json",
                 "1d50a0ca4cdab88d038b52ea8a2d0510af6038d7f41a0a256b9659237769d0ee"),
    "reddit": ("squadshifts", "datasets/reddit_v1.0.json",
               "b4ac346dbf1816fdec80fdcf91d06a4b754fa51e47960fa8614a94f37ea42a4b"),
    "amazon": ("squadshifts", "datasets/amazon_reviews_v1.0.json",
               "9db7bdee84a91f0fb80b9e74f365042fbbb217cb8e0a7e73bb071245472589b6"),
    "movie_recommendation": ("bbh", "bbh/movie_recommendation.json",
                             "a8b53a87ee21a865b7248e694f388a9b8f7cf6b839b11d44796a2dd3fc088983"),
}


def _content_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def squad_paragraphs(squad: dict) -> list[str]:
    """All `data[].paragraphs[].context` strings, whitespace folded, first occurrence kept."""
    seen: set[str] = set()
    out: list[str] = []
    for article in squad.get("data", []):
        for para in article.get("paragraphs", []):
            text = " ".join(str(para.get("context", "")).split())
            if text and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def split_heldout(texts: Sequence[str], fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(train, heldout): the `fraction` of texts (at least one, if >= 2) with the smallest content
    hash is held out. Invariants: disjoint, union is the input, both keep input order, and the
    split of a text does not depend on the order of the input."""
    n = len(texts)
    n_held = 0 if n < 2 else min(n - 1, max(1, round(n * fraction)))
    held = set(sorted(set(texts), key=_content_key)[:n_held])
    return [t for t in texts if t not in held], [t for t in texts if t in held]


_OPTION = re.compile(r"^\(([A-Z])\)\s*(.*)$")


def bbh_choice_records(task: dict) -> list[dict]:
    """BIG-Bench Hard multiple-choice examples as {"question", "choices", "label"}.

    A BBH input is the BIG-bench question, then `Options:` and one `(A) text` line per choice; its
    target is the letter, `(C)`. Examples whose options or target do not parse are dropped."""
    out = []
    for ex in task.get("examples", []):
        head, sep, tail = str(ex.get("input", "")).partition("\nOptions:")
        letters, choices = [], []
        for line in tail.strip().splitlines():
            m = _OPTION.match(line.strip())
            if m:
                letters.append(m.group(1))
                choices.append(m.group(2).strip())
        target = str(ex.get("target", "")).strip().strip("()")
        question = " ".join(head.split())
        if sep and question and len(choices) >= 2 and target in letters:
            out.append({"question": question, "choices": choices, "label": letters.index(target)})
    return out


def split_task(records: list[dict], n_fewshot: int = TASK_FEWSHOT, seed: int = TASK_SEED) -> tuple[list, list]:
    """(test, fewshot): shuffled with a fixed seed, so lm-eval's `limit=N` (the first N
    documents) scores a random-but-fixed subset; the first `n_fewshot` are few-shot context only."""
    if len(records) <= n_fewshot:
        raise PdcError(f"a task needs more than {n_fewshot} usable examples, got {len(records)}", STAGE)
    records = list(records)
    random.Random(seed).shuffle(records)
    return records[n_fewshot:], records[:n_fewshot]


def jsonl_bytes(records: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def gzip_bytes(data: bytes) -> bytes:
    """gzip with no name and mtime 0, so one content always gives the same file."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def gzip_decompress(data: bytes) -> bytes:
    return gzip.decompress(data)


def manifest_files(carried: dict[str, tuple[bytes, dict]]) -> dict[str, dict]:
    """The manifest's `files` section for `build_carried`'s output: each carried (gzipped) file
    with the sha256 and size of its contents and where they came from."""
    return {f"{name}.gz": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), **entry}
            for name, (data, entry) in sorted(carried.items())}


def _texts(records: Iterable[str]) -> list[dict]:
    return [{"text": t} for t in records]


def build_carried(upstream: dict[str, bytes]) -> dict[str, tuple[bytes, dict]]:
    """The carried files from the upstream files' bytes (keys of `UPSTREAM_FILES`):
    {file name: (JSONL contents, manifest entry)}. Pure: the same upstream gives the same bytes."""
    for key, data in upstream.items():
        _, path, digest = UPSTREAM_FILES[key]
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise PdcError(f"upstream {path} has sha256 {got[:12]}..., the manifest pins {digest[:12]}...", STAGE)

    def entry(key: str, records: list, taken: str, **extra) -> dict:
        up, path, digest = UPSTREAM_FILES[key]
        return {"records": len(records), "upstream": {"source": up, "repo": UPSTREAMS[up].repo,
                "commit": UPSTREAMS[up].commit, "path": path, "sha256": digest},
                "license": UPSTREAMS[up].license, "taken": taken, **extra}

    out: dict[str, tuple[bytes, dict]] = {}
    wiki = squad_paragraphs(json.loads(upstream["new_wiki"]))
    train, held = split_heldout(wiki)
    para = "paragraphs (data[].paragraphs[].context, whitespace folded, duplicates dropped)"
    out["wiki.jsonl"] = (jsonl_bytes(_texts(train)), entry(
        "new_wiki", train, f"{para}, less the held-out {HELDOUT_FRACTION:.0%} by content hash", kind="data"))
    out["wiki-heldout.jsonl"] = (jsonl_bytes(_texts(held)), entry(
        "new_wiki", held, f"{para}: the {HELDOUT_FRACTION:.0%} with the smallest sha256", kind="data"))
    for key in ("reddit", "amazon"):
        texts = squad_paragraphs(json.loads(upstream[key]))
        out[f"{key}.jsonl"] = (jsonl_bytes(_texts(texts)), entry(key, texts, f"all {para}", kind="data"))
    movies = json.loads(upstream["movie_recommendation"])
    records = bbh_choice_records(movies)
    test, shots = split_task(records)
    how = (f"the {len(records)} of {len(movies.get('examples', []))} examples whose options and target letter "
           f"parse (upstream's one exception names its answer, 'Monsters, Inc', split over two options); "
           f"options become choices, the letter a label; shuffled with seed {TASK_SEED}")
    out["movie_recommendation_local.jsonl"] = (jsonl_bytes(test), entry(
        "movie_recommendation", test, f"{how}; all but the first {TASK_FEWSHOT}", kind="task",
        task="movie_recommendation_local", split="test"))
    out["movie_recommendation_local_fewshot.jsonl"] = (jsonl_bytes(shots), entry(
        "movie_recommendation", shots, f"{how}; the first {TASK_FEWSHOT} (few-shot context only)", kind="task",
        task="movie_recommendation_local", split="fewshot"))
    return out
