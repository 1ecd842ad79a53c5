"""``dist_kd``: DIST (``meta.dist_kd``) against the frozen teacher, with cross-entropy on the
labelled examples; transfer examples take part in the relations."""

from __future__ import annotations

import torch
from torch import nn

from meta.dist_kd import dist_loss
from meta.distill import labelled_cross_entropy
from pipelines.config.students import DISTKDConfig
from pipelines.engine.loop import TrainResult
from pipelines.students.context import StudentContext
from pipelines.students.kd import FrozenTeacher


def dist_kd_loss(teacher: FrozenTeacher, cfg: DISTKDConfig):
    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        relations = dist_loss(logits, teacher(x, index), cfg.temperature, cfg.beta, cfg.gamma)
        return labelled_cross_entropy(logits, y) + relations

    return loss


def train_dist_kd(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student, teacher = ctx.new_student(), FrozenTeacher(ctx)
    result = ctx.teach(student, dist_kd_loss(teacher, ctx.dist_kd))
    result.seconds += teacher.seconds
    return student, result
