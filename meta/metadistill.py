"""Learning to teach: pilot-update meta-distillation (MetaDistil, Zhou et al. ACL 2022).

For a training batch (x, y) and a quiz batch (xq, yq) from held-out data:

1. copy the student functionally and take K pilot SGD steps on the distillation loss
   against the teacher's logits, keeping the graph (the loss is any function of the
   meta-parameters: the teacher's weights, or the teaching knobs of ``meta.teaching``);
2. score the pilot student's cross-entropy on the quiz batch;
3. differentiate it with respect to the meta-parameters (second order, through the
   pilot steps) -- the teacher's update;
4. the caller makes the real student step with the updated teacher.

The pilot works on detached clones of the student's parameters, so the real student and
its optimiser state are never touched.  ``first_order_teacher_grad`` is the cheap variant
for large models (Meta Pseudo Labels' idea): the teacher's own distillation gradient,
scaled by how much the pilot step changed the student's quiz loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from meta.distill import distillation_loss
from meta.functional import Params, forward, sgd_step


def _alone(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return tensors


@dataclass(frozen=True)
class Pilot:
    steps: int = 1  # K
    lr: float = 0.05  # the pilot student's SGD step size
    temperature: float = 4.0
    alpha: float = 0.9
    soft_loss: str = "kl"
    # Averages tensors over data-parallel replicas, differentiably; identity in one process.
    # Each replica holds a shard of the batch, and the pilot steps on the global mean gradient.
    average: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] = _alone


def detached(params: Params) -> Params:
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


DistillFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (student logits, labels) -> loss


def unrolled_steps(student: nn.Module, student_params: Params, distill: DistillFn,
                   batches: Sequence[tuple[torch.Tensor, torch.Tensor]], pilot: Pilot) -> Params:
    """Differentiable SGD steps (step size ``pilot.lr``) of a copy of the student on
    ``distill``, one per batch; the result depends on whatever ``distill`` and the batches
    are functions of (the teacher's weights, the teaching knobs, an augmentation policy)."""
    p = detached(student_params)
    for x, y in batches:
        loss = distill(forward(student, p, x), y)
        grads = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        p = sgd_step(p, pilot.average(grads), pilot.lr)
    return p


def pilot_steps(student: nn.Module, student_params: Params, distill: DistillFn, x: torch.Tensor,
                y: torch.Tensor, pilot: Pilot) -> Params:
    """K (``pilot.steps``) differentiable SGD steps of a copy of the student on one batch."""
    return unrolled_steps(student, student_params, distill, [(x, y)] * pilot.steps, pilot)


def quiz_loss_after_pilot(student: nn.Module, student_params: Params, distill: DistillFn,
                          batch: tuple[torch.Tensor, torch.Tensor], quiz: tuple[torch.Tensor, torch.Tensor],
                          pilot: Pilot) -> torch.Tensor:
    """Cross-entropy on the quiz batch of the student after its pilot steps on ``distill``."""
    p = pilot_steps(student, student_params, distill, *batch, pilot)
    return F.cross_entropy(forward(student, p, quiz[0]), quiz[1])


def meta_grad(student: nn.Module, student_params: Params, distill: DistillFn, meta_params: Params,
              batch, quiz, pilot: Pilot) -> tuple[Params, float]:
    """Second-order gradient of the pilot's quiz loss with respect to ``meta_params`` (what
    ``distill`` is a function of), and the loss.  A parameter the loss does not reach gets
    a zero gradient."""
    loss = quiz_loss_after_pilot(student, student_params, distill, batch, quiz, pilot)
    grads = torch.autograd.grad(loss, list(meta_params.values()), allow_unused=True)
    return ({k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(meta_params.items(), grads)},
            float(loss.detach()))


def first_order_teacher_grad(student: nn.Module, student_params: Params, teacher: nn.Module,
                             teacher_params: Params, batch, quiz, pilot: Pilot,
                             generator: torch.Generator | None = None) -> tuple[Params, float]:
    """Meta Pseudo Labels' first-order teacher gradient (Pham et al. 2021), for soft KD.

    The teacher's action is a label drawn from its tempered distribution; the student takes
    one pilot step on the distillation loss, and ``h = quiz_loss(before) - quiz_loss(after)``
    (a first-order estimate of the step's effect on held-out data) scales the teacher's
    log-likelihood gradient of that label: ``grad = h * d CE(teacher(x) / T, label) / d teacher``.
    No second-order terms; the cost is one extra student step and one teacher backward."""
    x, y = batch
    xq, yq = quiz
    s = {k: v.detach() for k, v in student_params.items()}
    teacher_logits = forward(teacher, teacher_params, x)
    with torch.no_grad():
        before = F.cross_entropy(forward(student, s, xq), yq)
        probs = F.softmax(teacher_logits.detach() / pilot.temperature, dim=-1)
        # A seeded generator lives on one device; draw there, so the labels repeat on any device.
        on = generator.device if generator is not None else probs.device
        labels = torch.multinomial(probs.to(on), 1, generator=generator).squeeze(1).to(probs.device)
    p = detached(s)
    loss = distillation_loss(forward(student, p, x), teacher_logits.detach(), y, pilot.temperature,
                             pilot.alpha, pilot.soft_loss)
    grads = pilot.average(torch.autograd.grad(loss, list(p.values())))
    with torch.no_grad():
        after_params = sgd_step({k: v.detach() for k, v in p.items()}, grads, pilot.lr)
        after = F.cross_entropy(forward(student, after_params, xq), yq)
        before, after = pilot.average((before, after))
    h = float(before - after)
    teacher_loss = h * F.cross_entropy(teacher_logits / pilot.temperature, labels)
    teacher_grads = torch.autograd.grad(teacher_loss, list(teacher_params.values()))
    return dict(zip(teacher_params, teacher_grads)), float(after)
