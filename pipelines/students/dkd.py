"""``dkd``: decoupled knowledge distillation (``meta.dkd``) against the frozen teacher, with
cross-entropy on the labelled examples and the authors' linear warm-up of the DKD term."""

from __future__ import annotations

import torch
from torch import nn

from meta.distill import labelled_cross_entropy
from meta.dkd import dkd_loss
from pipelines.config.students import DKDConfig
from pipelines.engine.loop import StepHook, TrainResult
from pipelines.students.context import StudentContext
from pipelines.students.kd import FrozenTeacher


class DKDLoss(StepHook):
    """The loss of one step; as a hook it reads the step number before the forward, for the
    warm-up weight ``min(1, step / (warmup * steps))``."""

    def __init__(self, teacher: FrozenTeacher, dkd: DKDConfig, steps: int):
        self.teacher, self.dkd, self.warm_steps, self.weight = teacher, dkd, dkd.warmup * steps, 1.0

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        self.weight = min(1.0, step / self.warm_steps) if self.warm_steps > 0 else 1.0

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        teacher_logits = self.teacher(x, index)
        # A transfer example has no label: the teacher's top class stands in as its target.
        target = torch.where(y >= 0, y, teacher_logits.argmax(-1))
        d = self.dkd
        return (labelled_cross_entropy(logits, y)
                + self.weight * dkd_loss(logits, teacher_logits, target, d.temperature, d.alpha, d.beta))


def train_dkd(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student, teacher = ctx.new_student(), FrozenTeacher(ctx)
    loss = DKDLoss(teacher, ctx.dkd, ctx.student.train.steps)
    result = ctx.teach(student, loss, hooks=[loss])
    result.seconds += teacher.seconds
    return student, result
