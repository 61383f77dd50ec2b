"""Real-model evaluation (slow): SmolLM2-135M-Instruct on held-out wiki and social_iqa_local."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdc.assets import smollm2_dir

    try:
        d = smollm2_dir()
    except Exception as exc:  # assets not installed: `pdc setup`
        pytest.skip(f"SmolLM2 not installed: {exc}")
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(d)


def test_smollm2_heldout_perplexity_far_below_uniform(smollm2):
    """A trained model predicts held-out English far better than a uniform guess over the vocab."""
    from pdc.evaluate import builtin_heldout_blocks, perplexity

    model, tok = smollm2
    ppl = perplexity(model, builtin_heldout_blocks(tok, 128, n_blocks=4))
    assert 1.0 < ppl < len(tok) ** 0.5


def test_smollm2_social_iqa_local_through_lm_eval(smollm2):
    from pdc.assets import local_tasks_dir
    from pdc.evaluate import run_tasks
    from pdc.stages import EvalTask

    model, tok = smollm2
    res = run_tasks(model, tok, [EvalTask("social_iqa_local", 1)], local_tasks_dir(), limit=12)["social_iqa_local"]
    assert 0.0 <= res["acc"] <= 1.0 and res["shots"] == 1
    assert res["acc_stderr"] is not None and "acc_norm" in res
