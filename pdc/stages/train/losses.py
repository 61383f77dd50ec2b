"""Distillation and language-modelling losses.

All losses are means over token positions (every position of a packed block counts; blocks have
equal length, so the mean of per-micro-batch means equals the global-batch mean -- this is what
makes 1-process and N-process runs with the same global batch agree).

Distillation (Minitron: logit-only, forward KL, no cross-entropy by default):
  kl_forward  KL(p_teacher || p_student) = sum_v p_T (log p_T - log p_S)
  kl_reverse  KL(p_student || p_teacher)
  ce          next-token cross-entropy alone (no teacher: the ablation)
Logits are divided by `temperature` and the KL multiplied by temperature**2 (Hinton et al.), so
the gradient scale does not depend on the temperature. With `top_k`, both distributions are
restricted to the teacher's top-k tokens at each position and renormalised there.
Invariant: the KL is exactly zero when student logits == teacher logits.

From a teacher cache (`pdc.inputs.teacher_cache`: the teacher's top-k log-probabilities and the
log of the mass outside them), `cached_kl` computes the same KL over k + 1 outcomes: the top-k
tokens and one *tail bucket* holding the rest of the vocabulary, whose student probability is the
student's exact mass outside the teacher's top k. This is the KL between the two distributions
coarse-grained onto those outcomes, so it never exceeds the full KL and equals it when the tail is
empty (k = vocabulary). Its gradient with respect to a student logit in the top k is exactly the
full KL's (q_v - p_v, forward); in the tail it is q_v (1 - p_tail / q_tail), i.e. it assumes the
teacher spreads its tail mass like the student does. With `top_k` set (the cache's k equals it),
the tail is dropped and both sides are renormalised on the top k, as online.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdc.lang.settings import TrainConfig


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, mean over the predicted positions."""
    vocab = logits.shape[-1]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).float(), input_ids[:, 1:].reshape(-1)
    )


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, direction: str) -> torch.Tensor:
    """Per-position KL over the last axis: forward KL(p || q) or reverse KL(q || p)."""
    if direction == "kl_forward":
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if direction == "kl_reverse":
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    raise ValueError(f"unknown distillation loss {direction!r}")


def kl_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    direction: str = "kl_forward",
    temperature: float = 1.0,
    top_k: int | None = None,
) -> torch.Tensor:
    """Mean over positions of KL between the teacher's and the student's next-token distributions."""
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    if top_k is not None and top_k < t.shape[-1]:
        idx = t.topk(top_k, dim=-1).indices
        s = s.gather(-1, idx)
        t = t.gather(-1, idx)
    return _kl(F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1), direction).mean() * temperature**2


def cached_kl(
    student_logits: torch.Tensor,
    logprobs: torch.Tensor,
    indices: torch.Tensor,
    tail: torch.Tensor,
    direction: str = "kl_forward",
    temperature: float = 1.0,
    renormalise: bool = False,
) -> torch.Tensor:
    """Mean over positions of the KL between the cached teacher distribution (`logprobs`, `indices`:
    [B, L, k] log p_T of its top-k tokens; `tail`: [B, L] log of the mass outside them, all at
    `temperature`) and the student's, over the top-k tokens plus one tail bucket; with
    `renormalise`, over the top-k tokens alone, both renormalised there (the online `top_k`)."""
    s = student_logits.float() / temperature
    log_p = logprobs.float()
    if renormalise:
        log_q = F.log_softmax(s.gather(-1, indices), dim=-1)
        return _kl(F.log_softmax(log_p, dim=-1), log_q, direction).mean() * temperature**2
    log_z = torch.logsumexp(s, dim=-1, keepdim=True)
    log_q = s.gather(-1, indices) - log_z
    if indices.shape[-1] < s.shape[-1]:
        # the student's exact tail mass: log-sum-exp over the logits outside the teacher's top k
        log_q_tail = torch.logsumexp(s.scatter(-1, indices, float("-inf")), dim=-1, keepdim=True) - log_z
        log_p = torch.cat([log_p, tail.float().unsqueeze(-1)], dim=-1)
        log_q = torch.cat([log_q, log_q_tail], dim=-1)
    return _kl(log_p, log_q, direction).mean() * temperature**2


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, the KL term alone): KL + ce_weight * CE(student, next token)."""
    kl = kl_divergence(student_logits, teacher_logits, cfg.loss, cfg.temperature, cfg.top_k)
    return _with_ce(kl, student_logits, input_ids, cfg)


def cached_distill_loss(
    student_logits: torch.Tensor, cached, input_ids: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """`distill_loss` with the teacher's distribution read from its cache (`cached`: tensors
    logprobs, indices, tail as `cached_kl` takes them)."""
    kl = cached_kl(student_logits, cached.logprobs, cached.indices, cached.tail, cfg.loss, cfg.temperature,
                   renormalise=cfg.top_k is not None)
    return _with_ce(kl, student_logits, input_ids, cfg)


def _with_ce(kl: torch.Tensor, student_logits: torch.Tensor, input_ids: torch.Tensor, cfg: TrainConfig):
    loss = kl
    if cfg.ce_weight:
        loss = loss + cfg.ce_weight * lm_loss(student_logits, input_ids)
    return loss, kl.detach()
