"""Real-model evaluation (slow): SmolLM2-135M-Instruct on held-out wiki and movie_recommendation_local."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(real_assets):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = real_assets["smollm2"]
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(d)


def test_smollm2_heldout_perplexity_far_below_uniform(smollm2):
    """A trained model predicts held-out English far better than a uniform guess over the vocab."""
    from pdc.stages.evaluate import builtin_heldout_blocks, perplexity

    model, tok = smollm2
    ppl = perplexity(model, builtin_heldout_blocks(tok, 128, n_blocks=4))
    assert 1.0 < ppl < len(tok) ** 0.5


def test_smollm2_movie_recommendation_local_through_lm_eval(smollm2):
    from pdc.inputs.assets import local_tasks_dir
    from pdc.stages.lm_tasks import run_tasks
    from pdc.lang.settings import EvalTask

    model, tok = smollm2
    res = run_tasks(model, tok, [EvalTask("movie_recommendation_local", 1)], local_tasks_dir(), limit=12)["movie_recommendation_local"]
    assert res.shots == 1 and res.items == 12 and res.primary == "acc"
    assert set(res.values) >= {"acc", "acc_norm"} and res.stderr["acc"] > 0
