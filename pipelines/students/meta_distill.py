"""``meta_distill``: KD taught by a teacher (or teaching knobs) that learns to teach from
the pilot student's quiz loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta.functional import Params, params_of
from pipelines.common.rng import global_rng
from pipelines.engine import distributed
from pipelines.engine.device import rows
from pipelines.engine.loop import TrainResult
from pipelines.engine.metrics import check_finite
from pipelines.students.context import StudentContext
from pipelines.students.kd import FrozenTeacher
from pipelines.students.maml_init import maml_initialised


def teaching_point(ctx: StudentContext) -> tuple[float, float]:
    """The temperature and alpha ``meta_distill`` teaches at (``kd``'s where it sets none)."""
    cfg, kd = ctx.meta_distill, ctx.kd
    return (kd.temperature if cfg.temperature is None else cfg.temperature,
            kd.alpha if cfg.alpha is None else cfg.alpha)


class MetaDistillLoss:
    """The KD loss of ``kd``, taught by a teacher that learns to teach.

    What is learned (``meta_distill.learn``) is the teacher's weights and/or the teaching
    knobs of ``meta.teaching`` on a frozen teacher.  Every ``interval`` student steps in
    the update window, before the student's own step, they take one step on the pilot
    student's quiz loss (``meta.metadistill``); the student then steps on the updated
    teaching.  The pilot never touches the real student or its optimiser, so with learning
    rates 0 the trajectory is ``kd``'s."""

    def __init__(self, ctx: StudentContext, student: nn.Module):
        import copy

        from meta.metadistill import Pilot
        from meta.teaching import TeachingKnobs

        cfg, kd = ctx.meta_distill, ctx.kd
        self.ctx, self.cfg, self.student = ctx, cfg, student
        self.learns_teacher = "teacher" in cfg.learn
        self.teacher = copy.deepcopy(ctx.teacher).eval().requires_grad_(self.learns_teacher)
        self.frozen = None if self.learns_teacher else FrozenTeacher(ctx)
        with global_rng(state=ctx.rng_after_init):  # the draws that follow the student's, as in a run alone
            self.knobs = TeachingKnobs(ctx.data.num_classes, *teaching_point(ctx), kd.soft_loss,
                                       [k for k in cfg.learn if k != "teacher"]).to(ctx.data.device)
        groups = ([{"params": list(self.teacher.parameters()), "lr": cfg.teacher_lr}] if self.learns_teacher else [])
        if self.knobs.knobs:
            groups.append({"params": list(self.knobs.parameters()), "lr": cfg.knob_lr})
        for group in groups:
            group["base_lr"] = group["lr"]
        self.optimizer = torch.optim.Adam(groups) if cfg.teacher_optimizer == "adam" else torch.optim.SGD(groups)
        self.pilot = Pilot(cfg.pilot_steps, cfg.pilot_lr or ctx.student.train.optimizer.lr,
                           *teaching_point(ctx), kd.soft_loss, average=distributed.differentiable_mean)
        self.quiz = (ctx.data.x("quiz"), ctx.data.y("quiz"))
        self.generator = torch.Generator().manual_seed(10_000 + ctx.seed)  # never the data order's
        self.step, self.updates = 0, 0
        self.window = (cfg.start_step, cfg.stop_step or ctx.student.train.steps)

    def meta_params(self) -> Params:
        """What the meta-gradient updates, by prefixed name."""
        teacher = {f"teacher.{k}": v for k, v in self.teacher.named_parameters()} if self.learns_teacher else {}
        return {**teacher, **{f"knobs.{k}": v for k, v in self.knobs.named_parameters()}}

    def distill_fn(self, x: torch.Tensor, index: torch.Tensor, params: Params):
        """The distillation loss on batch ``x`` as a function of ``params`` (see meta_params)."""
        from meta.functional import forward

        knob_params = {k.removeprefix("knobs."): v for k, v in params.items() if k.startswith("knobs.")}
        if self.learns_teacher:
            teacher_logits = forward(self.teacher, {k.removeprefix("teacher."): v for k, v in params.items()
                                                    if k.startswith("teacher.")}, x)
        else:
            teacher_logits = self.frozen(x, index)
        return lambda logits, y: functional_call(self.knobs, knob_params, (logits, teacher_logits, y))

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.step += 1
        start, stop = self.window
        if start < self.step <= stop and (self.step - 1) % self.cfg.interval == 0:
            self.update_teacher(x, y, index)
        with torch.no_grad():
            frozen = {k: v.detach() for k, v in self.meta_params().items()}
            distill = self.distill_fn(x, index, frozen)
        return distill(logits, y)

    def _set_lr(self) -> None:
        if self.cfg.lr_schedule == "cosine":
            start, stop = self.window
            scale = 0.5 * (1 + math.cos(math.pi * (self.step - 1 - start) / max(1, stop - start)))
        else:
            scale = 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def update_teacher(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        from meta.metadistill import first_order_teacher_grad, meta_grad

        # Every rank draws the same global quiz batch and scores its shard of it.
        idx = torch.randint(len(self.quiz[1]), (self.cfg.quiz_batch_size,), generator=self.generator)
        idx = idx[distributed.shard(self.cfg.quiz_batch_size)]
        quiz = (rows(self.quiz[0], idx, self.ctx.data.device), rows(self.quiz[1], idx, self.ctx.data.device))
        params = self.meta_params()
        if self.cfg.order == "second":
            grads, before = meta_grad(self.student, params_of(self.student), self.distill_fn(x, index, params),
                                      params, (x, y), quiz, self.pilot)
        else:  # config allows it for the teacher's weights alone
            t_params = params_of(self.teacher)
            raw, before = first_order_teacher_grad(self.student, params_of(self.student), self.teacher, t_params,
                                                   (x, y), quiz, self.pilot, self.generator)
            grads = {f"teacher.{k}": g for k, g in raw.items()}
        check_finite(before, self.ctx.desc, self.step, "pilot quiz loss")
        if self.cfg.teacher_ce_weight > 0 and self.learns_teacher:
            labelled = y >= 0
            ce = self.cfg.teacher_ce_weight * F.cross_entropy(self.teacher(x[labelled]), y[labelled])
            t_names = [k for k in params if k.startswith("teacher.")]
            for k, extra in zip(t_names, torch.autograd.grad(ce, [params[k] for k in t_names])):
                grads[k] = grads[k] + extra
        distributed.average_(list(grads.values()))  # this rank's shard -> the global batch's gradient
        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        for k, p in params.items():
            p.grad = grads[k]
        self.optimizer.step()
        self.updates += 1
        if self.ctx.on_log is not None and self.updates % 10 == 1:
            self.log(x, y, index, quiz, before)

    def log(self, x, y, index, quiz, before: float) -> None:
        from meta.metadistill import quiz_loss_after_pilot

        frozen = {k: v.detach() for k, v in self.meta_params().items()}
        after = quiz_loss_after_pilot(self.student, params_of(self.student), self.distill_fn(x, index, frozen),
                                      (x, y), quiz, self.pilot).item()
        before, after = distributed.mean_scalars([before, after])
        self.ctx.on_log(self.step, {"teacher_quiz_loss_before": before, "teacher_quiz_loss_after": after,
                                    **self.knobs.summary()})

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "knobs": self.knobs.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "step": self.step, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.knobs.load_state_dict(state["knobs"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.updates = state["step"], state["updates"]


def _meta_distill(ctx: StudentContext, student: nn.Module) -> TrainResult:
    if ctx.meta_distill.learn == ["head"]:
        from pipelines.students.cotrain import co_teach

        return co_teach(ctx, student)
    loss = MetaDistillLoss(ctx, student)
    result = ctx.teach(student, loss)
    result.seconds += loss.frozen.seconds if loss.frozen is not None else 0.0
    if loss.learns_teacher:
        ctx.learned_teacher = loss.teacher.eval()
    if ctx.on_log is not None and loss.knobs.knobs:
        ctx.on_log(ctx.student.train.steps, loss.knobs.summary())
    return result


def train_meta_distill(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student = ctx.new_student()
    return student, _meta_distill(ctx, student)


def train_meta_distill_maml_init(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """``maml_init``'s meta-learned initialisation, then ``meta_distill``'s training."""
    student, meta_result = maml_initialised(ctx)
    result = _meta_distill(ctx, student)
    result.seconds += meta_result.seconds
    return student, result
