"""Hinton KD against a frozen teacher (``kd``), and ``kd_tuned``: KD at the grid point that
scores best on the validation split, searched once per setting and cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
import time

import torch
from torch import nn

from meta.distill import distillation_loss
from models.external import features_before_head
from pipelines.common.home import cache_dir, cache_key, made_once, write_json
from pipelines.config.students import KDConfig
from pipelines.engine import distributed
from pipelines.engine.device import in_batches, inference_batch
from pipelines.engine.loop import TrainResult
from pipelines.engine.metrics import validation_accuracy
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


def with_kd(ctx: StudentContext, point: dict, **changes) -> StudentContext:
    """``ctx`` with ``kd`` settings replaced by ``point`` (alpha, temperature, transfer_ratio)."""
    return dataclasses.replace(ctx, kd=ctx.kd.model_copy(update=point), **changes)


def teacher_fingerprint(teacher: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def kd_grid(ctx: StudentContext) -> dict:
    """``kd_tuned``'s search, once per setting: every (alpha, temperature[, transfer
    ratio]) point of the grid trains a ``kd`` student with seed ``kd.grid_seed`` and is
    scored on the held-out labelled images (quiz and validation splits, as ``meta_distill``
    sees them).  Cached under the project home by data, teacher,
    student and grid, so the seeds of a sweep (and torchrun workers) share one search.
    Returns ``{"point", "grid_seconds", "table"}``."""
    kd, student_cfg = ctx.kd, ctx.student
    key = cache_key(3, data=ctx.data.key, teacher=teacher_fingerprint(ctx.teacher),
                    student=student_cfg.model_dump(mode="json", exclude={"methods", "seeds"}),
                    init=ctx.init.sha256 if ctx.init else None,
                    kd=kd.model_dump(mode="json", exclude={"alpha", "temperature"}),
                    augment=ctx.augment_key)
    path = cache_dir("kd_tuned") / f"{key}.json"
    cached = lambda: json.loads(path.read_text()) if path.is_file() else None
    if distributed.world().size > 1:  # every rank searches together: a lock held by one would stall the others
        return cached() or _search_grid(ctx, path)
    # Concurrent kd_tuned students (of a sweep, or of overlapping runs) search once; the others read it.
    return made_once(f"kd_tuned-{key}", cached, lambda: _search_grid(ctx, path))


def _search_grid(ctx: StudentContext, path) -> dict:
    kd = ctx.kd
    table = []
    for ratio in kd.grid_transfer_ratio or [kd.transfer_ratio]:
        for alpha in kd.grid_alpha:
            for temperature in kd.grid_temperature:
                point = {"alpha": alpha, "temperature": temperature, "transfer_ratio": ratio}
                sub = with_kd(ctx, point, seed=kd.grid_seed, on_log=None, checkpoint=None,
                              desc=f"{ctx.desc} grid alpha={alpha} T={temperature} ratio={ratio}")
                student, result = train_kd(sub)
                table.append({**point, "val_acc": validation_accuracy(student, *ctx.held_out()),
                              "seconds": result.seconds})
    best = max(table, key=lambda row: row["val_acc"])  # ties: the first point of the grid
    record = {"point": {k: best[k] for k in ("alpha", "temperature", "transfer_ratio")},
              "grid_seconds": sum(row["seconds"] for row in table), "table": table}
    if distributed.world().is_main:
        write_json(path, record, indent=1)
    return record


def train_kd_tuned(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """``kd`` at the grid point that scored best on the held-out images; its compute is
    the whole grid's plus its own."""
    grid = kd_grid(ctx)
    tuned = with_kd(ctx, grid["point"])
    student, result = train_kd(tuned)
    result.seconds += grid["grid_seconds"]
    if ctx.on_log is not None:
        ctx.on_log(0, {f"kd_tuned_{k}": float(v) for k, v in grid["point"].items()}
                   | {"kd_tuned_grid_seconds": grid["grid_seconds"]}
                   | {f"kd_grid_val_acc_a{r['alpha']}_t{r['temperature']}_r{r['transfer_ratio']}": r["val_acc"]
                      for r in grid["table"]})
    return student, result
