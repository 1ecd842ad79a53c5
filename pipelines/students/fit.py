"""The student stage's body: train one student with its method, then evaluate it."""

from __future__ import annotations

from torch import nn

from pipelines.config.pipeline import PipelineConfig
from pipelines.data.prepared import Prepared
from pipelines.engine.checkpoint import Checkpointer
from pipelines.engine.loop import LogFn, TrainResult
from pipelines.evaluate.compare import StudentOutcome
from pipelines.evaluate.metrics import evaluate
from pipelines.students import paired
from pipelines.students.context import StudentContext
from pipelines.students.meta_distill import REFERENCES
from pipelines.students.methods import STUDENT_METHODS
from pipelines.teacher import sources


def fit_student(method: str, cfg: PipelineConfig, data: Prepared, teacher: nn.Module, seed: int,
                on_log: LogFn | None = None, checkpoint: Checkpointer | None = None,
                init: sources.WeightsSource | None = None) -> tuple[nn.Module, TrainResult, nn.Module | None]:
    """Train one student (from ``init``'s weights when given); returns it, its curves, and
    the learned teacher (if any)."""
    ctx = StudentContext.from_config(cfg, data, teacher, seed, on_log=on_log, desc=f"student {method} seed {seed}",
                                     checkpoint=checkpoint, init=init)
    if method in REFERENCES:  # kept for meta_distill's reference of the same seed (no second training)
        model, result = paired.train_and_remember(method, ctx, STUDENT_METHODS[method])
    else:
        model, result = STUDENT_METHODS[method](ctx)
    return model, result, ctx.learned_teacher


def finish_student(method: str, seed: int, model: nn.Module, result: TrainResult, data: Prepared,
                   learned_teacher: nn.Module | None = None) -> StudentOutcome:
    evaluation = evaluate(model, data.x("test"), data.y("test"), data.num_classes)
    val_acc, val_loss, images = 0.0, None, len(data.y("val"))
    if images:  # the accuracy picks the student, the loss breaks its ties
        val = evaluate(model, data.x("val"), data.y("val"), data.num_classes)
        val_acc, val_loss = val.accuracy, val.loss
    return StudentOutcome(method, seed, model, result, evaluation, val_acc, learned_teacher=learned_teacher,
                          val_loss=val_loss, val_images=images)


def run_student(method: str, cfg: PipelineConfig, data: Prepared, teacher: nn.Module, seed: int,
                  on_log: LogFn | None = None, init: sources.WeightsSource | None = None) -> StudentOutcome:
    model, result, learned_teacher = fit_student(method, cfg, data, teacher, seed, on_log, init=init)
    return finish_student(method, seed, model, result, data, learned_teacher)
