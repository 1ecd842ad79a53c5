"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022): the
student matches the teacher's *relations* rather than its probabilities, by Pearson
correlation of the tempered softmaxes, across classes within each example (inter-class)
and across the examples of a batch within each class (intra-class).  Pure torch.

The formula follows the authors' code (hunto/DIST_KD, ``DIST``): ``T^2 * (beta * (1 -
mean Pearson over rows) + gamma * (1 - mean Pearson over columns))``.  It needs no labels,
so transfer examples take part like labelled ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, beta: float,
              gamma: float) -> torch.Tensor:
    t = temperature
    y_s, y_t = F.softmax(student_logits / t, dim=-1), F.softmax(teacher_logits / t, dim=-1)
    inter = 1 - _pearson_rows(y_s, y_t).mean()
    intra = 1 - _pearson_rows(y_s.T, y_t.T).mean()
    return t * t * (beta * inter + gamma * intra)
