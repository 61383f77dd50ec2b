"""Perplexity is exp of the token-weighted mean next-token NLL, independent of batching."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import make_tiny_model
from pdc.errors import PdcError
from pdc.stages.evaluate import mean_nll, nll_sum, perplexity

MODEL = make_tiny_model("llama")


def _blocks(n, length, seed=0):
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _manual_mean_nll(model, blocks):
    """Reference: one block at a time, one position at a time, log-softmax by hand."""
    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            logits = model(input_ids=block[None]).logits[0].double()
            for pos in range(len(block) - 1):
                row = logits[pos]
                log_z = torch.log(torch.exp(row - row.max()).sum()) + row.max()
                total += float(log_z - row[block[pos + 1]])
                count += 1
    return total / count


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_perplexity_is_exp_of_manual_mean_nll(family):
    model = make_tiny_model(family)
    blocks = _blocks(5, 12)
    ref = _manual_mean_nll(model, blocks)
    assert math.isclose(perplexity(model, blocks, batch_size=2), math.exp(ref), rel_tol=1e-5)


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 5), length=st.integers(2, 10), batch_size=st.integers(1, 6), seed=st.integers(0, 99))
def test_nll_sum_independent_of_batch_size_and_counts_predictions(n, length, batch_size, seed):
    """sum and count do not depend on batching; every block contributes length-1 predictions."""
    blocks = _blocks(n, length, seed)
    total_b, count_b = nll_sum(MODEL, blocks, batch_size=batch_size)
    total_1, count_1 = nll_sum(MODEL, blocks, batch_size=n)
    assert count_b == count_1 == n * (length - 1)
    assert math.isclose(total_b, total_1, rel_tol=1e-5)


def test_token_weighting_matches_concatenated_mean():
    """The mean over two block sets is the token-weighted mean of their separate means."""
    a, b = _blocks(2, 9, seed=1), _blocks(3, 9, seed=2)
    both = mean_nll(MODEL, torch.cat([a, b]))
    weighted = (mean_nll(MODEL, a) * 2 + mean_nll(MODEL, b) * 3) / 5
    assert math.isclose(both, weighted, rel_tol=1e-6)


def test_perplexity_restores_training_mode():
    model = make_tiny_model("llama").train()
    perplexity(model, _blocks(1, 4))
    assert model.training


@pytest.mark.parametrize("shape", [(3,), (2, 1), (0, 8)])
def test_bad_blocks_are_pdc_errors(shape):
    with pytest.raises(PdcError):
        perplexity(MODEL, torch.zeros(shape, dtype=torch.long))
