"""lm-eval on in-memory models with local tasks (no network), and the comparison table."""

from __future__ import annotations

import json
import math

import pytest

from pdc.errors import PdcError
from pdc.evaluate import comparison_table, evaluate_model, run_tasks, task_accuracy, write_results
from pdc.stages import EvalConfig, EvalTask
from conftest import make_tiny_tokenizer
from test_eval_support import make_tiny_model_for_tasks, rig_to_prefer, write_mc_task


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


def test_limit_restricts_examples(tasks_dir):
    tok = make_tiny_tokenizer()
    good = rig_to_prefer(make_tiny_model_for_tasks("llama"), tok.convert_tokens_to_ids("y"))
    res = run_tasks(good, tok, [EvalTask("tiny_mc", 0)], tasks_dir, limit=2)
    assert res["tiny_mc"]["acc"] == 1.0 and res["tiny_mc"]["shots"] == 0


def test_unknown_task_is_one_line_pdc_error(tasks_dir):
    with pytest.raises(PdcError) as err:
        task_accuracy(make_tiny_model_for_tasks("llama"), make_tiny_tokenizer(), "tiny_mcq_nonexistent", 0, tasks_dir)
    assert err.value.stage == "evaluate"
    assert "unknown lm-eval task 'tiny_mcq_nonexistent'" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_tasks_dir_is_pdc_error(tmp_path):
    with pytest.raises(PdcError, match="task folder not found"):
        task_accuracy(make_tiny_model_for_tasks("llama"), make_tiny_tokenizer(), "tiny_mc", 0, tmp_path / "nope")


def test_evaluate_model_and_results_files(tasks_dir, tmp_path):
    import torch

    tok = make_tiny_tokenizer()
    blocks = torch.randint(3, 98, (3, 16), generator=torch.Generator().manual_seed(0))
    cfg = EvalConfig(tasks=(EvalTask("tiny_mc", 0),))
    results = {}
    for label, model in (
        ("teacher", rig_to_prefer(make_tiny_model_for_tasks("llama"), tok.convert_tokens_to_ids("y"))),
        ("pruned", make_tiny_model_for_tasks("llama", seed=1)),
    ):
        results[label] = evaluate_model(model, tok, cfg, tasks_dir=tasks_dir, heldout_blocks=blocks, progress=False)
    assert results["teacher"]["tasks"]["tiny_mc"]["acc"] == 1.0
    assert results["teacher"]["tasks"]["tiny_mc"]["acc_stderr"] == 0.0
    assert all(r["perplexity"] > 1.0 for r in results.values())
    path = write_results(results, tmp_path / "evaluate")
    assert json.loads(path.read_text()) == results
    table = comparison_table(results)
    lines = table.strip().splitlines()
    assert lines[0] == "| metric | teacher | pruned |"
    assert any(l.startswith("| tiny_mc (0-shot) acc % | 100.00 ± 0.00 |") for l in lines)
    assert (tmp_path / "evaluate" / "table.md").read_text() == table
    assert sorted(p.name for p in (tmp_path / "evaluate").iterdir()) == ["results.json", "table.md"]


def test_comparison_table_orders_columns_like_the_paper():
    res = {
        "distilled": {"perplexity": 3.0, "tasks": {"t": {"acc": 0.5, "acc_stderr": None, "shots": 5}}},
        "teacher": {"perplexity": 2.0, "tasks": {"t": {"acc": 0.75, "acc_stderr": 0.01, "shots": 5}}},
        "pruned": {"perplexity": None, "tasks": {}},
    }
    lines = comparison_table(res).strip().splitlines()
    assert lines[0] == "| metric | teacher | pruned | distilled |"
    assert lines[2] == "| perplexity (held-out) | 2.000 | - | 3.000 |"
    assert lines[3] == "| t (5-shot) acc % | 75.00 ± 1.00 | - | 50.00 |"
