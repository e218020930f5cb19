"""Knowledge-distillation loss (Hinton et al. 2015): a student matches a teacher's softened distribution.

    from fm.train.distill import distill_loss
    loss, kd_loss, ce_loss = distill_loss(student_logits, teacher_logits, targets, temperature=2.0, alpha=0.5)

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)

Both terms are means over the tokens whose target is not ignore_index. The T^2 keeps the KD
gradient's scale independent of T: d/ds of KL at temperature T is (softmax(s/T) - softmax(t/T)) / T,
and for large T that difference itself shrinks like 1/T. The teacher gets no gradient (it is
detached). A loss, not a recipe: the caller runs both models and owns the loop.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DistillLoss(NamedTuple):
    loss: torch.Tensor  # scalar: alpha * kd_loss + (1 - alpha) * ce_loss, what to backpropagate
    kd_loss: torch.Tensor  # scalar: T^2 * mean KL(teacher || student) at temperature T
    ce_loss: torch.Tensor  # scalar: mean cross-entropy of the student at temperature 1


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float, alpha: float, ignore_index: int = -100) -> DistillLoss:
    """KD + CE over the non-ignored tokens; logits (..., V), targets (...) with the same leading shape."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != targets.shape:
        raise ValueError(f"shapes disagree: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)}, targets {tuple(targets.shape)}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits: softmax in fp32
    student = student_logits.reshape(-1, student_logits.shape[-1]).to(dtype)  # (N, V)
    teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1]).to(dtype)  # (N, V)
    targets = targets.reshape(-1)  # (N,)
    keep = targets != ignore_index  # (N,)
    n_kept = keep.sum().clamp(min=1)  # all ignored: both terms are 0, not nan

    log_p_student = F.log_softmax(student / temperature, dim=-1)  # (N, V)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=-1)  # (N, V)
    p_teacher = log_p_teacher.exp()  # (N, V)
    # where p_teacher is 0 (a -inf teacher logit) the term is 0, not 0 * (-inf - x) = nan
    kl = (p_teacher * (log_p_teacher - log_p_student)).where(p_teacher > 0, 0.0).sum(dim=-1)  # (N,) nats
    kd_loss = temperature ** 2 * kl.where(keep, 0.0).sum() / n_kept
    ce_loss = F.cross_entropy(student, targets, ignore_index=ignore_index, reduction="sum") / n_kept
    return DistillLoss(alpha * kd_loss + (1 - alpha) * ce_loss, kd_loss, ce_loss)
