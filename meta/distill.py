"""Knowledge-distillation losses (Hinton et al. 2015), with unlabeled transfer examples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNLABELED = -1  # the label of a transfer example: it has none


def soft_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float | torch.Tensor,
               soft_loss: str = "kl") -> torch.Tensor:
    """Per-example soft loss between the tempered distributions (not yet scaled by ``T^2``)."""
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    if soft_loss == "kl":
        log_p_teacher = F.log_softmax(teacher_logits / t, dim=-1)
        return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    if soft_loss == "mse":
        return (log_p_student.exp() - F.softmax(teacher_logits / t, dim=-1)).pow(2).sum(-1)
    raise ValueError(f"soft_loss must be 'kl' or 'mse', got {soft_loss!r}")


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weight: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Cross-entropy averaged over the labelled examples (per-example ``weight``); transfer
    examples (label :data:`UNLABELED`) add nothing."""
    labelled = labels >= 0
    hard = F.cross_entropy(logits, labels.clamp(min=0), reduction="none") * labelled
    return (weight * hard).sum() / labelled.sum().clamp(min=1)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, temperature: float | torch.Tensor, alpha: float | torch.Tensor,
                      soft_loss: str = "kl") -> torch.Tensor:
    """``T^2 * mean_i(alpha_i * soft_i) + mean_{labelled i}((1 - alpha_i) * CE_i)``.

    ``soft_i`` is ``KL(teacher_T || student_T)`` of example i (``soft_loss="mse"``: the
    squared error between the two tempered probability vectors, summed over classes).
    ``alpha`` is a number or one weight per example.  Examples whose label is negative
    (:data:`UNLABELED`, the transfer split) contribute their soft term only: with every
    example labelled and a scalar ``alpha`` this is Hinton's
    ``alpha * T^2 * KL + (1 - alpha) * CE``.
    """
    t = temperature
    soft = soft_terms(student_logits, teacher_logits, t, soft_loss)
    return t * t * (alpha * soft).mean() + labelled_cross_entropy(student_logits, labels, 1.0 - alpha)
