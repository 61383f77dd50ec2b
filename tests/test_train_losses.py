"""Distillation losses: KL invariants (zero at equality, positive otherwise, top-k, temperature)."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from pdc.lang.settings import TrainConfig
from pdc.stages.train.losses import distill_loss, kl_divergence, lm_loss


def _logits(seed: int, shape=(2, 5, 17), scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.floats(0.5, 4.0),
       direction=st.sampled_from(["kl_forward", "kl_reverse"]), top_k=st.sampled_from([None, 1, 4, 17]))
def test_kl_is_zero_when_student_equals_teacher(seed, temperature, direction, top_k):
    """KL(p || p) = 0 for every direction, temperature and top-k."""
    t = _logits(seed)
    assert kl_divergence(t.clone(), t, direction, temperature, top_k).abs().item() < 1e-5


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), direction=st.sampled_from(["kl_forward", "kl_reverse"]))
def test_kl_is_positive_when_distributions_differ(seed, direction):
    """Gibbs' inequality: KL > 0 for different distributions."""
    assert kl_divergence(_logits(seed), _logits(seed + 1), direction).item() > 1e-4


def test_forward_kl_matches_definition_and_differs_from_reverse():
    s, t = _logits(1), _logits(2)
    p_t, p_s = t.softmax(-1), s.softmax(-1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
    assert torch.allclose(kl_divergence(s, t, "kl_forward"), expected, atol=1e-5)
    assert not torch.allclose(kl_divergence(s, t, "kl_forward"), kl_divergence(s, t, "kl_reverse"), atol=1e-3)


def test_top_k_uses_only_the_teachers_top_tokens_renormalised():
    """With k = vocab the top-k KL equals the full KL; with k < vocab it only depends on the
    teacher's top-k entries (changing the student elsewhere does not change it)."""
    s, t = _logits(3), _logits(4)
    assert torch.allclose(kl_divergence(s, t, top_k=17), kl_divergence(s, t), atol=1e-5)
    k = 4
    top = t.topk(k, dim=-1).indices
    mask = torch.ones_like(s, dtype=torch.bool).scatter_(-1, top, False)
    s2 = s.masked_fill(mask, -5.0)  # move the student's non-top-k logits
    assert torch.allclose(kl_divergence(s, t, top_k=k), kl_divergence(s2, t, top_k=k), atol=1e-6)
    # Renormalised over k tokens: equal to KL of the k-way softmaxes.
    ts, ss = t.gather(-1, top).softmax(-1), s.gather(-1, top).softmax(-1)
    expected = (ts * (ts.log() - ss.log())).sum(-1).mean()
    assert torch.allclose(kl_divergence(s, t, top_k=k), expected, atol=1e-5)


def test_ce_weight_adds_the_language_model_loss():
    s, t = _logits(5), _logits(6)
    ids = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(0))
    plain, kl = distill_loss(s, t, ids, TrainConfig())
    mixed, kl2 = distill_loss(s, t, ids, TrainConfig(ce_weight=0.5))
    assert torch.allclose(plain, kl) and torch.allclose(kl, kl2)
    assert torch.allclose(mixed, kl + 0.5 * lm_loss(s, ids), atol=1e-6)


def test_distill_loss_gradient_vanishes_at_the_teacher():
    """At student == teacher the forward-KL gradient is zero (the minimum)."""
    t = _logits(7)
    s = t.clone().requires_grad_(True)
    loss, _ = distill_loss(s, t, torch.zeros(2, 5, dtype=torch.long), TrainConfig())
    loss.backward()
    assert s.grad.abs().max().item() < 1e-6
