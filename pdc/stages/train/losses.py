"""Distillation and language-modelling losses.

All losses are means over token positions (every position of a packed block counts; blocks have
equal length, so the mean of per-micro-batch means equals the global-batch mean -- this is what
makes 1-process and N-process runs with the same global batch agree).

Distillation (Minitron: logit-only, forward KL, no cross-entropy by default):
  kl_forward  KL(p_teacher || p_student) = sum_v p_T (log p_T - log p_S)
  kl_reverse  KL(p_student || p_teacher)
Logits are divided by `temperature` and the KL multiplied by temperature**2 (Hinton et al.), so
the gradient scale does not depend on the temperature. With `top_k`, both distributions are
restricted to the teacher's top-k tokens at each position and renormalised there.
Invariant: the KL is exactly zero when student logits == teacher logits.
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
    log_s = F.log_softmax(s, dim=-1)
    log_t = F.log_softmax(t, dim=-1)
    if direction == "kl_forward":
        per_pos = (log_t.exp() * (log_t - log_s)).sum(-1)
    elif direction == "kl_reverse":
        per_pos = (log_s.exp() * (log_s - log_t)).sum(-1)
    else:
        raise ValueError(f"unknown distillation loss {direction!r}")
    return per_pos.mean() * temperature**2


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, input_ids: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, the KL term alone): KL + ce_weight * CE(student, next token)."""
    kl = kl_divergence(student_logits, teacher_logits, cfg.loss, cfg.temperature, cfg.top_k)
    loss = kl
    if cfg.ce_weight:
        loss = loss + cfg.ce_weight * lm_loss(student_logits, input_ids)
    return loss, kl.detach()
