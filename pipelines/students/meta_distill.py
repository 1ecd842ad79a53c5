"""``meta_distill``: learning to teach.  KD from a teacher whose head keeps learning while it
teaches, guarded by held-out checks.

The teacher's frozen trunk's features are tabled once per pool row (as ``kd``'s logits
are); a copy of its head makes the student's targets (:class:`TeachingHead`).  Three step
hooks act around the student's steps, in this order, each with one job:

- :class:`TemperatureFollowing` (``meta_distill.temperature.learn``): carries the tangent
  ``d theta / d log T`` through each student step and reads the held-out hypergradient
  (``meta.horizon``), moving T once a window of readings agrees;
- :class:`HeadUpdate`: every ``interval`` steps, an Adam step of the head on
  ``CE(head, labels) + feedback * h * CE(head, its pseudo-labels) + trust_kl * KL(start || head)``,
  ``h`` the student's held-out gain from the step it just took (``meta.cotrain``; off by
  default: it measured nothing, docs/distill_ablation.md); once the KL passes
  ``head.max_drift`` the head stops learning;
- :class:`GuardCheck`: every ``guard.every`` steps, scores the student on the whole held-out
  set and reverts student, head and both optimisers to the last accepted snapshot when the
  student fell behind it by more than noise (``meta.guard``), damping the head's step size.

The held-out images (quiz and validation splits) are split once per seed (:func:`held_out_parts`):
the teaching part rotates in batches of ``quiz_batch_size`` (:class:`HeldOut`); the judging
part (``judge_fraction``) is never shown to the learned teaching.  The better of the final and
the best snapshot's students is kept; then the reference method (``meta_distill.reference``,
default ``standard_practice``: the best of tuned KD, DKD and DIST) trains from the same seed,
and its student is returned unless the learned one beats it on the judging images beyond noise
(:func:`bounded_by_reference`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

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
from pipelines.common.rng import held_out_generator, judge_generator
from pipelines.config.students import MetaDistillConfig, TemperatureConfig
from pipelines.engine import distributed
from pipelines.engine.batches import BatchPlan
from pipelines.engine.device import rows
from pipelines.engine.loop import BatchLoss, LogFn, StepHook, TrainResult
from pipelines.engine.metrics import accuracy, check_finite, correctness, sign_test
from pipelines.students import paired
from pipelines.students.context import StudentContext
from pipelines.students.kd import FrozenTeacher, train_kd
from pipelines.students.maml_init import maml_initialised
from pipelines.students.tuned import train_standard_practice


class TeachingHead:
    """The teacher as it teaches: its frozen trunk's features under a copy of its head that
    keeps learning (``head``; ``start`` is the head it started from)."""

    def __init__(self, ctx: StudentContext):
        self.features = FrozenTeacher(ctx, part="features")
        head = last_linear(unwrap(ctx.teacher))[1]
        self.head = copy.deepcopy(head).train().requires_grad_(True)
        self.start = copy.deepcopy(head).requires_grad_(False)
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None  # the step's (features, targets)

    def targets(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The head's logits for the batch; kept for the hooks that act after the step."""
        features = self.features(x, index)
        with torch.no_grad():
            targets = self.head(features)
        self.batch = (features, targets)
        return targets

    def teacher(self, trunk: nn.Module) -> nn.Module:
        """The teacher as it ends: ``trunk`` with this head."""
        teacher = copy.deepcopy(trunk)
        last_linear(teacher)[1].load_state_dict(self.head.state_dict())
        return teacher.eval()


Images = tuple[torch.Tensor, torch.Tensor]


def held_out_parts(ctx: StudentContext) -> tuple[Images, Images]:
    """The held-out images split at random (per seed) into the part that steers learning to
    teach (the head's updates, the temperature's readings, the guard) and the part kept from
    it to judge its student against the reference (``meta_distill.judge_fraction``).  Judged
    on the images the guard chose its snapshot on, the learned student looked better than it
    was: on Fashion-MNIST it beat the reference there at p < 0.05 and lost 0.76 points on the
    test split."""
    x, y = ctx.held_out()
    order = torch.randperm(len(y), generator=judge_generator(ctx.seed))
    n_judge = min(len(y) - 1, max(1, round(len(y) * ctx.meta_distill.judge_fraction)))
    teach, judge = order[n_judge:], order[:n_judge]
    return (x[teach], y[teach]), (x[judge], y[judge])


class HeldOut:
    """The labelled images that steer the teacher (the teaching part of the quiz and
    validation splits), drawn in rotating batches; ``drawn`` is this step's batch (None when
    the step draws none)."""

    def __init__(self, ctx: StudentContext, student: nn.Module, batch_size: int):
        self.student, self.device = student, ctx.data.device
        self.x, self.y = held_out_parts(ctx)[0]
        self.plan = BatchPlan(len(self.y), min(batch_size, len(self.y)), held_out_generator(ctx.seed), False)
        self.drawn: torch.Tensor | None = None

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rows(self.x, idx, self.device), rows(self.y, idx, self.device)

    def loss(self, idx: torch.Tensor) -> float:
        """The student's cross-entropy on rows ``idx``, in eval mode: held-out images never
        move its normalisation statistics."""
        was = self.student.training
        self.student.eval()
        with torch.no_grad():
            x, y = self.batch(idx)
            loss = F.cross_entropy(self.student(x), y)
        self.student.train(was)
        return float(loss)


def co_taught_loss(head: TeachingHead, temperature: Callable[[], float], alpha: float, soft_loss: str) -> BatchLoss:
    """KD against the co-trained head's outputs, at the temperature ``temperature()`` gives."""

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return distillation_loss(logits, head.targets(x, index), y, temperature(), alpha, soft_loss)

    return loss


class TemperatureFollowing(StepHook):
    """The KD temperature learning along the student's trajectory (RTHO): before each step
    it fixes T and remembers where the student stood; after it, carries the tangent through
    the step and, on a head-update step, reads the hypergradient on the held-out batch."""

    def __init__(self, cfg: TemperatureConfig, temperature: float, alpha: float, soft_loss: str, steps: int,
                 grad_clip: float | None, student: nn.Module, head: TeachingHead, held: HeldOut,
                 on_log: LogFn | None):
        self.student, self.head, self.held, self.on_log = student, head, held, on_log
        self.alpha, self.soft_loss, self.grad_clip = alpha, soft_loss, grad_clip
        self.follower = TemperatureFollower(temperature, cfg.lr, cfg.box, cfg.discount, cfg.window)
        self.last_step = cfg.share * steps
        self.value = temperature
        self.stepped: tuple | None = None  # (parameters before the step, x, y)
        self.readings = 0

    def following(self, step: int) -> bool:
        """Whether T learns at this step (over ``temperature.share`` of the steps)."""
        return step <= self.last_step

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        if self.following(step):
            self.value = self.follower.temperature
            self.stepped = ({k: v.detach().clone() for k, v in self.student.named_parameters()}, x, y)

    def _functional(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        # Copies of the buffers: a batch-norm student's running statistics move once per step, in the loop.
        buffers = {k: b.detach().clone() for k, b in self.student.named_buffers()}
        return functional_call(self.student, {**params, **buffers}, (x,))

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.following(step):
            return
        before, x, y = self.stepped
        targets = self.head.batch[1]
        group = optimizer.param_groups[0]
        opt = SGD(group["lr"], group["momentum"], group["weight_decay"], group["nesterov"])
        self.follower.follow(before, lambda p, log_t: distillation_loss(self._functional(x, p), targets, y, log_t.exp(),
                                                                         self.alpha, self.soft_loss),
                             opt, self.grad_clip, distributed.average_)
        if self.held.drawn is not None:
            self._read(step, self.held.drawn)

    def _read(self, step: int, idx: torch.Tensor) -> None:
        hx, hy = self.held.batch(idx)
        was = self.student.training
        self.student.eval()
        reading = self.follower.read({k: v.detach() for k, v in self.student.named_parameters()},
                                     lambda p: F.cross_entropy(self._functional(hx, p), hy))
        self.student.train(was)
        self.readings += 1
        if self.on_log is not None and self.readings % 10 == 1:
            self.on_log(step, {"kd_temperature": self.follower.temperature, "temperature_hypergradient": reading})

    def restart(self) -> None:
        """The student jumped back to a snapshot: its tangent starts again."""
        self.follower.d_params = self.follower.d_buffer = None

    def state_dict(self) -> dict:
        return {"follower": self.follower.state_dict(), "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.follower.load_state_dict(state["follower"])
        self.value = state["value"]


class HeadUpdate(StepHook):
    """The head's Adam step, every ``interval`` student steps, on the batch the student
    just learned from (see the module's docstring); ``guard.scale`` damps its step size."""

    def __init__(self, cfg: MetaDistillConfig, ctx: StudentContext, head: TeachingHead, held: HeldOut, guard: Guard,
                 temperature: TemperatureFollowing | None):
        self.cfg, self.ctx, self.head, self.held, self.guard, self.temperature = cfg, ctx, head, held, guard, temperature
        self.optimizer = torch.optim.Adam(head.head.parameters(), lr=cfg.head.lr)
        self.updates, self.h_square, self.stopped = 0, None, False
        self.pending: tuple | None = None  # (labels, held-out loss before the step)
        self.last: dict[str, float] = {}

    def before_step(self, step: int, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        self.held.drawn = None
        reads = self.temperature is not None and self.temperature.following(step)
        if (step - 1) % self.cfg.interval == 0 and (not self.stopped or reads):
            self.held.drawn = self.held.plan.next()[1]
            # The held-out loss before the step only feeds h: without feedback it is not paid for.
            before = self.held.loss(self.held.drawn) if self.cfg.feedback.weight > 0 else None
            self.pending = (y, before)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if self.pending is not None and not self.stopped:
            self._update(step, *self.pending)
        self.pending = None

    def _update(self, step: int, y: torch.Tensor, before: float | None) -> None:
        cfg, (features, targets) = self.cfg, self.head.batch
        logits = self.head.head(features)
        labelled = y >= 0
        loss = cfg.head.trust_kl * drift(logits, self.head.start(features))
        if labelled.any():
            loss = loss + F.cross_entropy(logits[labelled], y[labelled])
        if before is not None:  # feedback.weight > 0
            after = self.held.loss(self.held.drawn)
            check_finite(after, self.ctx.desc, step, "held-out loss")
            gain = before - after
            self.h_square = gain**2 if self.h_square is None else 0.99 * self.h_square + 0.01 * gain**2
            h = feedback_h(before, after, cfg.feedback.clip, scale=math.sqrt(self.h_square) + 1e-12)
            loss = loss + cfg.feedback.weight * feedback_loss(logits, targets.argmax(-1), h)
            self.last.update({"teacher_feedback_h": h, "teacher_heldout_gain": gain})
        grads = torch.autograd.grad(loss, list(self.head.head.parameters()))
        distributed.average_(list(grads))  # this rank's shard -> the global batch's gradient
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.head.lr * self.guard.scale
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(self.head.head.parameters(), grads):
            p.grad = g
        self.optimizer.step()
        self.updates += 1
        with torch.no_grad():  # every rank decides on the global batch's drift
            moved = distributed.mean_scalars([float(drift(self.head.head(features), self.head.start(features)))])[0]
        self.stopped = moved > cfg.head.max_drift
        self.last["teacher_drift"] = moved
        if self.ctx.on_log is not None and self.updates % 10 == 1:
            self.ctx.on_log(step, self.last)

    def state_dict(self) -> dict:
        return {"head": self.head.head.state_dict(), "optimizer": self.optimizer.state_dict(),
                "plan": self.held.plan.state_dict(), "updates": self.updates, "h_square": self.h_square,
                "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        self.head.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.held.plan.load_state_dict(state["plan"])
        self.updates, self.h_square, self.stopped = state["updates"], state["h_square"], state["stopped"]


class GuardCheck(StepHook):
    """Every ``every`` steps, the student's held-out accuracy against the last accepted
    snapshot (``meta.guard``): a real drop restores student, head and both optimisers and
    damps the head's step size."""

    def __init__(self, guard: Guard, every: int, student: nn.Module, held: HeldOut, update: HeadUpdate,
                 temperature: TemperatureFollowing | None, on_log: LogFn | None):
        self.guard, self.every, self.student, self.held = guard, every, student, held
        self.update, self.temperature, self.on_log = update, temperature, on_log

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        if not self.every or step % self.every:
            return
        acc = accuracy(self.student, self.held.x, self.held.y)
        parts = {"student": self.student, "student_optimizer": optimizer, "head": self.update.head.head,
                 "head_optimizer": self.update.optimizer}
        if not self.guard.check(acc, len(self.held.y), parts):
            self.update.stopped = False  # the restored head is inside the trust region again
            if self.temperature is not None:
                self.temperature.restart()
        if self.on_log is not None:
            self.on_log(step, {"guard_heldout_acc": acc, "guard_reverts": float(self.guard.reverts)})

    def finish(self) -> bool:
        """The better of the final student and the best snapshot, by held-out accuracy (the
        snapshot's head with it); True when the snapshot was taken."""
        if self.guard.snapshot is None:
            return False
        if accuracy(self.student, self.held.x, self.held.y) >= self.guard.best:
            return False
        self.student.load_state_dict(self.guard.snapshot["student"])
        self.update.head.head.load_state_dict(self.guard.snapshot["head"])
        return True

    def state_dict(self) -> dict:
        return self.guard.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state)


@dataclass
class CoTeaching:
    """``meta_distill``'s parts for one student: the loss and the step hooks, in their order."""

    head: TeachingHead
    held: HeldOut
    follow: TemperatureFollowing | None
    update: HeadUpdate
    check: GuardCheck
    loss: BatchLoss
    temperature: float  # the KD temperature it teaches at (where a learned one starts)

    @property
    def hooks(self) -> list[StepHook]:
        # In this order: the tangent goes through the step (and T reads the held-out batch)
        # before the head's update moves the targets; the guard judges the step last.
        return [hook for hook in (self.follow, self.update, self.check) if hook is not None]


def co_teaching(ctx: StudentContext, student: nn.Module) -> CoTeaching:
    cfg, kd = ctx.meta_distill, ctx.kd
    temperature = kd.temperature if cfg.temperature.value is None else cfg.temperature.value
    alpha = kd.alpha if cfg.alpha is None else cfg.alpha
    head, held = TeachingHead(ctx), HeldOut(ctx, student, cfg.quiz_batch_size)
    guard = Guard(cfg.guard.z, cfg.guard.damping)
    follow = None
    if cfg.temperature.learn:
        follow = TemperatureFollowing(cfg.temperature, temperature, alpha, kd.soft_loss, ctx.student.train.steps,
                                      ctx.student.train.grad_clip, student, head, held, ctx.on_log)
    update = HeadUpdate(cfg, ctx, head, held, guard, follow)
    check = GuardCheck(guard, cfg.guard.every, student, held, update, follow, ctx.on_log)
    loss = co_taught_loss(head, (lambda: follow.value) if follow else (lambda: temperature), alpha, kd.soft_loss)
    return CoTeaching(head, held, follow, update, check, loss, temperature)


def co_teach(ctx: StudentContext, student: nn.Module) -> TrainResult:
    """Train ``student`` by KD from the co-trained head, with its hooks; sets
    ``ctx.learned_teacher`` to the teacher as it ends."""
    parts = co_teaching(ctx, student)
    result = ctx.teach(student, parts.loss, parts.hooks)
    result.seconds += parts.head.features.seconds
    reverted = parts.check.finish()
    ctx.learned_teacher = parts.head.teacher(ctx.teacher)
    if ctx.on_log is not None:
        ctx.on_log(ctx.student.train.steps, {"guard_reverts": float(parts.check.guard.reverts),
                                             "kd_temperature": parts.follow.value if parts.follow else parts.temperature,
                                             "guard_returned_snapshot": float(reverted),
                                             "teacher_head_updates": float(parts.update.updates)})
    return result


REFERENCES = {"kd": train_kd, "standard_practice": train_standard_practice}  # meta_distill.reference


def bounded_by_reference(ctx: StudentContext, student: nn.Module,
                         result: TrainResult) -> tuple[nn.Module, TrainResult]:
    """The reference method's student trained from the same seed (the same initialisation
    and batches: the sweep's paired row, reused when it was trained already), or ``student``
    when it beats that on the judging images (:func:`held_out_parts`, never shown to the
    learned teaching) beyond noise: McNemar's exact test on the images where the two
    disagree, one-sided p below ``meta_distill.keep_p``.  The burden of proof is on the
    learned student, because a few hundred held-out images cannot see a loss of one or two
    points (one seed of ten lost 2.1 points on Fashion-MNIST's test set while it led ``kd``
    on the held-out images).  The reference's compute is added to ``result``."""
    method = ctx.meta_distill.reference
    if method == "none":
        return student, result
    reference, ref_result = paired.trained_once(method, ctx, REFERENCES[method])
    result.seconds += ref_result.seconds
    x, y = held_out_parts(ctx)[1]
    wins, losses, p = sign_test(correctness(student, x, y), correctness(reference, x, y))
    keep = wins > losses and p < ctx.meta_distill.keep_p
    if ctx.on_log is not None:
        ctx.on_log(ctx.student.train.steps, {"returned_reference": float(not keep), "reference_wins": float(losses),
                                             "learned_wins": float(wins), "learned_vs_reference_p": p})
    return (student if keep else reference), result


def train_meta_distill(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student = ctx.new_student()
    result = co_teach(ctx, student)
    return bounded_by_reference(ctx, student, result)


def train_meta_distill_maml_init(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """``maml_init``'s meta-learned initialisation, then ``meta_distill``'s training."""
    student, meta_result = maml_initialised(ctx)
    result = co_teach(ctx, student)
    result.seconds += meta_result.seconds
    return student, result
