"""Knowledge-distillation losses (Hinton et al. 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, temperature: float, alpha: float,
                      soft_loss: str = "kl") -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    ``soft_loss="mse"`` replaces the KL term by the mean squared error between the two
    tempered probability vectors (summed over classes, averaged over the batch), scaled
    by ``T^2`` as well so ``alpha`` keeps its meaning.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    if soft_loss == "kl":
        log_p_teacher = F.log_softmax(teacher_logits / t, dim=-1)
        soft = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    elif soft_loss == "mse":
        diff = log_p_student.exp() - F.softmax(teacher_logits / t, dim=-1)
        soft = diff.pow(2).sum(-1).mean()
    else:
        raise ValueError(f"soft_loss must be 'kl' or 'mse', got {soft_loss!r}")
    hard = F.cross_entropy(student_logits, labels)
    return alpha * t * t * soft + (1.0 - alpha) * hard
