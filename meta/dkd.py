"""Decoupled knowledge distillation (DKD; Zhao et al., CVPR 2022): the KD loss split into a
target-class term (TCKD: the binary "target or not" distributions) and a non-target term
(NCKD: the distributions over the other classes), weighted separately.  Pure torch.

The formula follows the authors' mdistiller (``dkd_loss``): both terms are KL divergences of
tempered softmaxes, scaled by ``T^2`` and averaged over the batch; the non-target
distribution is the softmax with the target logit masked out.  Transfer examples, which
have no label, take the teacher's top class as their target (an extension: DKD is defined
on labelled data).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
             temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * TCKD + beta * NCKD`` of a batch; ``target`` holds one class per example."""
    t = temperature
    gt = F.one_hot(target, student_logits.shape[-1]).bool()
    p_student, p_teacher = F.softmax(student_logits / t, dim=-1), F.softmax(teacher_logits / t, dim=-1)
    # TCKD: KL between the binary distributions (p_target, 1 - p_target).
    b_student = torch.stack([(p_student * gt).sum(-1), (p_student * ~gt).sum(-1)], dim=-1)
    b_teacher = torch.stack([(p_teacher * gt).sum(-1), (p_teacher * ~gt).sum(-1)], dim=-1)
    tckd = F.kl_div(b_student.clamp_min(1e-12).log(), b_teacher, reduction="batchmean")
    # NCKD: KL between the distributions over the non-target classes (the target masked out,
    # as mdistiller does, by subtracting a large constant from its logit).
    masked = 1000.0 * gt
    nckd = F.kl_div(F.log_softmax(student_logits / t - masked, dim=-1), F.softmax(teacher_logits / t - masked, dim=-1),
                    reduction="batchmean")
    return t * t * (alpha * tckd + beta * nckd)
