"""``meta_distill`` with ``learn=[head]`` (the default): the teacher keeps learning while it
teaches.  Its frozen trunk's features are tabled once per pool row (as ``kd``'s logits
are); a copy of its head makes the student's targets and, every ``interval`` steps, takes
an Adam step on

    CE(head, labels) + feedback * h * CE(head, its pseudo-labels) + trust_kl * KL(start || head)

where ``h`` is the student's held-out gain from the step it just took on those targets
(``meta.cotrain``; normalised by its running RMS and clipped), measured on 256 held-out
images rotating through the quiz and validation splits (``feedback`` is 0 by default: it
measured nothing, docs/distill_ablation.md).  Once the KL passes
``max_drift`` the head stops learning.  Every ``guard_every`` steps the guard
(``meta.guard``) scores the student on the whole held-out set and reverts student, head
and both optimisers to the last accepted snapshot when the student fell behind it by
more than noise, halving the head's step size; the better of the final and the best
snapshot's students is returned.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta.cotrain import drift, feedback_h, feedback_loss
from meta.distill import distillation_loss
from meta.guard import Guard
from meta.horizon import SGD, TemperatureFollower
from models.external import last_linear
from models.normalize import unwrap
from pipelines.engine import distributed
from pipelines.engine.batches import BatchPlan
from pipelines.engine.device import rows
from pipelines.engine.loop import TrainResult
from pipelines.engine.metrics import accuracy, check_finite
from pipelines.students.context import StudentContext
from pipelines.students.kd import FrozenTeacher
from pipelines.students.meta_distill import teaching_point


class CoTeacher:
    """The batch loss of the co-trained teacher (KD against its head's outputs), with the
    head's update and the guard after each student step (``after_step``)."""

    def __init__(self, ctx: StudentContext, student: nn.Module):
        cfg = ctx.meta_distill
        self.ctx, self.cfg, self.student = ctx, cfg, student
        self.temperature, self.alpha = teaching_point(ctx)
        self.features = FrozenTeacher(ctx, part="features")
        head = last_linear(unwrap(ctx.teacher))[1]
        self.head = copy.deepcopy(head).train().requires_grad_(True)
        self.start = copy.deepcopy(head).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=cfg.head_lr)
        self.held_x, self.held_y = ctx.held_out()
        size = min(cfg.quiz_batch_size, len(self.held_y))
        self.plan = BatchPlan(len(self.held_y), size, torch.Generator().manual_seed(10_000 + ctx.seed), False)
        self.guard = Guard(cfg.guard_z, cfg.guard_damping)
        self.step, self.updates, self.h_square, self.stopped = 0, 0, None, False
        self.pending: tuple | None = None
        self.follower = None
        if cfg.learn_temperature:
            self.follower = TemperatureFollower(self.temperature, cfg.temperature_lr, cfg.temperature_box,
                                                cfg.horizon_discount, cfg.horizon_window)
        self.stepped: tuple | None = None  # (parameters before the step, x, y, targets) for the tangent
        self.last: dict[str, float] = {}

    def _held_loss(self, idx: torch.Tensor) -> float:
        was = self.student.training
        self.student.eval()  # held-out images never move the student's normalisation statistics
        with torch.no_grad():
            device = self.ctx.data.device
            loss = F.cross_entropy(self.student(rows(self.held_x, idx, device)), rows(self.held_y, idx, device))
        self.student.train(was)
        return float(loss)

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.step += 1
        features = self.features(x, index)
        with torch.no_grad():
            targets = self.head(features)
        updates = (self.step - 1) % self.cfg.interval == 0
        if updates and (not self.stopped or self._following()):
            idx = self.plan.next()[1]
            # The held-out loss before the step only feeds h: without feedback it is not paid for.
            before = self._held_loss(idx) if self.cfg.feedback > 0 else None
            self.pending = (features, targets.argmax(-1), y, idx, before)
        if self._following():
            self.temperature = self.follower.temperature
            self.stepped = ({k: v.detach().clone() for k, v in self.student.named_parameters()}, x, y, targets)
        return distillation_loss(logits, targets, y, self.temperature, self.alpha, self.ctx.kd.soft_loss)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """The tangent through the step the student just took, the head's update on it
        (and a temperature reading), then the guard's check."""
        if self._following():
            self._follow(optimizer)
        if self.pending is not None:
            if self._following():
                self._read_temperature(self.pending[3])
            if not self.stopped:
                self._update_head(*self.pending)
            self.pending = None
        if self.cfg.guard_every and step % self.cfg.guard_every == 0:
            self._check(optimizer)

    def _update_head(self, features, pseudo, y, idx, before: float | None) -> None:
        logits = self.head(features)
        labelled = y >= 0
        loss = self.cfg.trust_kl * drift(logits, self.start(features))
        if labelled.any():
            loss = loss + F.cross_entropy(logits[labelled], y[labelled])
        if before is not None:  # feedback > 0
            after = self._held_loss(idx)
            check_finite(after, self.ctx.desc, self.step, "held-out loss")
            gain = before - after
            self.h_square = gain**2 if self.h_square is None else 0.99 * self.h_square + 0.01 * gain**2
            h = feedback_h(before, after, self.cfg.feedback_clip, scale=math.sqrt(self.h_square) + 1e-12)
            loss = loss + self.cfg.feedback * feedback_loss(logits, pseudo, h)
            self.last.update({"teacher_feedback_h": h, "teacher_heldout_gain": gain})
        grads = torch.autograd.grad(loss, list(self.head.parameters()))
        distributed.average_(list(grads))  # this rank's shard -> the global batch's gradient
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.head_lr * self.guard.scale
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.head.parameters(), grads):
            p.grad = g
        self.optimizer.step()
        self.updates += 1
        with torch.no_grad():  # every rank decides on the global batch's drift
            moved = distributed.mean_scalars([float(drift(self.head(features), self.start(features)))])[0]
        self.stopped = moved > self.cfg.max_drift
        self.last["teacher_drift"] = moved
        if self.ctx.on_log is not None and self.updates % 10 == 1:
            self.ctx.on_log(self.step, self.last)

    def _following(self) -> bool:
        """Whether the temperature learns at this step (over ``temperature_share`` of them)."""
        return self.follower is not None and self.step <= self.cfg.temperature_share * self.ctx.student.train.steps

    def _functional(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        # Copies of the buffers: a batch-norm student's running statistics move once per step, in the loop.
        buffers = {k: b.detach().clone() for k, b in self.student.named_buffers()}
        return functional_call(self.student, {**params, **buffers}, (x,))

    def _follow(self, optimizer: torch.optim.Optimizer) -> None:
        before, x, y, targets = self.stepped
        group = optimizer.param_groups[0]
        opt = SGD(group["lr"], group["momentum"], group["weight_decay"], group["nesterov"])
        alpha, soft = self.alpha, self.ctx.kd.soft_loss
        self.follower.follow(before, lambda p, log_t: distillation_loss(self._functional(x, p), targets, y, log_t.exp(),
                                                                         alpha, soft),
                             opt, self.ctx.student.train.grad_clip, distributed.average_)

    def _read_temperature(self, idx: torch.Tensor) -> None:
        device = self.ctx.data.device
        hx, hy = rows(self.held_x, idx, device), rows(self.held_y, idx, device)
        was = self.student.training
        self.student.eval()
        reading = self.follower.read({k: v.detach() for k, v in self.student.named_parameters()},
                                     lambda p: F.cross_entropy(self._functional(hx, p), hy))
        self.student.train(was)
        self.last.update({"kd_temperature": self.follower.temperature, "temperature_hypergradient": reading})

    def _check(self, optimizer: torch.optim.Optimizer) -> None:
        acc = accuracy(self.student, self.held_x, self.held_y)
        parts = {"student": self.student, "student_optimizer": optimizer, "head": self.head,
                 "head_optimizer": self.optimizer}
        accepted = self.guard.check(acc, len(self.held_y), parts)
        if not accepted:
            self.stopped = False  # the restored head is inside the trust region again
            if self.follower is not None:  # the student jumped back: its tangent starts again
                self.follower.d_params = self.follower.d_buffer = None
        if self.ctx.on_log is not None:
            self.ctx.on_log(self.step, {"guard_heldout_acc": acc, "guard_reverts": float(self.guard.reverts)})

    def finish(self) -> bool:
        """The better of the final student and the guard's best snapshot, by held-out
        accuracy (the snapshot's head with it); True when the snapshot was taken."""
        if self.guard.snapshot is None:
            return False
        if accuracy(self.student, self.held_x, self.held_y) >= self.guard.best:
            return False
        self.student.load_state_dict(self.guard.snapshot["student"])
        self.head.load_state_dict(self.guard.snapshot["head"])
        return True

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "plan": self.plan.state_dict(), "guard": self.guard.state_dict(), "step": self.step,
                "updates": self.updates, "h_square": self.h_square, "stopped": self.stopped,
                "follower": self.follower.state_dict() if self.follower is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.plan.load_state_dict(state["plan"])
        self.guard.load_state_dict(state["guard"])
        self.step, self.updates, self.h_square = state["step"], state["updates"], state["h_square"]
        self.stopped = state["stopped"]
        if self.follower is not None:
            self.follower.load_state_dict(state["follower"])


    def teacher(self) -> nn.Module:
        """The teacher as it ends: its trunk with the co-trained head."""
        teacher = copy.deepcopy(self.ctx.teacher)
        last_linear(teacher)[1].load_state_dict(self.head.state_dict())
        return teacher.eval()


def co_teach(ctx: StudentContext, student: nn.Module) -> TrainResult:
    loss = CoTeacher(ctx, student)
    result = ctx.teach(student, loss)
    result.seconds += loss.features.seconds
    reverted = loss.finish()
    ctx.learned_teacher = loss.teacher()
    if ctx.on_log is not None:
        ctx.on_log(ctx.student.train.steps, {"guard_reverts": float(loss.guard.reverts),
                                             "kd_temperature": loss.temperature,
                                             "guard_returned_snapshot": float(reverted),
                                             "teacher_head_updates": float(loss.updates)})
    return result
