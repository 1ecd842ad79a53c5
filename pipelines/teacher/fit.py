"""The teacher stage's body: training or adapting the teacher, saving, caching and loading
it.  Its functions take a :class:`~pipelines.teacher.context.TeacherContext` (the keys
live there)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.normalize import unwrap
from models.registry import build_model
from models.weights import load_weights, save_weights
from pipelines.augment.search import augmenter_for
from pipelines.common.home import made_once, write_json
from pipelines.config.teacher import TeacherConfig
from pipelines.data.prepared import Prepared, model_spec
from pipelines.engine.batches import Augment
from pipelines.engine.checkpoint import Checkpointer
from pipelines.engine.loop import LogFn, TrainResult, supervised_loss, train_classifier
from pipelines.teacher import sources
from pipelines.teacher.context import TeacherContext


@dataclass
class TeacherOutcome:
    """A teacher as a stage gives it: the labelled one, or the improved one (``mask_rate``),
    trained now or read from the cache folder named ``key``."""

    model: nn.Module
    result: TrainResult | None  # None when loaded from cache or used as brought
    key: str
    seconds: float
    cached: bool = False
    train_seconds: float | None = None  # what training it cost, this run or the one that cached it
    mask_rate: float | None = None  # the improvement's mean share of pseudo-labels kept (None: not trained now)


def record_cost(folder: Path, seconds: float) -> None:
    """Remember beside cached weights what producing them cost, so a run that reuses them
    can still count it (the benchmarks' end-to-end costs)."""
    write_json(folder / "cost.json", {"train_seconds": seconds})


def recorded_cost(folder: Path) -> float | None:
    path = folder / "cost.json"
    return float(json.loads(path.read_text())["train_seconds"]) if path.is_file() else None


def teacher_spec(ctx: TeacherContext) -> dict:
    """The spec the teacher's weights are saved with (a brought teacher keeps its own input)."""
    data = ctx.data
    if ctx.teacher.brought():
        return sources.brought_spec(ctx.source, data.num_classes, data.class_names, data.key)
    return model_spec(ctx.teacher.model.arch, ctx.teacher.model.kwargs, data)


def load_teacher(folder: Path, data: Prepared) -> nn.Module:
    """A saved teacher, fed from the prepared data (resized/renormalised if its spec says so)."""
    model, spec = load_weights(folder)
    return sources.fed_by_data(model, spec, data).to(data.device)


def cached_teacher(folder: Path, data: Prepared) -> TeacherOutcome | None:
    """The teacher saved in the cache ``folder`` (the labelled or the improved one's), or
    None when nothing is saved there yet."""
    start = time.perf_counter()
    if not (folder / "model.safetensors").is_file():
        return None
    return TeacherOutcome(load_teacher(folder, data), None, folder.name, time.perf_counter() - start, cached=True,
                          train_seconds=recorded_cost(folder))


def fit_teacher(teacher: TeacherConfig, data: Prepared, augment: Augment | None, on_log: LogFn | None = None,
                checkpoint: Checkpointer | None = None,
                source: sources.WeightsSource | None = None) -> tuple[nn.Module, TrainResult | None]:
    """Train the teacher of ``teacher`` from scratch, or adapt the one brought from ``source``."""
    if source is not None:
        return fit_brought_teacher(teacher, data, source, augment, on_log, checkpoint)
    torch.manual_seed(teacher.seed)
    model = build_model(teacher.model.arch, data.input_shape, data.num_classes, **teacher.model.kwargs).to(data.device)
    result = train_classifier(model, data.x("train"), data.y("train"), teacher.train, supervised_loss, seed=teacher.seed,
                              augment=augment, val=(data.x("val"), data.y("val")), on_log=on_log, desc="teacher",
                              checkpoint=checkpoint, device=data.device)
    return model, result


def fit_brought_teacher(teacher: TeacherConfig, data: Prepared, source: sources.WeightsSource, augment: Augment | None,
                        on_log: LogFn | None = None,
                        checkpoint: Checkpointer | None = None) -> tuple[nn.Module, TrainResult | None]:
    """The brought teacher fed from this data; with ``teacher.finetune``, a new head for the
    data's classes and ``finetune.steps`` of cross-entropy on the head or the whole network."""
    ft = teacher.finetune
    base, head = sources.start_from(source, data.num_classes, teacher.seed)
    model = sources.fed_by_data(base, source.spec, data).to(data.device)
    if ft.mode == "none":
        return model.eval(), None
    for name, p in base.named_parameters():
        p.requires_grad_(ft.mode == "all" or name in head)
    result = train_classifier(model, data.x("train"), data.y("train"), ft, supervised_loss, seed=teacher.seed,
                              augment=augment, val=(data.x("val"), data.y("val")), on_log=on_log,
                              desc=f"teacher finetune ({ft.mode})", checkpoint=checkpoint, device=data.device)
    base.requires_grad_(True)
    return model, result


def teacher_inputs(ctx: TeacherContext) -> tuple[sources.WeightsSource | None, Augment | None]:
    """What fitting the teacher needs beyond its own section: the brought weights (checked
    against the data and the student) and the augmentation."""
    teacher, data = ctx.teacher, ctx.data
    if teacher.brought():
        sources.check_teacher(ctx.source, teacher, ctx.student, data.input_shape, data.num_classes,
                              ctx.augmentation.data_cfg.name)
        augments = teacher.finetune.mode != "none" and teacher.finetune.augment
    else:
        augments = teacher.train.augment
    return ctx.source, (augmenter_for(ctx.augmentation) if augments else None)


def save_teacher(model: nn.Module, ctx: TeacherContext) -> None:
    save_weights(unwrap(model), ctx.teacher_folder, teacher_spec(ctx))


def obtain_teacher(ctx: TeacherContext, on_log: LogFn | None = None) -> TeacherOutcome:
    """Train the teacher, or reuse the cached one trained on the same inputs (overlapping
    runs train it once: the others wait for it)."""
    return made_once(f"teacher-{ctx.teacher_key}", lambda: cached_teacher(ctx.teacher_folder, ctx.data),
                     lambda: _train_teacher(ctx, on_log))


def _train_teacher(ctx: TeacherContext, on_log: LogFn | None) -> TeacherOutcome:
    start = time.perf_counter()
    source, augment = teacher_inputs(ctx)
    model, result = fit_teacher(ctx.teacher, ctx.data, augment, on_log, source=source)
    save_teacher(model, ctx)  # also a brought one as it is: torchrun workers read this folder
    seconds = time.perf_counter() - start
    record_cost(ctx.teacher_folder, seconds)
    return TeacherOutcome(model, result, ctx.teacher_key, seconds, train_seconds=seconds)
