"""The teacher stage's body: its cache key, training or adapting it, saving and loading."""

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
from pipelines.augment.search import augmenter_for, policy_fingerprint
from pipelines.common.home import cache_dir, cache_key, made_once, write_json
from pipelines.config.pipeline import PipelineConfig
from pipelines.config.teacher import TeacherConfig
from pipelines.data.prepared import Prepared, model_spec
from pipelines.engine.batches import Augment
from pipelines.engine.checkpoint import Checkpointer
from pipelines.engine.loop import LogFn, TrainResult, supervised_loss, train_classifier
from pipelines.teacher import sources

TEACHER_CACHE_VERSION = 3  # 2: per-sample augmentation seeds; 3: fixed ops batched, hash-seeded


@dataclass
class TeacherOutcome:
    model: nn.Module
    result: TrainResult | None  # None when loaded from cache or used as brought
    key: str
    seconds: float
    cached: bool = False
    train_seconds: float | None = None  # what training it cost, this run or the one that cached it


def record_cost(folder: Path, seconds: float) -> None:
    """Remember beside cached weights what producing them cost, so a run that reuses them
    can still count it (the benchmarks' end-to-end costs)."""
    write_json(folder / "cost.json", {"train_seconds": seconds})


def recorded_cost(folder: Path) -> float | None:
    path = folder / "cost.json"
    return float(json.loads(path.read_text())["train_seconds"]) if path.is_file() else None


def teacher_key(cfg: PipelineConfig, data: Prepared) -> str:
    teacher = cfg.teacher.model_dump(mode="json", include={"model", "train", "seed"})
    if cfg.teacher.brought():  # the weights themselves, not the reference (an alias may move)
        source = sources.teacher_source(cfg, data.input_shape)
        teacher = {"sha256": source.sha256, "spec": source.spec, "seed": cfg.teacher.seed,
                   "finetune": cfg.teacher.finetune.model_dump(mode="json")}
    augment = policy_fingerprint(cfg, data)
    return cache_key(TEACHER_CACHE_VERSION, data=data.key, augment=augment, teacher=teacher)


def teacher_spec(cfg: PipelineConfig, data: Prepared, source: sources.WeightsSource | None = None) -> dict:
    """The spec the teacher's weights are saved with (a brought teacher keeps its own input)."""
    if cfg.teacher.brought():
        return sources.brought_spec(source or sources.teacher_source(cfg, data.input_shape), data.num_classes,
                                    data.class_names, data.key)
    return model_spec(cfg.teacher.model.arch, cfg.teacher.model.kwargs, data)


def load_teacher(folder: Path, data: Prepared) -> nn.Module:
    """A saved teacher, fed from the prepared data (resized/renormalised if its spec says so)."""
    model, spec = load_weights(folder)
    return sources.fed_by_data(model, spec, data).to(data.device)


def teacher_folder(cfg: PipelineConfig, data: Prepared) -> Path:
    return cache_dir("teacher") / teacher_key(cfg, data)


def cached_teacher(cfg: PipelineConfig, data: Prepared) -> TeacherOutcome | None:
    start = time.perf_counter()
    folder = teacher_folder(cfg, data)
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


def teacher_inputs(cfg: PipelineConfig, data: Prepared, source: sources.WeightsSource | None = None,
                   ) -> tuple[sources.WeightsSource | None, Augment | None]:
    """What fitting ``cfg``'s teacher needs beyond its own section: the brought weights
    (resolved, and checked against the data and the student) and the augmentation."""
    if cfg.teacher.brought():
        source = source or sources.teacher_source(cfg, data.input_shape)
        sources.check_teacher(source, cfg, data.input_shape, data.num_classes)
        augments = cfg.teacher.finetune.mode != "none" and cfg.teacher.finetune.augment
    else:
        augments = cfg.teacher.train.augment
    return source, (augmenter_for(cfg, data) if augments else None)


def save_teacher(model: nn.Module, cfg: PipelineConfig, data: Prepared) -> None:
    save_weights(unwrap(model), teacher_folder(cfg, data), teacher_spec(cfg, data))


def obtain_teacher(cfg: PipelineConfig, data: Prepared, on_log: LogFn | None = None) -> TeacherOutcome:
    """Train the teacher, or reuse the cached one trained on the same inputs (overlapping
    runs train it once: the others wait for it)."""
    return made_once(f"teacher-{teacher_key(cfg, data)}", lambda: cached_teacher(cfg, data),
                     lambda: _train_teacher(cfg, data, on_log))


def _train_teacher(cfg: PipelineConfig, data: Prepared, on_log: LogFn | None) -> TeacherOutcome:
    start = time.perf_counter()
    source, augment = teacher_inputs(cfg, data)
    model, result = fit_teacher(cfg.teacher, data, augment, on_log, source=source)
    save_teacher(model, cfg, data)  # also a brought one as it is: torchrun workers read this folder
    seconds = time.perf_counter() - start
    record_cost(teacher_folder(cfg, data), seconds)
    return TeacherOutcome(model, result, teacher_key(cfg, data), seconds, train_seconds=seconds)
