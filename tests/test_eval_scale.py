"""Evaluation beyond multiple choice and beyond one process: generative tasks with their own
settings, each task's own primary metric, tasks that run model-written code only when allowed,
and data-parallel ranks that reproduce the single-process scores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_tiny_tokenizer
from pdc.errors import PdcError
from pdc.inputs.shards import Blocks, write_rows
from pdc.lang.settings import EvalConfig, EvalTask
from pdc.plan.training import Launch
from pdc.plan.results import EvaluateResult
from pdc.stages.evaluate import comparison_table, evaluate_model, evaluate_models
from pdc.stages.lm_tasks import run_tasks
from eval_support import make_tiny_model_for_tasks, rig_to_prefer, write_mc_task

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    for f in FIXTURES.iterdir():
        shutil.copy(f, folder / f.name)
    write_mc_task(folder, "tiny_mc_norm", metrics=("acc_norm", "acc"))
    return folder


def _rigged(letter: str, seed: int = 0):
    tok = make_tiny_tokenizer()
    return rig_to_prefer(make_tiny_model_for_tasks("llama", seed=seed), tok.convert_tokens_to_ids(letter)), tok


def test_a_generative_task_runs_with_its_own_generation_settings(tasks_dir):
    """Greedy generation, at most the task's 3 tokens, exact match: "yyy" is right, "aaa" wrong."""
    good, tok = _rigged("y")
    bad, _ = _rigged("a")
    right = run_tasks(good, tok, [EvalTask("tiny_gen", 0)], tasks_dir)["tiny_gen"]
    wrong = run_tasks(bad, tok, [EvalTask("tiny_gen", 0)], tasks_dir)["tiny_gen"]
    assert right.primary == "exact_match" and right.values["exact_match"] == 1.0 and right.items == 5
    assert wrong.values["exact_match"] == 0.0


def test_the_table_shows_each_tasks_own_primary_metric(tasks_dir):
    good, tok = _rigged("y")
    cfg = EvalConfig(tasks=(EvalTask("tiny_gen", 0), EvalTask("tiny_mc_norm", 1)))
    scores = evaluate_model(good, tok, cfg, "rigged", tasks_dir, progress=False)
    result = EvaluateResult(models={"teacher": scores}, limit=None)
    score = result.models["teacher"].tasks["tiny_mc_norm"]
    assert score.primary == "acc_norm" and set(score.values) == {"acc_norm", "acc"}
    rows = comparison_table(result).splitlines()
    assert rows[2].startswith("| tiny_gen (0-shot) exact_match % | 100.0")
    assert rows[3].startswith("| tiny_mc_norm (1-shot) acc_norm % | 100.0")


def test_a_task_that_runs_model_written_code_needs_permission(tasks_dir, tmp_path):
    folder = tmp_path / "unsafe"
    shutil.copytree(tasks_dir, folder)
    yaml = (folder / "tiny_gen.yaml").read_text().replace("task: tiny_gen", "task: tiny_exec\nunsafe_code: true")
    (folder / "tiny_exec.yaml").write_text(yaml)
    good, tok = _rigged("y")
    with pytest.raises(PdcError, match=r"tiny_exec run\(s\) code the model writes: add allow_code_execution=true"):
        run_tasks(good, tok, [EvalTask("tiny_exec", 0)], folder)
    ok = run_tasks(good, tok, [EvalTask("tiny_exec", 0)], folder, allow_code_execution=True)
    assert ok["tiny_exec"].values["exact_match"] == 1.0


@pytest.mark.slow
def test_two_evaluation_processes_reproduce_one(tasks_dir, tmp_path):
    """torchrun with 2 ranks: each scores half of the requests and of the held-out blocks; rank 0
    gathers; every score equals the single-process one."""
    tok = make_tiny_tokenizer()
    dirs = {}
    for label, (letter, seed) in {"teacher": ("y", 0), "pruned": ("a", 1)}.items():
        model, _ = _rigged(letter, seed)
        model.save_pretrained(tmp_path / label)
        tok.save_pretrained(tmp_path / label)
        dirs[label] = tmp_path / label
    rows = np.random.default_rng(0).integers(3, 98, size=(7, 16)).astype(np.uint16)
    heldout = Blocks.open(write_rows(tmp_path / "heldout", rows))
    cfg = EvalConfig(tasks=(EvalTask("tiny_mc_norm", 0), EvalTask("tiny_gen", 0)))
    one = evaluate_models(dirs, lambda p: tok, cfg, tasks_dir, heldout, progress=False)
    two = evaluate_models(dirs, lambda p: tok, cfg, tasks_dir, heldout, progress=False,
                          launch=Launch(nproc_per_node=2), work_dir=tmp_path / "work")
    assert set(two.models) == set(one.models) and two.perplexity_tokens == one.perplexity_tokens == 7 * 16
    for label in one.models:
        a, b = one.models[label], two.models[label]
        assert b.perplexity == pytest.approx(a.perplexity, rel=1e-6)
        for task in ("tiny_mc_norm", "tiny_gen"):
            assert b.tasks[task].values == pytest.approx(a.tasks[task].values)
            assert b.tasks[task].items == a.tasks[task].items


@pytest.mark.slow
def test_two_processes_with_lm_evals_automatic_batch_size(tasks_dir, tmp_path, monkeypatch):
    """batch_size="auto", what a GPU evaluation runs: lm-eval's probe finds each rank's batch size
    and all-gathers it through pdc's gather (`_detect_batch_size` on the stack of a collective of
    every rank); the scores are the single-process ones at batch 8."""
    import json

    log = tmp_path / "collectives.jsonl"
    monkeypatch.setenv("PDC_COLLECTIVE_LOG", str(log))
    tok = make_tiny_tokenizer()
    model, _ = _rigged("y", 0)
    model.save_pretrained(tmp_path / "teacher")
    tok.save_pretrained(tmp_path / "teacher")
    dirs = {"teacher": tmp_path / "teacher"}
    cfg = EvalConfig(tasks=(EvalTask("tiny_mc_norm", 0),))
    one = evaluate_models(dirs, lambda p: tok, cfg, tasks_dir, None, progress=False, batch_size=8)
    two = evaluate_models(dirs, lambda p: tok, cfg, tasks_dir, None, progress=False, batch_size="auto",
                          launch=Launch(nproc_per_node=2), work_dir=tmp_path / "work")
    assert two.models["teacher"].tasks["tiny_mc_norm"].values == pytest.approx(one.models["teacher"].tasks["tiny_mc_norm"].values)
    probes = [r for r in map(json.loads, log.read_text().splitlines())
              if r["op"] == "all_gather" and "_detect_batch_size" in r.get("stack", [])]
    assert len({r["pid"] for r in probes}) == 2 and all(r["ok"] for r in probes)


def test_the_recipes_tasks_are_in_lm_evals_registry_offline():
    """The paper's benchmarks in specs/ name tasks lm-eval ships (its bundled registry, indexed
    offline), with the paper's shot counts; the ones that run model-written code are allowed."""
    from pdc.lang import load_spec
    from pdc.stages.lm_tasks import _builtin_task_names

    registry = _builtin_task_names()
    paper = {"winogrande": 5, "arc_challenge": 25, "mmlu": 5, "hellaswag": 10, "gsm8k": 5, "truthfulqa_mc2": 0,
             "mbpp": 0, "humaneval": 0}
    for path in sorted((Path(__file__).resolve().parents[1] / "specs").glob("*.pds")):
        evaluate = load_spec(path).stage("evaluate")
        assert {t.name: t.shots for t in evaluate.eval.tasks} == paper, path.name
        assert set(paper) <= registry and evaluate.eval.allow_code_execution
