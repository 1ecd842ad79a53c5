"""Stage bodies in plain Python (no Prefect, no MLflow): the flow wraps and tracks them."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.registry import build_model
from pipelines.augment_search import augmenter_for, policy_fingerprint
from models.normalize import unwrap
from models.weights import load_weights, save_weights
from pipelines import sources
from pipelines.checkpoint import Checkpointer
from pipelines.config import PipelineConfig
from pipelines.data import Prepared
from pipelines.evaluate import Evaluation, evaluate
from pipelines.home import cache_dir
from pipelines.students import STUDENT_METHODS, StudentContext
from pipelines.training import LogFn, TrainResult, accuracy, cross_entropy, train_classifier

TEACHER_CACHE_VERSION = 3  # 2: per-sample augmentation seeds; 3: fixed ops batched, hash-seeded


def model_spec(arch: str, kwargs: dict, data: Prepared) -> dict:
    """Everything needed to rebuild a model and feed it raw [0, 1] images."""
    return {"arch": arch, "kwargs": kwargs, "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "class_names": data.class_names,
            "mean": data.mean, "std": data.std, "data_key": data.key}


@dataclass
class TeacherOutcome:
    model: nn.Module
    result: TrainResult | None  # None when loaded from cache or used as brought
    key: str
    seconds: float
    cached: bool = False


def teacher_key(cfg: PipelineConfig, data: Prepared) -> str:
    teacher = cfg.teacher.model_dump(mode="json", include={"model", "train", "seed"})
    if cfg.teacher.brought():  # the weights themselves, not the reference (an alias may move)
        source = sources.teacher_source(cfg, data.input_shape)
        teacher = {"sha256": source.sha256, "spec": source.spec, "seed": cfg.teacher.seed,
                   "finetune": cfg.teacher.finetune.model_dump(mode="json")}
    augment = policy_fingerprint(cfg, data)
    blob = json.dumps({"v": TEACHER_CACHE_VERSION, "data": data.key, "augment": augment, "teacher": teacher},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def teacher_spec(cfg: PipelineConfig, data: Prepared, source: sources.Source | None = None) -> dict:
    """The spec the teacher's weights are saved with (a brought teacher keeps its own input)."""
    if cfg.teacher.brought():
        return sources.teacher_spec(source or sources.teacher_source(cfg, data.input_shape), data.num_classes,
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
    return TeacherOutcome(load_teacher(folder, data), None, folder.name, time.perf_counter() - start, cached=True)


def fit_teacher(cfg: PipelineConfig, data: Prepared, on_log: LogFn | None = None,
                checkpoint: Checkpointer | None = None,
                source: sources.Source | None = None) -> tuple[nn.Module, TrainResult | None]:
    """Train the teacher (``teacher.source=train``), or adapt the one brought from ``source``."""
    if cfg.teacher.brought():
        return fit_brought_teacher(cfg, data, source or sources.teacher_source(cfg, data.input_shape), on_log,
                                   checkpoint)
    torch.manual_seed(cfg.teacher.seed)
    model = build_model(cfg.teacher.model.arch, data.input_shape, data.num_classes,
                        **cfg.teacher.model.kwargs).to(data.device)
    result = train_classifier(model, data.x("train"), data.y("train"), cfg.teacher.train,
                              cross_entropy, seed=cfg.teacher.seed,
                              augment=augmenter_for(cfg, data) if cfg.teacher.train.augment else None,
                              val=(data.x("val"), data.y("val")), on_log=on_log, desc="teacher", checkpoint=checkpoint,
                              device=data.device)
    return model, result


def fit_brought_teacher(cfg: PipelineConfig, data: Prepared, source: sources.Source, on_log: LogFn | None = None,
                        checkpoint: Checkpointer | None = None) -> tuple[nn.Module, TrainResult | None]:
    """The brought teacher fed from this data; with ``teacher.finetune``, a new head for the
    data's classes and ``finetune.steps`` of cross-entropy on the head or the whole network."""
    sources.check_teacher(source, cfg, data.input_shape, data.num_classes)
    ft = cfg.teacher.finetune
    base, head = sources.start_from(source, data.num_classes, cfg.teacher.seed)
    model = sources.fed_by_data(base, source.spec, data).to(data.device)
    if ft.mode == "none":
        return model.eval(), None
    for name, p in base.named_parameters():
        p.requires_grad_(ft.mode == "all" or name in head)
    result = train_classifier(model, data.x("train"), data.y("train"), ft, cross_entropy, seed=cfg.teacher.seed,
                              augment=augmenter_for(cfg, data) if ft.augment else None,
                              val=(data.x("val"), data.y("val")), on_log=on_log, desc=f"teacher finetune ({ft.mode})",
                              checkpoint=checkpoint, device=data.device)
    base.requires_grad_(True)
    return model, result


def save_teacher(model: nn.Module, cfg: PipelineConfig, data: Prepared) -> None:
    save_weights(unwrap(model), teacher_folder(cfg, data), teacher_spec(cfg, data))


def train_teacher(cfg: PipelineConfig, data: Prepared, on_log: LogFn | None = None) -> TeacherOutcome:
    """Train the teacher, or reuse the cached one trained on the same inputs."""
    if (cached := cached_teacher(cfg, data)) is not None:
        return cached
    start = time.perf_counter()
    model, result = fit_teacher(cfg, data, on_log)
    save_teacher(model, cfg, data)  # also a brought one as it is: torchrun workers read this folder
    return TeacherOutcome(model, result, teacher_key(cfg, data), time.perf_counter() - start)


@dataclass
class StudentOutcome:
    method: str
    seed: int
    model: nn.Module
    result: TrainResult
    evaluation: Evaluation
    val_acc: float
    run_id: str = ""
    learned_teacher: nn.Module | None = None


def fit_student(method: str, cfg: PipelineConfig, data: Prepared, teacher: nn.Module, seed: int,
                on_log: LogFn | None = None, checkpoint: Checkpointer | None = None,
                init: sources.Source | None = None) -> tuple[nn.Module, TrainResult, nn.Module | None]:
    """Train one student (from ``init``'s weights when given); returns it, its curves, and
    the learned teacher (if any)."""
    ctx = StudentContext(cfg=cfg, data=data, teacher=teacher, seed=seed, on_log=on_log,
                         desc=f"student {method} seed {seed}", checkpoint=checkpoint, init=init)
    model, result = STUDENT_METHODS[method](ctx)
    return model, result, ctx.learned_teacher


def finish_student(method: str, seed: int, model: nn.Module, result: TrainResult, data: Prepared,
                   learned_teacher: nn.Module | None = None) -> StudentOutcome:
    evaluation = evaluate(model, data.x("test"), data.y("test"), data.num_classes)
    val_acc = accuracy(model, data.x("val"), data.y("val")) if len(data.y("val")) else 0.0
    return StudentOutcome(method, seed, model, result, evaluation, val_acc, learned_teacher=learned_teacher)


def train_student(method: str, cfg: PipelineConfig, data: Prepared, teacher: nn.Module, seed: int,
                  on_log: LogFn | None = None, init: sources.Source | None = None) -> StudentOutcome:
    model, result, learned_teacher = fit_student(method, cfg, data, teacher, seed, on_log, init=init)
    return finish_student(method, seed, model, result, data, learned_teacher)


def load_stage_output(folder: Path, data: Prepared) -> tuple[nn.Module, TrainResult, nn.Module | None]:
    """What rank 0 of a torchrun stage left in ``folder`` (see ``pipelines.train``): the
    trained network as saved (a brought teacher's without its input adapter), its curves,
    and the learned teacher fed from ``data``."""
    raw = json.loads((folder / "result.json").read_text())
    result = TrainResult(curve={k: [tuple(p) for p in v] for k, v in raw["curve"].items()},
                         seconds=raw["seconds"], steps=raw["steps"])
    model, _ = load_weights(folder / "model")
    model = model.to(data.device)
    learned = None
    if (folder / "learned_teacher").is_dir():
        learned = load_teacher(folder / "learned_teacher", data)
    return model, result, learned


def summarise(outcomes: list[StudentOutcome]) -> list[dict]:
    """One row per method: mean and std over seeds of the test metrics, train seconds."""
    rows = []
    for method in dict.fromkeys(o.method for o in outcomes):
        runs = [o for o in outcomes if o.method == method]
        accs = np.array([o.evaluation.accuracy for o in runs])
        rows.append({"method": method, "test_acc": float(accs.mean()),
                     "test_acc_std": float(accs.std(ddof=1)) if len(accs) > 1 else 0.0,
                     "test_loss": float(np.mean([o.evaluation.loss for o in runs])),
                     "test_ece": float(np.mean([o.evaluation.ece for o in runs])),
                     "train_seconds": float(np.mean([o.result.seconds for o in runs])),
                     "seeds": len(runs)})
    return rows


class NoStudentLearned(RuntimeError):
    """Every candidate is at chance: nothing may be chosen or registered."""


def at_chance(outcome: StudentOutcome) -> bool:
    """Test accuracy under 1.5x chance (25% of 10 classes would pass, 15% would not)."""
    classes = len(outcome.evaluation.per_class_accuracy)
    return outcome.evaluation.accuracy < 1.5 / classes


def best_student(outcomes: list[StudentOutcome]) -> StudentOutcome:
    """Chosen on validation accuracy (ties: first wins), so the test split stays an
    unbiased estimate for the promotion gate; a student at chance is never chosen."""
    learned = [o for o in outcomes if not at_chance(o)]
    if not learned:
        raise NoStudentLearned("every student is at chance on the test split ("
                               + ", ".join(f"{o.method} seed {o.seed}: {o.evaluation.accuracy:.3f}" for o in outcomes)
                               + "); nothing is registered")
    return max(learned, key=lambda o: o.val_acc)


def comparison_markdown(rows: list[dict]) -> str:
    lines = ["| method | test acc (mean ± std) | test loss | ECE | train s | seeds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {100 * r['test_acc']:.2f} ± {100 * r['test_acc_std']:.2f} | "
              f"{r['test_loss']:.4f} | {r['test_ece']:.4f} | {r['train_seconds']:.1f} | {r['seeds']} |" for r in rows]
    return "\n".join(lines) + "\n"


def comparison_csv(rows: list[dict]) -> str:
    keys = ["method", "test_acc", "test_acc_std", "test_loss", "test_ece", "train_seconds", "seeds"]
    return "\n".join([",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]) + "\n"
