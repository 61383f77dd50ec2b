"""lm-eval on in-memory models with local tasks (no network), and the comparison table."""

from __future__ import annotations

import json
import math

import pytest

from pdc.errors import PdcError
from pdc.stages.evaluate import comparison_table, evaluate_model, evaluate_models, write_results
from pdc.stages.lm_tasks import run_tasks, task_accuracy
from pdc.lang.settings import EvalConfig, EvalTask
from conftest import make_tiny_tokenizer
from eval_support import make_tiny_model_for_tasks, rig_to_prefer, write_mc_task


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    return write_mc_task(tmp_path_factory.mktemp("tasks"))


def test_random_model_accuracy_is_a_fraction(tasks_dir):
    model, tok = make_tiny_model_for_tasks("llama"), make_tiny_tokenizer()
    acc = task_accuracy(model, tok, "tiny_mc", shots=0, tasks_dir=tasks_dir)
    assert 0.0 <= acc <= 1.0
    # 6 questions: accuracy is a multiple of 1/6
    assert math.isclose(acc * 6, round(acc * 6), abs_tol=1e-9)


@pytest.mark.parametrize("shots", [0, 1])
def test_rigged_model_scores_exactly_one_and_anti_rigged_zero(tasks_dir, shots):
    """A head that always predicts "y" picks the right choice everywhere; one predicting "a" never
    does. Checks that lm-eval's gold index, our choice of metric and shots wiring agree."""
    tok = make_tiny_tokenizer()
    good = rig_to_prefer(make_tiny_model_for_tasks("qwen2"), tok.convert_tokens_to_ids("y"))
    bad = rig_to_prefer(make_tiny_model_for_tasks("qwen2"), tok.convert_tokens_to_ids("a"))
    assert task_accuracy(good, tok, "tiny_mc", shots=shots, tasks_dir=tasks_dir) == 1.0
    assert task_accuracy(bad, tok, "tiny_mc", shots=shots, tasks_dir=tasks_dir) == 0.0


def test_limit_restricts_examples(tasks_dir, capfd):
    tok = make_tiny_tokenizer()
    good = rig_to_prefer(make_tiny_model_for_tasks("llama"), tok.convert_tokens_to_ids("y"))
    res = run_tasks(good, tok, [EvalTask("tiny_mc", 0)], tasks_dir, limit=2)
    assert res["tiny_mc"].values["acc"] == 1.0 and res["tiny_mc"].shots == 0 and res["tiny_mc"].items == 2
    # the task folder is no git repository: lm-eval's `git describe` must not reach the terminal
    assert "not a git repository" not in capfd.readouterr().err


def test_unknown_task_is_one_line_pdc_error(tasks_dir):
    with pytest.raises(PdcError) as err:
        task_accuracy(make_tiny_model_for_tasks("llama"), make_tiny_tokenizer(), "tiny_mcq_nonexistent", 0, tasks_dir)
    assert err.value.stage == "evaluate"
    assert "unknown lm-eval task 'tiny_mcq_nonexistent'" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_task_no_longer_bundled_says_why(tasks_dir):
    """A task of the bigbench-built releases is named as retired, not as a typo."""
    with pytest.raises(PdcError, match=r"task 'social_iqa_local' is no longer bundled: .*bigbench 1.0.0") as err:
        task_accuracy(make_tiny_model_for_tasks("llama"), make_tiny_tokenizer(), "social_iqa_local", 0, tasks_dir)
    assert "\n" not in str(err.value)


def test_missing_tasks_dir_is_pdc_error(tmp_path):
    with pytest.raises(PdcError, match="task folder not found"):
        task_accuracy(make_tiny_model_for_tasks("llama"), make_tiny_tokenizer(), "tiny_mc", 0, tmp_path / "nope")


def test_evaluate_model_scores_a_rigged_model_exactly(tasks_dir):
    """A model rigged to answer "y" scores 100 % with zero standard error; perplexity is finite."""
    import torch

    tok = make_tiny_tokenizer()
    blocks = torch.randint(3, 98, (3, 16), generator=torch.Generator().manual_seed(0))
    cfg = EvalConfig(tasks=(EvalTask("tiny_mc", 0),))
    good = rig_to_prefer(make_tiny_model_for_tasks("llama"), tok.convert_tokens_to_ids("y"))
    scores = evaluate_model(good, tok, cfg, "rigged", tasks_dir=tasks_dir, heldout_blocks=blocks, progress=False)
    score = scores.tasks["tiny_mc"]
    assert score.values["acc"] == 1.0 and score.stderr["acc"] == 0.0 and score.primary == "acc"
    assert math.isfinite(scores.perplexity) and scores.perplexity > 1.0


def test_evaluate_models_and_results_files(tasks_dir, tmp_path):
    """evaluate_models (what the evaluate stage runs) loads each model directory, skips columns
    without a checkpoint; results.json reads back as the same typed result; the table follows it."""
    import torch

    from pdc.plan.results import EvaluateResult, decode

    tok = make_tiny_tokenizer()
    blocks = torch.randint(3, 98, (3, 16), generator=torch.Generator().manual_seed(0))
    cfg = EvalConfig(tasks=(EvalTask("tiny_mc", 0),))
    dirs = {"teacher": tmp_path / "teacher", "pruned": tmp_path / "pruned", "distilled": tmp_path / "not-built"}
    for seed, label in enumerate(("teacher", "pruned")):
        make_tiny_model_for_tasks("llama", seed=seed).save_pretrained(dirs[label])
    result = evaluate_models(dirs, lambda path: tok, cfg, tasks_dir, blocks, progress=False)
    assert list(result.models) == ["teacher", "pruned"]
    assert result.models["teacher"].perplexity != result.models["pruned"].perplexity
    assert result.perplexity_tokens == blocks.numel()
    path = write_results(result, tmp_path / "evaluate")
    assert decode(EvaluateResult, json.loads(path.read_text())) == result
    table = comparison_table(result)
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | teacher | pruned |"
    assert lines[3].startswith("| tiny_mc (0-shot) acc % |")
    assert (tmp_path / "evaluate" / "table.md").read_text() == table


def test_comparison_table_orders_columns_like_the_paper():
    from pdc.plan.results import EvaluateResult, ModelScores, TaskScore

    t = lambda acc, err: TaskScore(shots=5, primary="acc", values={"acc": acc}, stderr=err)  # noqa: E731
    res = EvaluateResult(models={
        "distilled": ModelScores("d", 3.0, {"t": t(0.5, {})}),
        "teacher": ModelScores("t", 2.0, {"t": t(0.75, {"acc": 0.01})}),
        "pruned": ModelScores("p", None, {}),
    }, limit=None)
    lines = comparison_table(res).strip().splitlines()
    assert lines[0] == "| metric | teacher | pruned | distilled |"
    assert lines[2] == "| perplexity (held-out) | 2.000 | - | 3.000 |"
    assert lines[3] == "| t (5-shot) acc % | 75.0 ± 1.0 | - | 50.0 |"
