"""Student methods: name -> function that trains one student and returns it.

Every method receives the same :class:`StudentContext` (same student architecture, same
budget, same seed-driven data order and initialisation), so the comparison is fair.
A new method is one function plus one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from meta.distill import distillation_loss
from models.registry import build_model
from pipelines.augment import make_augmenter
from pipelines.training import LogFn, TrainResult, train_classifier


@dataclass
class StudentContext:
    cfg: "PipelineConfig"  # noqa: F821 - imported lazily to keep config -> students acyclic
    data: "Prepared"  # noqa: F821
    teacher: nn.Module
    seed: int
    on_log: LogFn | None = None
    desc: str = "student"

    def new_student(self) -> nn.Module:
        torch.manual_seed(self.seed)
        model_cfg = self.cfg.student.model
        return build_model(model_cfg.arch, self.data.input_shape, self.data.num_classes, **model_cfg.kwargs)

    def augmenter(self):
        if not self.cfg.student.train.augment:
            return None
        return make_augmenter(self.cfg.data.augment, self.data.input_shape)

    def fit(self, model: nn.Module, loss_fn) -> TrainResult:
        return train_classifier(
            model, self.data.x("train"), self.data.y("train"), self.cfg.student.train, loss_fn,
            seed=self.seed, augment=self.augmenter(),
            val=(self.data.x("val"), self.data.y("val")), on_log=self.on_log, desc=self.desc)


StudentMethod = Callable[[StudentContext], tuple[nn.Module, TrainResult]]


def train_scratch(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student = ctx.new_student()
    return student, ctx.fit(student, lambda logits, x, y: F.cross_entropy(logits, y))


def train_kd(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student, kd, teacher = ctx.new_student(), ctx.cfg.kd, ctx.teacher.eval()

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(x)
        return distillation_loss(logits, teacher_logits, y, kd.temperature, kd.alpha, kd.soft_loss)

    return student, ctx.fit(student, loss)


STUDENT_METHODS: dict[str, StudentMethod] = {
    "scratch": train_scratch,
    "kd": train_kd,
}
