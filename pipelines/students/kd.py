"""Hinton KD against a frozen teacher (``kd``); the frozen teacher every teacher-based
method reads.  ``kd_tuned`` is in ``pipelines.students.tuned``.
"""

from __future__ import annotations

import hashlib
import threading
import time

import torch
from torch import nn

from meta.distill import distillation_loss
from models.external import features_before_head
from pipelines.config.students import KDConfig
from pipelines.engine.device import in_batches, inference_batch
from pipelines.engine.loop import TrainResult
from pipelines.students.context import StudentContext


class FrozenTeacher:
    """The frozen teacher's logits for a batch (``part="features"``: what its head
    receives, for a method that trains a copy of the head).  When the student's inputs are
    not augmented, they are computed once for the whole training pool (train rows, then
    transfer rows) and looked up by row: a teacher forward per step costs 10-30x the small
    student's step.  The table is kept for the last (teacher, data) pair of each device and
    part, so the seeds and methods of a sweep share it; ``seconds`` is what building it
    cost this student (0 when it was already there), counted in the student's compute."""

    _tables: dict[tuple[str, str, str, str], torch.Tensor] = {}
    _lock = threading.Lock()

    def __init__(self, ctx: StudentContext, part: str = "logits"):
        self.teacher, self.part, self.table, self.seconds = ctx.teacher.eval(), part, None, 0.0
        if ctx.augment is None:
            device = str(ctx.data.device)
            key = (teacher_fingerprint(ctx.teacher), part, ctx.data.key, device)
            with FrozenTeacher._lock:  # concurrent students of one sweep compute it once
                if key not in FrozenTeacher._tables:
                    # One table per device and part (concurrent students may train on several GPUs).
                    FrozenTeacher._tables = {k: v for k, v in FrozenTeacher._tables.items()
                                             if (k[1], k[3]) != (part, device)}
                    start = time.perf_counter()
                    FrozenTeacher._tables[key] = self._outputs_of_pool(ctx)
                    if ctx.data.device.type == "cuda":  # other threads' streams read it next
                        torch.cuda.current_stream(ctx.data.device).synchronize()
                    self.seconds = time.perf_counter() - start
                self.table = FrozenTeacher._tables[key]

    def _outputs(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher(images) if self.part == "logits" else features_before_head(self.teacher, images)

    def _outputs_of_pool(self, ctx: StudentContext) -> torch.Tensor:
        pool = [ctx.data.x("train"), ctx.data.transfer()]
        with torch.no_grad():
            return torch.cat([self._outputs(images) for x in pool if x is not None
                              for images in in_batches(x, inference_batch(x), ctx.data.device)])

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table[index]
        with torch.no_grad():
            return self._outputs(x)


def kd_loss(teacher: FrozenTeacher, kd: KDConfig):
    """Hinton's loss against a frozen teacher; unlabeled examples get the soft term only."""

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return distillation_loss(logits, teacher(x, index), y, kd.temperature, kd.alpha, kd.soft_loss)

    return loss


def train_kd(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """A new student taught by Hinton's KD against the frozen teacher; its compute includes
    the teacher's logits table when this student built it."""
    student, teacher = ctx.new_student(), FrozenTeacher(ctx)
    result = ctx.teach(student, kd_loss(teacher, ctx.kd))
    result.seconds += teacher.seconds
    return student, result


def teacher_fingerprint(teacher: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
