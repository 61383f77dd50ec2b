"""Distillation losses: KL invariants (zero at equality, positive otherwise, top-k, temperature)."""

from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from pdc.lang.settings import TrainConfig
from pdc.stages.train.losses import cached_kl, distill_loss, kl_divergence, lm_loss


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


# ---- from a teacher cache: top k + one tail bucket ---------------------------------------------
def _cached(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """What the teacher pass stores for these logits (`teacher_topk`, through a stand-in model)."""
    from pdc.stages.teacher_logits import teacher_topk

    class Fixed(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": teacher_logits})()

    ids = torch.zeros(teacher_logits.shape[:-1], dtype=torch.long)
    lp, ix, tail, _ = teacher_topk(Fixed(), ids, k, temperature)
    return lp, ix, tail


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), direction=st.sampled_from(["kl_forward", "kl_reverse"]),
       temperature=st.sampled_from([1.0, 2.0]))
def test_cached_kl_with_the_whole_vocabulary_is_the_full_kl(seed, direction, temperature):
    """k = vocabulary: the tail is empty and the bucketed KL is the online one."""
    s, t = _logits(seed), _logits(seed + 1)
    full = kl_divergence(s, t, direction, temperature)
    assert torch.allclose(cached_kl(s, *_cached(t, t.shape[-1], temperature), direction, temperature), full,
                          atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 16))
def test_cached_kl_is_a_lower_bound_and_zero_at_the_teacher(seed, k):
    """Coarse-graining onto top k + tail never raises the KL; student == teacher gives 0."""
    s, t = _logits(seed), _logits(seed + 1)
    for direction in ("kl_forward", "kl_reverse"):
        bucketed = cached_kl(s, *_cached(t, k), direction)
        assert bucketed <= kl_divergence(s, t, direction) + 1e-6
        assert abs(cached_kl(t, *_cached(t, k), direction)) < 1e-5


def test_cached_forward_kl_gradient_is_exact_on_the_stored_support():
    """d KL / d z_v = q_v - p_v for every token v in the teacher's top k, as with the full KL;
    outside it the tail bucket spreads the teacher's remaining mass like the student's."""
    s, t = _logits(3), _logits(4)
    k = 5
    lp, ix, tail = _cached(t, k)
    s1 = s.clone().requires_grad_(True)
    g_cached, = torch.autograd.grad(cached_kl(s1, lp, ix, tail), s1)
    s2 = s.clone().requires_grad_(True)
    g_full, = torch.autograd.grad(kl_divergence(s2, t), s2)
    assert torch.allclose(g_cached.gather(-1, ix), g_full.gather(-1, ix), atol=1e-6)
    assert not torch.allclose(g_cached, g_full, atol=1e-6)  # the tail really is one bucket


def test_cached_top_k_renormalised_equals_online_top_k():
    """`top_k` set: the cache (k = top_k) gives the same renormalised top-k KL as the teacher online."""
    s, t = _logits(5), _logits(6)
    cfg = TrainConfig(top_k=4, temperature=2.0)
    online, _ = distill_loss(s, t, torch.zeros(2, 5, dtype=torch.long), cfg)
    lp, ix, tail = _cached(t, 4, 2.0)
    cached = cached_kl(s, lp, ix, tail, "kl_forward", 2.0, renormalise=True)
    assert torch.allclose(cached, online, atol=1e-5)
