"""``meta_distill_pilot``: MetaDistil's pilot update (Zhou et al. ACL 2022).  KD from a
teacher (or teaching knobs on a frozen one) that learns from the quiz loss of a pilot copy
of the student.

What is learned (``meta_distill_pilot.learn``) is the teacher's weights and/or the teaching
knobs of ``meta.teaching``.  Every ``interval`` student steps in the update window, before
the student's own step, :class:`PilotUpdate` takes one meta-gradient step on the pilot
student's quiz loss (``meta.metadistill``); the student then steps on the updated teaching.
The pilot never touches the real student or its optimiser, so with learning rates 0 the
trajectory is ``kd``'s.  It lost to the co-trained head of ``meta_distill`` and to tuned KD
in this project's measurements (docs/distill_ablation.md); it is kept as a baseline.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta.functional import Params, forward, params_of
from meta.metadistill import Pilot, first_order_teacher_grad, meta_grad, quiz_loss_after_pilot
from meta.teaching import TeachingKnobs
from pipelines.common.rng import global_rng, held_out_generator
from pipelines.engine import distributed
from pipelines.engine.device import rows
from pipelines.engine.loop import StepHook, TrainResult
from pipelines.engine.metrics import check_finite
from pipelines.students.context import StudentContext
from pipelines.students.kd import FrozenTeacher


class PilotUpdate(StepHook):
    """The learned teaching (``teacher`` and ``knobs``) and its meta-update before the
    student's step; :meth:`loss` is the student's KD loss under it."""

    def __init__(self, ctx: StudentContext, student: nn.Module):
        cfg, kd = ctx.meta_distill_pilot, ctx.kd
        self.ctx, self.cfg, self.student = ctx, cfg, student
        temperature = kd.temperature if cfg.temperature is None else cfg.temperature
        alpha = kd.alpha if cfg.alpha is None else cfg.alpha
        self.learns_teacher = "teacher" in cfg.learn
        self.teacher = copy.deepcopy(ctx.teacher).eval().requires_grad_(self.learns_teacher)
        self.frozen = None if self.learns_teacher else FrozenTeacher(ctx)
        with global_rng(state=ctx.rng_after_init):  # the draws that follow the student's, as in a run alone
            self.knobs = TeachingKnobs(ctx.data.num_classes, temperature, alpha, kd.soft_loss,
                                       [k for k in cfg.learn if k != "teacher"]).to(ctx.data.device)
        groups = ([{"params": list(self.teacher.parameters()), "lr": cfg.teacher_lr}] if self.learns_teacher else [])
        if self.knobs.knobs:
            groups.append({"params": list(self.knobs.parameters()), "lr": cfg.knob_lr})
        for group in groups:
            group["base_lr"] = group["lr"]
        self.optimizer = torch.optim.Adam(groups) if cfg.teacher_optimizer == "adam" else torch.optim.SGD(groups)
        self.pilot = Pilot(cfg.pilot_steps, cfg.pilot_lr or ctx.student.train.optimizer.lr, temperature, alpha,
                           kd.soft_loss, average=distributed.differentiable_mean)
        self.quiz = (ctx.data.x("quiz"), ctx.data.y("quiz"))
        self.generator = held_out_generator(ctx.seed)
        self.updates = 0
        self.window = (cfg.start_step, cfg.stop_step or ctx.student.train.steps)

    def meta_params(self) -> Params:
        """What the meta-gradient updates, by prefixed name."""
        teacher = {f"teacher.{k}": v for k, v in self.teacher.named_parameters()} if self.learns_teacher else {}
        return {**teacher, **{f"knobs.{k}": v for k, v in self.knobs.named_parameters()}}

    def distill_fn(self, x: torch.Tensor, index: torch.Tensor, params: Params):
        """The distillation loss on batch ``x`` as a function of ``params`` (see meta_params)."""
        knob_params = {k.removeprefix("knobs."): v for k, v in params.items() if k.startswith("knobs.")}
        if self.learns_teacher:
            teacher_logits = forward(self.teacher, {k.removeprefix("teacher."): v for k, v in params.items()
                                                    if k.startswith("teacher.")}, x)
        else:
            teacher_logits = self.frozen(x, index)
        return lambda logits, y: functional_call(self.knobs, knob_params, (logits, teacher_logits, y))

    def loss(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The student's loss under the teaching as it now is."""
        with torch.no_grad():
            frozen = {k: v.detach() for k, v in self.meta_params().items()}
            distill = self.distill_fn(x, index, frozen)
        return distill(logits, y)

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        start, stop = self.window
        if start < step <= stop and (step - 1) % self.cfg.interval == 0:
            self._update(step, x, y, index)

    def _set_lr(self, step: int) -> None:
        if self.cfg.lr_schedule == "cosine":
            start, stop = self.window
            scale = 0.5 * (1 + math.cos(math.pi * (step - 1 - start) / max(1, stop - start)))
        else:
            scale = 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def _update(self, step: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
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
        check_finite(before, self.ctx.desc, step, "pilot quiz loss")
        if self.cfg.teacher_ce_weight > 0 and self.learns_teacher:
            labelled = y >= 0
            ce = self.cfg.teacher_ce_weight * F.cross_entropy(self.teacher(x[labelled]), y[labelled])
            t_names = [k for k in params if k.startswith("teacher.")]
            for k, extra in zip(t_names, torch.autograd.grad(ce, [params[k] for k in t_names])):
                grads[k] = grads[k] + extra
        distributed.average_(list(grads.values()))  # this rank's shard -> the global batch's gradient
        self._set_lr(step)
        self.optimizer.zero_grad(set_to_none=True)
        for k, p in params.items():
            p.grad = grads[k]
        self.optimizer.step()
        self.updates += 1
        if self.ctx.on_log is not None and self.updates % 10 == 1:
            self._log(step, x, y, index, quiz, before)

    def _log(self, step: int, x, y, index, quiz, before: float) -> None:
        frozen = {k: v.detach() for k, v in self.meta_params().items()}
        after = quiz_loss_after_pilot(self.student, params_of(self.student), self.distill_fn(x, index, frozen),
                                      (x, y), quiz, self.pilot).item()
        before, after = distributed.mean_scalars([before, after])
        self.ctx.on_log(step, {"teacher_quiz_loss_before": before, "teacher_quiz_loss_after": after,
                               **self.knobs.summary()})

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "knobs": self.knobs.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.knobs.load_state_dict(state["knobs"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.updates = state["updates"]


def train_meta_distill_pilot(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student = ctx.new_student()
    update = PilotUpdate(ctx, student)
    result = ctx.teach(student, update.loss, [update])
    result.seconds += update.frozen.seconds if update.frozen is not None else 0.0
    if update.learns_teacher:
        ctx.learned_teacher = update.teacher.eval()
    if ctx.on_log is not None and update.knobs.knobs:
        ctx.on_log(ctx.student.train.steps, update.knobs.summary())
    return student, result
