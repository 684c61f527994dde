"""Distillation losses: pure functions of student and teacher logits (formulas in the docstrings;
tests/test_distill.py checks them against hand-computed values)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tiaoyu_cli.train.losses.lm import cross_entropy

DIVERGENCES = ("forward", "reverse", "jsd")


def divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str = "forward") -> torch.Tensor:
    """Per-position divergence between two distributions given as log-probabilities over the last axis.

        forward  KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)        mean-seeking: q must cover all of p
        reverse  KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)        mode-seeking: q may drop p's small modes
        jsd      ½ KL(p ‖ m) + ½ KL(q ‖ m),  m = ½ (p + q)      symmetric, bounded by log 2

    p is the teacher, q the student. Returns a tensor of the leading shape (last axis summed out).
    Terms with probability 0 contribute 0 (0 · log 0 = 0).
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence {kind!r}: choose forward, reverse or jsd")
    p, q = log_p.exp(), log_q.exp()
    if kind == "forward":
        return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
    if kind == "reverse":
        return torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(-1)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    kl_pm = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_t mask_t · values_t / Σ_t mask_t (0 when nothing is masked in)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
            temperature: float = 1.0, divergence_kind: str = "forward") -> torch.Tensor:
    """Distillation term over the positions where mask = 1:

        p_t = softmax(z_teacher,t / T),  q_t = softmax(z_student,t / T)
        L_KD = T² · Σ_t mask_t · D(p_t ‖ q_t) / Σ_t mask_t

    Logits are [..., V] (e.g. [B, T, V]), mask [...] (1 = a response token, 0 = prompt/padding).
    The T² factor (Hinton et al., 2015) keeps the gradient scale of the soft term independent of
    T: softening by T shrinks the gradients by about 1/T², so multiplying by T² lets α mean the same
    thing at every temperature. D is `divergence(…, divergence_kind)`. Computed in fp32.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    t = float(temperature)
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    return (t * t) * _masked_mean(divergence(log_p, log_q, divergence_kind), mask)


def topk_kd_loss(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                 mask: torch.Tensor | None = None, temperature: float = 1.0,
                 divergence_kind: str = "forward") -> torch.Tensor:
    """`kd_loss` on the teacher's top-k support S_t (cached logits: values and token ids [..., k]).

        p̃_t = softmax(z_teacher,t[S_t] / T)        the teacher renormalised on its k best tokens
        q̃_t = softmax(z_student,t[S_t] / T)        the student renormalised on the same k tokens
        L = T² · Σ_t mask_t · D(p̃_t ‖ q̃_t) / Σ_t mask_t

    Both sides are renormalised on S_t, so the same formula works for all three divergences (a
    reverse KL against a teacher that is zero outside S_t would be infinite). With k = V it is
    exactly `kd_loss`. What it does not see is how much mass the student puts *outside* S_t; the
    CE term (α > 0) on the data token — almost always inside the teacher's top k — keeps that small.
    """
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    t = float(temperature)
    s = student_logits.float().gather(-1, teacher_indices.long())
    log_p = F.log_softmax(teacher_values.float() / t, dim=-1)
    log_q = F.log_softmax(s / t, dim=-1)
    return (t * t) * _masked_mean(divergence(log_p, log_q, divergence_kind), mask)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                 alpha: float = 0.5, temperature: float = 2.0, divergence_kind: str = "forward",
                 ignore_index: int = -100, teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """total = α · CE(z_student, y) + (1 − α) · L_KD, over positions whose target y ≠ ignore_index.

    CE is the ordinary next-token cross-entropy on the data (hard labels, temperature 1); L_KD is
    `kd_loss` (full teacher logits) or `topk_kd_loss` (teacher_topk = (values, indices)). Returns
    (total, ce, kd). α = 1 is plain SFT/pretraining; α = 0 learns from the teacher alone.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    mask = targets != ignore_index
    ce = cross_entropy(student_logits, targets, ignore_index)
    if not bool(mask.any()):
        ce = student_logits.float().sum() * 0.0  # no response token in the batch: a zero with a gradient path
    if alpha == 1.0:
        return ce, ce, torch.zeros_like(ce)
    if teacher_topk is not None:
        kd = topk_kd_loss(student_logits, teacher_topk[0], teacher_topk[1], mask, temperature, divergence_kind)
    else:
        kd = kd_loss(student_logits, teacher_logits, mask, temperature, divergence_kind)
    return alpha * ce + (1.0 - alpha) * kd, ce, kd
