"""`pdc setup` asset building on synthetic inputs: a tiny fake bigbench tarball -> wiki JSONL and the
local lm-eval task. The real conversion (358 MB download, GGUF) is the slow test at the end."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdc.files import sha256_file
from pdc.inputs import assets
from pdc.inputs.gguf import greedy_answer
from pdc.errors import PdcError

SQUAD = {
    "version": "1.0",
    "data": [
        {"title": "A", "paragraphs": [{"context": f"Paragraph number {i} about topic A.", "qas": []}
                                      for i in range(25)]},
        # Duplicates (also differing only in whitespace) and an empty context.
        {"title": "B", "paragraphs": [{"context": "Paragraph number 3 about topic A."},
                                      {"context": "  Paragraph   number 4 about topic A. "},
                                      {"context": ""},
                                      {"context": "A single paragraph of B."}]},
    ],
}
SOCIAL = {
    "name": "social_iqa",
    "examples": [
        {"input": f"Question {i} about people? ",
         "target_scores": {f"answer {i}a": int(i % 3 == 0), f"answer {i}b": int(i % 3 == 1),
                           f"answer {i}c": int(i % 3 == 2)}}
        for i in range(40)
    ] + [
        {"input": "No correct answer?", "target_scores": {"x": 0, "y": 0}},
        {"input": "Two correct answers?", "target_scores": {"x": 1, "y": 1}},
    ],
}


NEWS = {"data": [{"paragraphs": [{"context": f"News story {i}."} for i in range(5)]}]}
REDDIT = {"data": [{"paragraphs": [{"context": f"Reddit post {i}."} for i in range(4)]}]}
TIMEDIAL = {"examples": [{"input": f"Dialog {i}: which span?", "target_scores": {"a": int(i % 2 == 0), "b": int(i % 2 == 1)}}
                         for i in range(30)]}
MOVIES = {"examples": [{"input": f"Films {i}:", "target_scores": {f"film {i}{c}": int(c == "abcd"[i % 4]) for c in "abcd"}}
                       for i in range(25)]}
DISCOURSE = {"examples": [{"input": f"Sentence {i}.", "target_scores": {f"Marker{j}, rest.": int(j == i % 10) for j in range(10)}}
                          for i in range(22)]}


def _fake_sdist(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in [("README.md", b"not wanted"),
                              (assets.SQUAD_WIKI_MEMBER, json.dumps(SQUAD).encode()),
                              (assets.SQUAD_NEWS_MEMBER, json.dumps(NEWS).encode()),
                              (assets.SQUAD_REDDIT_MEMBER, json.dumps(REDDIT).encode()),
                              ("bigbench/other/task.json", b"{}"),
                              (assets.SOCIAL_IQA_MEMBER, json.dumps(SOCIAL).encode()),
                              (assets.TIMEDIAL_MEMBER, json.dumps(TIMEDIAL).encode()),
                              (assets.MOVIE_MEMBER, json.dumps(MOVIES).encode()),
                              (assets.DISCOURSE_MEMBER, json.dumps(DISCOURSE).encode())]:
            info = tarfile.TarInfo(f"bigbench-1.0.0/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    fake = _fake_sdist(downloads / assets.BIGBENCH_SDIST)
    monkeypatch.setattr(assets, "BIGBENCH_SHA256", sha256_file(fake))

    def no_network(*args, **kwargs):  # a test that reaches pip would download 358 MB
        pytest.fail("unexpected pip call")
    monkeypatch.setattr(assets, "_pip", no_network)
    return tmp_path / "cache"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_paths_say_run_setup_when_missing(tmp_path, monkeypatch):
    """Before setup every accessor raises a one-line PdcError that names `pdc setup`."""
    monkeypatch.setenv("PDC_CACHE", str(tmp_path))
    for call in (assets.smollm2_dir, assets.local_tasks_dir,
                 lambda: assets.builtin_data_path("wiki"),
                 lambda: assets.builtin_model_dir("smollm2-135m")):
        with pytest.raises(PdcError, match="pdc setup") as err:
            call()
        assert "\n" not in str(err.value)
    with pytest.raises(PdcError, match="unknown builtin data 'books'"):
        assets.builtin_data_path("books")
    with pytest.raises(PdcError, match="unknown builtin model"):
        assets.builtin_model_dir("gpt2")


def test_read_members_reads_only_wanted(cache):
    got = assets.read_members(cache / "downloads" / assets.BIGBENCH_SDIST,
                              [assets.SQUAD_WIKI_MEMBER, assets.SOCIAL_IQA_MEMBER])
    assert json.loads(got[assets.SQUAD_WIKI_MEMBER]) == SQUAD
    assert json.loads(got[assets.SOCIAL_IQA_MEMBER]) == SOCIAL
    with pytest.raises(PdcError, match="has no member"):
        assets.read_members(cache / "downloads" / assets.BIGBENCH_SDIST, ["nope.json"])


def test_corrupt_tarball_is_one_line_error(tmp_path):
    bad = tmp_path / assets.BIGBENCH_SDIST
    bad.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(PdcError, match="cannot read"):
        assets.read_members(bad, ["x"])


def test_text_assets_from_fake_sdist(cache):
    """wiki + heldout = the deduplicated paragraphs (disjoint); the task YAML points at JSONL files
    whose records have one correct label each; the whole layout appears only on success."""
    data, tasks = assets.setup_text_assets(progress=False)
    train = [r["text"] for r in _read_jsonl(assets.builtin_data_path("wiki"))]
    held = [r["text"] for r in _read_jsonl(assets.builtin_data_path("wiki-heldout"))]
    expected = assets.wiki_paragraphs(SQUAD)
    assert len(expected) == 26  # 25 of A + 1 new of B: duplicates and the empty one dropped
    assert sorted(train + held) == sorted(expected)
    assert not set(train) & set(held)
    assert len(held) == round(26 * assets.HELDOUT_FRACTION)

    yaml_text = (tasks / "social_iqa_local.yaml").read_text()
    assert "task: social_iqa_local" in yaml_text and "output_type: multiple_choice" in yaml_text
    test = _read_jsonl(tasks / "social_iqa_local.jsonl")
    shots = _read_jsonl(tasks / "social_iqa_local_fewshot.jsonl")
    assert len(test) + len(shots) == 40  # the two ill-posed examples are dropped
    assert len(shots) == assets.TASK_FEWSHOT
    for rec in test + shots:
        i = int(rec["question"].split()[1])
        assert rec["choices"][rec["label"]] == f"answer {i}" + "abc"[i % 3]
    assert str((tasks / "social_iqa_local.jsonl").resolve()) in yaml_text
    assert "task: timedial_local" in (tasks / "timedial_local.yaml").read_text()
    assert len(_read_jsonl(tasks / "timedial_local.jsonl")) == 30 - assets.TASK_FEWSHOT
    movies = _read_jsonl(tasks / "movie_recommendation_local.jsonl")
    assert len(movies) == 25 - assets.TASK_FEWSHOT
    for rec in movies:  # four choices, the label still on the right one
        i = int(rec["question"].removeprefix("Films ").removesuffix(":"))
        assert rec["choices"][rec["label"]] == f"film {i}" + "abcd"[i % 4]
    discourse = _read_jsonl(tasks / "discourse_marker_local.jsonl")
    assert len(discourse) == 2 and all(len(r["choices"]) == 10 for r in discourse)
    assert [r["text"] for r in _read_jsonl(assets.builtin_data_path("news"))] == [f"News story {i}." for i in range(5)]
    assert len(_read_jsonl(assets.builtin_data_path("reddit"))) == 4
    assert not list(cache.glob("*.tmp"))


def test_text_assets_idempotent_and_deterministic(cache):
    """A second setup keeps the files; rebuilding from scratch gives byte-identical files."""
    data, tasks = assets.setup_text_assets(progress=False)
    files = sorted(p for d in (data, tasks) for p in d.iterdir())
    before = {p: p.read_bytes() for p in files}
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assets.setup_text_assets(progress=False)
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    for d in (data, tasks):
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
    assets.setup_text_assets(progress=False)
    assert {p: p.read_bytes() for p in files} == before


def test_interrupted_build_leaves_no_partial_asset(cache, monkeypatch):
    """If building the task fails, tasks/ does not exist (wiki, built first, is complete)."""
    def boom(*a, **k):
        raise PdcError("simulated failure", "setup")
    real = assets.build_task
    monkeypatch.setattr(assets, "build_task", boom)
    with pytest.raises(PdcError, match="simulated"):
        assets.setup_text_assets(progress=False)
    assert not (cache / "tasks").exists() and not (cache / "tasks.tmp").exists()
    assert (cache / "data" / "wiki.jsonl").exists()
    monkeypatch.setattr(assets, "build_task", real)
    assets.setup_text_assets(progress=False)
    assert (cache / "tasks" / "social_iqa_local.yaml").exists()


def test_damaged_cached_sdist_is_fetched_again(cache, monkeypatch):
    """A cached tarball whose hash is wrong is deleted and downloaded again (here: pip fails)."""
    sdist = cache / "downloads" / assets.BIGBENCH_SDIST
    sdist.write_bytes(sdist.read_bytes()[:100])  # truncated by an interrupted copy
    calls = []
    monkeypatch.setattr(assets, "_pip", lambda args, what, progress=False: calls.append(args))
    with pytest.raises(PdcError, match="pip did not fetch"):
        assets.download_bigbench(cache / "downloads", progress=False)
    assert calls and "download" in calls[0] and not sdist.exists()


def test_pip_failure_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(PdcError, match="pip could not download") as err:
        assets.download_bigbench(tmp_path / "downloads", progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "downloads" / assets.BIGBENCH_SDIST).exists()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), max_size=40, unique=True), st.randoms())
def test_split_is_a_partition_independent_of_order(texts, rnd):
    """train and heldout partition the input, keep its order, and shuffling the input does not
    move any text to the other side."""
    train, held = assets.split_heldout(texts)
    assert sorted(train + held) == sorted(texts)
    assert [t for t in texts if t in set(train)] == train
    if len(texts) >= 2:
        assert held and train
    shuffled = list(texts)
    rnd.shuffle(shuffled)
    train2, held2 = assets.split_heldout(shuffled)
    assert set(held2) == set(held)


@pytest.mark.slow
def test_real_setup_gives_paris_and_lm_eval_task():
    """The real assets: SmolLM2 knows Paris; lm-eval finds `social_iqa_local`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = assets.setup(progress=False)
    model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32).eval()
    assert "quantization_config" not in json.loads((paths["model"] / "config.json").read_text())
    assert "Paris" in greedy_answer(model, AutoTokenizer.from_pretrained(paths["model"]))
    assert len(_read_jsonl(assets.builtin_data_path("wiki-heldout"))) > 50

    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(assets.local_tasks_dir()))
    assert set(assets.LOCAL_TASKS) <= set(tm.all_tasks)
    assert len(_read_jsonl(assets.builtin_data_path("news"))) > 50


# The tasks SmolLM2-135M answers well above chance (what a pruned model's loss shows on).
WELL_ABOVE_CHANCE = ("movie_recommendation_local", "discourse_marker_local")


@pytest.mark.slow
@pytest.mark.parametrize("task", sorted(assets.LOCAL_TASKS))
def test_smollm2_scores_as_measured_on_the_local_tasks(task):
    """SmolLM2's accuracy on 200 examples of each local task is where it was measured: above chance
    on movie_recommendation and discourse_marker (a shifted label or a broken template lands at
    chance), within reach of chance on social_iqa and timedial."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(assets.local_tasks_dir()))
    lm = HFLM(pretrained=str(assets.smollm2_dir()), dtype="float32", batch_size=16, device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=tm, limit=200,
                                  num_fewshot=0)["results"][task]
    docs = _read_jsonl(assets.local_tasks_dir() / f"{task}.jsonl")[:200]
    chance = sum(1 / len(d["choices"]) for d in docs) / len(docs)
    acc, se = res["acc_norm,none"], res["acc_norm_stderr,none"]
    if task in WELL_ABOVE_CHANCE:
        assert acc > chance + 5 * se, (acc, chance)
    else:
        assert acc > chance - 3 * se, (acc, chance)
