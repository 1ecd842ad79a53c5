"""Student methods: name -> function that trains one student and returns it.

Every method receives the same :class:`StudentContext` (same student architecture, same
budget, same seed-driven data order and initialisation), so the comparison is fair.
A new method is one function plus one registry entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from meta.distill import distillation_loss
from models.registry import build_model
from pipelines import distributed
from pipelines.augment import make_augmenter
from pipelines.checkpoint import Checkpointer
from pipelines.training import LogFn, TrainResult, train_classifier

if TYPE_CHECKING:  # config imports this module (method names), so only for type checkers
    from pipelines.config import PipelineConfig
    from pipelines.data import Prepared


@dataclass
class StudentContext:
    cfg: PipelineConfig
    data: Prepared
    teacher: nn.Module
    seed: int
    on_log: LogFn | None = None
    desc: str = "student"
    learned_teacher: nn.Module | None = None  # set by methods that train the teacher too
    checkpoint: Checkpointer | None = None  # set by torchrun workers, for elastic recovery

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
            val=(self.data.x("val"), self.data.y("val")), on_log=self.on_log, desc=self.desc,
            checkpoint=self.checkpoint)


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


def _maml_initialised(ctx: StudentContext):
    """A new student whose initialisation is meta-learned (``ctx.cfg.maml``) over tasks
    drawn from the training split: random class subsets with permuted labels."""
    from meta.tasks import TaskSampler
    from pipelines.meta_train import meta_train

    student, meta = ctx.new_student(), ctx.cfg.maml
    sampler = TaskSampler.from_labels(ctx.data.x("train"), ctx.data.y("train"), meta.ways or ctx.data.num_classes,
                                      meta.shots, meta.queries, meta.rotations)
    return student, meta_train(student, sampler, meta, seed=ctx.seed, on_log=ctx.on_log, desc=f"{ctx.desc} meta",
                               checkpoint=ctx.checkpoint)


def train_maml_init(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """Meta-learned initialisation, then the same training as ``scratch``; the reported
    train seconds include meta-training."""
    student, meta_result = _maml_initialised(ctx)
    result = ctx.fit(student, lambda logits, x, y: F.cross_entropy(logits, y))
    result.seconds += meta_result.seconds
    result.curve.update(meta_result.curve)
    return student, result


class MetaDistillLoss:
    """The KD loss of ``kd``, against a teacher that learns to teach.

    Every ``interval`` student steps, before the student's own step, the teacher takes one
    step on the pilot student's quiz loss (``meta.metadistill``); the student then steps on
    the updated teacher's outputs.  The pilot never touches the real student or its
    optimiser, so with ``teacher_lr = 0`` the trajectory is exactly ``kd``'s."""

    def __init__(self, ctx: StudentContext, student: nn.Module):
        import copy

        from meta.metadistill import Pilot

        cfg, kd = ctx.cfg.meta_distill, ctx.cfg.kd
        self.ctx, self.cfg, self.kd, self.student = ctx, cfg, kd, student
        self.teacher = copy.deepcopy(ctx.teacher).train()
        params = list(self.teacher.parameters())
        self.optimizer = (torch.optim.Adam(params, lr=cfg.teacher_lr) if cfg.teacher_optimizer == "adam"
                          else torch.optim.SGD(params, lr=cfg.teacher_lr))
        self.pilot = Pilot(cfg.pilot_steps, cfg.pilot_lr or ctx.cfg.student.train.optimizer.lr,
                           kd.temperature, kd.alpha, kd.soft_loss, average=distributed.differentiable_mean)
        self.quiz = (ctx.data.x("quiz"), ctx.data.y("quiz"))
        self.generator = torch.Generator().manual_seed(10_000 + ctx.seed)  # never the data order's
        self.step, self.updates = 0, 0

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.step += 1
        if self.step > self.cfg.start_step and (self.step - 1) % self.cfg.interval == 0:
            self.update_teacher(x, y)
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        return distillation_loss(logits, teacher_logits, y, self.kd.temperature, self.kd.alpha, self.kd.soft_loss)

    def update_teacher(self, x: torch.Tensor, y: torch.Tensor) -> None:
        from meta.functional import params_of
        from meta.metadistill import first_order_teacher_grad, pilot_quiz_loss, teacher_meta_grad

        # Every rank draws the same global quiz batch and scores its shard of it.
        idx = torch.randint(len(self.quiz[1]), (self.cfg.quiz_batch_size,), generator=self.generator)
        idx = idx[distributed.shard(self.cfg.quiz_batch_size)]
        quiz = (self.quiz[0][idx], self.quiz[1][idx])
        t_params = params_of(self.teacher)
        if self.cfg.order == "second":
            grads, before = teacher_meta_grad(self.student, params_of(self.student), self.teacher, t_params,
                                              (x, y), quiz, self.pilot)
        else:
            grads, before = first_order_teacher_grad(self.student, params_of(self.student), self.teacher,
                                                     t_params, (x, y), quiz, self.pilot, self.generator)
        if self.cfg.teacher_ce_weight > 0:
            ce = self.cfg.teacher_ce_weight * F.cross_entropy(self.teacher(x), y)
            for (k, g), extra in zip(grads.items(), torch.autograd.grad(ce, list(t_params.values()))):
                grads[k] = g + extra
        distributed.average_(list(grads.values()))  # this rank's shard -> the global batch's gradient
        self.optimizer.zero_grad(set_to_none=True)
        for k, p in t_params.items():
            p.grad = grads[k]
        self.optimizer.step()
        self.updates += 1
        if self.ctx.on_log is not None and self.updates % 10 == 1:
            after = pilot_quiz_loss(self.student, params_of(self.student), self.teacher,
                                    {k: v.detach() for k, v in params_of(self.teacher).items()},
                                    (x, y), quiz, self.pilot).item()
            before, after = distributed.mean_scalars([before, after])
            self.ctx.on_log(self.step, {"teacher_quiz_loss_before": before, "teacher_quiz_loss_after": after})

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(), "step": self.step, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.updates = state["step"], state["updates"]


def train_meta_distill(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student = ctx.new_student()
    loss = MetaDistillLoss(ctx, student)
    result = ctx.fit(student, loss)
    ctx.learned_teacher = loss.teacher.eval()
    return student, result


def train_meta_distill_maml_init(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """``maml_init``'s meta-learned initialisation, then ``meta_distill``'s training."""
    student, meta_result = _maml_initialised(ctx)
    loss = MetaDistillLoss(ctx, student)
    result = ctx.fit(student, loss)
    result.seconds += meta_result.seconds
    ctx.learned_teacher = loss.teacher.eval()
    return student, result


STUDENT_METHODS: dict[str, StudentMethod] = {
    "scratch": train_scratch,
    "kd": train_kd,
    "maml_init": train_maml_init,
    "meta_distill": train_meta_distill,
    "meta_distill+maml_init": train_meta_distill_maml_init,
}
