"""Student methods: name -> function that trains one student and returns it.

Every method receives the same :class:`StudentContext` (same student architecture, same
budget, same seed-driven data order and initialisation), so the comparison is fair.
Teacher-based methods (``kd``, ``kd_tuned``, ``meta_distill``...) also draw unlabeled
transfer examples beside each labelled batch and end with the same label fine-tune; the
others see labels only.  A new method is one function, one registry entry here, and its
name in ``pipelines.config.METHOD_NAMES``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from meta.distill import distillation_loss
from meta.functional import Params, params_of
from models.registry import build_model
from pipelines import distributed
from pipelines.augment_search import augmenter_for, policy_fingerprint
from pipelines.checkpoint import Checkpointer
from pipelines.config import KDConfig
from pipelines.home import cache_dir
from pipelines.rng import global_rng
from pipelines.sources import Source, start_from
from pipelines.training import (LogFn, TrainResult, Transfer, check_finite, cross_entropy, in_batches, inference_batch,
                                part_of, rows, train_classifier, validation_accuracy)

if TYPE_CHECKING:
    from pipelines.config import PipelineConfig
    from pipelines.data import Prepared


@dataclass
class StudentContext:
    cfg: PipelineConfig
    data: Prepared
    teacher: nn.Module
    seed: int
    on_log: LogFn | None = None
    desc: str = "student"
    learned_teacher: nn.Module | None = None  # set by methods that train the teacher too
    checkpoint: Checkpointer | None = None  # set by torchrun workers, for elastic recovery
    init: Source | None = None  # student.init: the weights every method starts from
    rng_after_init: torch.Tensor | None = None  # the global generator's state right after new_student

    def new_student(self) -> nn.Module:
        with global_rng(self.seed):
            if self.init is not None:
                model = start_from(self.init, self.data.num_classes, self.seed)[0]
            else:
                model_cfg = self.cfg.student.model
                model = build_model(model_cfg.arch, self.data.input_shape, self.data.num_classes, **model_cfg.kwargs)
            self.rng_after_init = torch.get_rng_state()
        return model.to(self.data.device)

    def augmenter(self):
        if not self.cfg.student.train.augment:
            return None
        return augmenter_for(self.cfg, self.data)

    def transfer(self) -> Transfer | None:
        """The unlabeled examples drawn beside each labelled batch (teacher-based methods)."""
        x, per_step = self.data.transfer(), self.cfg.kd.transfer_batch(self.cfg.student.train.batch_size)
        return Transfer(x, per_step) if x is not None and per_step > 0 else None

    def fit(self, model: nn.Module, loss_fn, transfer: Transfer | None = None) -> TrainResult:
        return train_classifier(
            model, self.data.x("train"), self.data.y("train"), self.cfg.student.train, loss_fn,
            seed=self.seed, augment=self.augmenter(),
            val=(self.data.x("val"), self.data.y("val")), on_log=self.on_log, desc=self.desc,
            checkpoint=self.checkpoint, transfer=transfer, device=self.data.device)

    def teach(self, model: nn.Module, loss_fn) -> TrainResult:
        """Training of every teacher-based method: labelled and transfer examples under
        ``loss_fn``, then the same label fine-tune (``student.finetune_steps``)."""
        result = self.fit(model, loss_fn, self.transfer())
        if self.cfg.student.finetune_steps:
            self.finetune(model, result)
        return result

    def finetune(self, model: nn.Module, result: TrainResult) -> None:
        """Cross-entropy steps on the labels at a constant rate; curves and seconds are
        added to ``result``, with steps counted on from the main training's."""
        train = self.cfg.student.train
        optimizer = train.optimizer.model_copy(update={"lr": self.cfg.student.finetune_lr, "schedule": "constant"})
        cfg = train.model_copy(update={"steps": self.cfg.student.finetune_steps, "optimizer": optimizer})
        on_log = (lambda step, m: self.on_log(train.steps + step, m)) if self.on_log else None
        tuned = train_classifier(model, self.data.x("train"), self.data.y("train"), cfg, cross_entropy,
                                 seed=self.seed + 1, augment=self.augmenter(),
                                 val=(self.data.x("val"), self.data.y("val")), on_log=on_log,
                                 desc=f"{self.desc} finetune", checkpoint=self.checkpoint, phase="finetune",
                                 device=self.data.device)
        result.curve.update({f"finetune_{k}": [(train.steps + s, v) for s, v in c] for k, c in tuned.curve.items()})
        result.seconds += tuned.seconds


StudentMethod = Callable[[StudentContext], tuple[nn.Module, TrainResult]]


def train_scratch(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student = ctx.new_student()
    return student, ctx.fit(student, cross_entropy)


class FrozenTeacher:
    """The frozen teacher's logits for a batch.  When the student's inputs are not
    augmented, they are computed once for the whole training pool (train rows, then
    transfer rows) and looked up by row: a teacher forward per step costs 10-30x the small
    student's step.  The table is kept for the last (teacher, data) pair of each device, so
    the seeds and methods of a sweep share it."""

    _tables: dict[str, torch.Tensor] = {}
    _lock = threading.Lock()

    def __init__(self, ctx: StudentContext):
        self.teacher, self.table = ctx.teacher.eval(), None
        if ctx.augmenter() is None:
            key = f"{_teacher_fingerprint(ctx.teacher)}/{ctx.data.key}/{ctx.data.device}"
            with FrozenTeacher._lock:  # concurrent students of one sweep compute it once
                if key not in FrozenTeacher._tables:
                    # One table per device (concurrent students may train on several GPUs).
                    FrozenTeacher._tables = {k: v for k, v in FrozenTeacher._tables.items()
                                             if k.rsplit("/", 1)[1] != str(ctx.data.device)}
                    FrozenTeacher._tables[key] = self._logits_of_pool(ctx)
                    if ctx.data.device.type == "cuda":  # other threads' streams read it next
                        torch.cuda.current_stream(ctx.data.device).synchronize()
                self.table = FrozenTeacher._tables[key]

    def _logits_of_pool(self, ctx: StudentContext) -> torch.Tensor:
        pool = [ctx.data.x("train"), ctx.data.transfer()]
        with torch.no_grad():
            return torch.cat([self.teacher(images) for x in pool if x is not None
                              for images in in_batches(x, inference_batch(x), ctx.data.device)])

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table[index]
        with torch.no_grad():
            return self.teacher(x)


def kd_loss(teacher: FrozenTeacher, kd: KDConfig):
    """Hinton's loss against a frozen teacher; unlabeled examples get the soft term only."""

    def loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return distillation_loss(logits, teacher(x, index), y, kd.temperature, kd.alpha, kd.soft_loss)

    return loss


def train_kd(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student = ctx.new_student()
    return student, ctx.teach(student, kd_loss(FrozenTeacher(ctx), ctx.cfg.kd))


def with_kd(ctx: StudentContext, point: dict, **changes) -> StudentContext:
    """``ctx`` with ``kd`` settings replaced by ``point`` (alpha, temperature, transfer_ratio)."""
    cfg = ctx.cfg.model_copy(update={"kd": ctx.cfg.kd.model_copy(update=point)})
    return dataclasses.replace(ctx, cfg=cfg, **changes)


def _teacher_fingerprint(teacher: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def kd_grid(ctx: StudentContext) -> dict:
    """``kd_tuned``'s search, once per setting: every (alpha, temperature[, transfer
    ratio]) point of the grid trains a ``kd`` student with seed ``kd.grid_seed`` and is
    scored on the validation split.  Cached under the project home by data, teacher,
    student and grid, so the seeds of a sweep (and torchrun workers) share one search.
    Returns ``{"point", "grid_seconds", "table"}``."""
    kd, student_cfg = ctx.cfg.kd, ctx.cfg.student
    key = hashlib.sha256(json.dumps({
        "v": 2, "data": ctx.data.key, "teacher": _teacher_fingerprint(ctx.teacher),
        "student": student_cfg.model_dump(mode="json", exclude={"methods", "seeds"}),
        "init": ctx.init.sha256 if ctx.init else None,
        "kd": kd.model_dump(mode="json", exclude={"alpha", "temperature"}),
        "augment": policy_fingerprint(ctx.cfg, ctx.data)}, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir("kd_tuned") / f"{key}.json"
    with _GRID_LOCK:  # concurrent kd_tuned students of a sweep search once, the others read the cache
        if path.is_file():
            return json.loads(path.read_text())
        return _search_grid(ctx, path)


_GRID_LOCK = threading.Lock()


def _search_grid(ctx: StudentContext, path) -> dict:
    kd = ctx.cfg.kd
    table = []
    for ratio in kd.grid_transfer_ratio or [kd.transfer_ratio]:
        for alpha in kd.grid_alpha:
            for temperature in kd.grid_temperature:
                point = {"alpha": alpha, "temperature": temperature, "transfer_ratio": ratio}
                sub = with_kd(ctx, point, seed=kd.grid_seed, on_log=None, checkpoint=None,
                              desc=f"{ctx.desc} grid alpha={alpha} T={temperature} ratio={ratio}")
                student = sub.new_student()
                result = sub.teach(student, kd_loss(FrozenTeacher(sub), sub.cfg.kd))
                table.append({**point, "val_acc": validation_accuracy(student, ctx.data.x("val"), ctx.data.y("val")),
                              "seconds": result.seconds})
    best = max(table, key=lambda row: row["val_acc"])  # ties: the first point of the grid
    record = {"point": {k: best[k] for k in ("alpha", "temperature", "transfer_ratio")},
              "grid_seconds": sum(row["seconds"] for row in table), "table": table}
    if distributed.world().is_main:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, path)
    return record


def train_kd_tuned(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """``kd`` at the grid point that scored best on the validation split; its compute is
    the whole grid's plus its own."""
    grid = kd_grid(ctx)
    tuned = with_kd(ctx, grid["point"])
    student = tuned.new_student()
    result = tuned.teach(student, kd_loss(FrozenTeacher(tuned), tuned.cfg.kd))
    result.seconds += grid["grid_seconds"]
    if ctx.on_log is not None:
        ctx.on_log(0, {f"kd_tuned_{k}": float(v) for k, v in grid["point"].items()}
                   | {"kd_tuned_grid_seconds": grid["grid_seconds"]}
                   | {f"kd_grid_val_acc_a{r['alpha']}_t{r['temperature']}_r{r['transfer_ratio']}": r["val_acc"]
                      for r in grid["table"]})
    return student, result


def _maml_initialised(ctx: StudentContext):
    """A new student whose initialisation is meta-learned (``ctx.cfg.maml``) over tasks
    drawn from the training split: random class subsets with permuted labels."""
    from meta.tasks import TaskSampler
    from pipelines.meta_train import meta_train

    student, meta = ctx.new_student(), ctx.cfg.maml
    sampler = TaskSampler.from_labels(ctx.data.x("train"), ctx.data.y("train"), meta.ways or ctx.data.num_classes,
                                      meta.shots, meta.queries, meta.rotations, select=part_of)
    return student, meta_train(student, sampler, meta, seed=ctx.seed, on_log=ctx.on_log, desc=f"{ctx.desc} meta",
                               checkpoint=ctx.checkpoint)


def train_maml_init(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """Meta-learned initialisation, then the same training as ``scratch``; the reported
    train seconds include meta-training."""
    student, meta_result = _maml_initialised(ctx)
    result = ctx.fit(student, cross_entropy)
    result.seconds += meta_result.seconds
    result.curve.update(meta_result.curve)
    return student, result


class MetaDistillLoss:
    """The KD loss of ``kd``, taught by a teacher that learns to teach.

    What is learned (``meta_distill.learn``) is the teacher's weights and/or the teaching
    knobs of ``meta.teaching`` on a frozen teacher.  Every ``interval`` student steps in
    the update window, before the student's own step, they take one step on the pilot
    student's quiz loss (``meta.metadistill``); the student then steps on the updated
    teaching.  The pilot never touches the real student or its optimiser, so with learning
    rates 0 the trajectory is ``kd``'s."""

    def __init__(self, ctx: StudentContext, student: nn.Module):
        import copy

        from meta.metadistill import Pilot
        from meta.teaching import TeachingKnobs

        cfg, kd = ctx.cfg.meta_distill, ctx.cfg.kd
        self.ctx, self.cfg, self.student = ctx, cfg, student
        self.learns_teacher = "teacher" in cfg.learn
        self.teacher = copy.deepcopy(ctx.teacher).eval().requires_grad_(self.learns_teacher)
        self.frozen = None if self.learns_teacher else FrozenTeacher(ctx)
        with global_rng(state=ctx.rng_after_init):  # the draws that follow the student's, as in a run alone
            self.knobs = TeachingKnobs(ctx.data.num_classes, kd.temperature, kd.alpha, kd.soft_loss,
                                       [k for k in cfg.learn if k != "teacher"]).to(ctx.data.device)
        groups = ([{"params": list(self.teacher.parameters()), "lr": cfg.teacher_lr}] if self.learns_teacher else [])
        if self.knobs.knobs:
            groups.append({"params": list(self.knobs.parameters()), "lr": cfg.knob_lr})
        for group in groups:
            group["base_lr"] = group["lr"]
        self.optimizer = torch.optim.Adam(groups) if cfg.teacher_optimizer == "adam" else torch.optim.SGD(groups)
        self.pilot = Pilot(cfg.pilot_steps, cfg.pilot_lr or ctx.cfg.student.train.optimizer.lr,
                           kd.temperature, kd.alpha, kd.soft_loss, average=distributed.differentiable_mean)
        self.quiz = (ctx.data.x("quiz"), ctx.data.y("quiz"))
        self.generator = torch.Generator().manual_seed(10_000 + ctx.seed)  # never the data order's
        self.step, self.updates = 0, 0
        self.window = (cfg.start_step, cfg.stop_step or ctx.cfg.student.train.steps)

    def meta_params(self) -> Params:
        """What the meta-gradient updates, by prefixed name."""
        teacher = {f"teacher.{k}": v for k, v in self.teacher.named_parameters()} if self.learns_teacher else {}
        return {**teacher, **{f"knobs.{k}": v for k, v in self.knobs.named_parameters()}}

    def distill_fn(self, x: torch.Tensor, index: torch.Tensor, params: Params):
        """The distillation loss on batch ``x`` as a function of ``params`` (see meta_params)."""
        from meta.functional import forward

        knob_params = {k.removeprefix("knobs."): v for k, v in params.items() if k.startswith("knobs.")}
        if self.learns_teacher:
            teacher_logits = forward(self.teacher, {k.removeprefix("teacher."): v for k, v in params.items()
                                                    if k.startswith("teacher.")}, x)
        else:
            teacher_logits = self.frozen(x, index)
        return lambda logits, y: functional_call(self.knobs, knob_params, (logits, teacher_logits, y))

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self.step += 1
        start, stop = self.window
        if start < self.step <= stop and (self.step - 1) % self.cfg.interval == 0:
            self.update_teacher(x, y, index)
        with torch.no_grad():
            frozen = {k: v.detach() for k, v in self.meta_params().items()}
            distill = self.distill_fn(x, index, frozen)
        return distill(logits, y)

    def _set_lr(self) -> None:
        if self.cfg.lr_schedule == "cosine":
            start, stop = self.window
            scale = 0.5 * (1 + math.cos(math.pi * (self.step - 1 - start) / max(1, stop - start)))
        else:
            scale = 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * scale

    def update_teacher(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> None:
        from meta.metadistill import first_order_teacher_grad, meta_grad

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
        check_finite(before, self.ctx.desc, self.step, "pilot quiz loss")
        if self.cfg.teacher_ce_weight > 0 and self.learns_teacher:
            labelled = y >= 0
            ce = self.cfg.teacher_ce_weight * F.cross_entropy(self.teacher(x[labelled]), y[labelled])
            t_names = [k for k in params if k.startswith("teacher.")]
            for k, extra in zip(t_names, torch.autograd.grad(ce, [params[k] for k in t_names])):
                grads[k] = grads[k] + extra
        distributed.average_(list(grads.values()))  # this rank's shard -> the global batch's gradient
        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        for k, p in params.items():
            p.grad = grads[k]
        self.optimizer.step()
        self.updates += 1
        if self.ctx.on_log is not None and self.updates % 10 == 1:
            self.log(x, y, index, quiz, before)

    def log(self, x, y, index, quiz, before: float) -> None:
        from meta.metadistill import quiz_loss_after_pilot

        frozen = {k: v.detach() for k, v in self.meta_params().items()}
        after = quiz_loss_after_pilot(self.student, params_of(self.student), self.distill_fn(x, index, frozen),
                                      (x, y), quiz, self.pilot).item()
        before, after = distributed.mean_scalars([before, after])
        self.ctx.on_log(self.step, {"teacher_quiz_loss_before": before, "teacher_quiz_loss_after": after,
                                    **self.knobs.summary()})

    def state_dict(self) -> dict:
        return {"teacher": self.teacher.state_dict(), "knobs": self.knobs.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "step": self.step, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.knobs.load_state_dict(state["knobs"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.updates = state["step"], state["updates"]


def _meta_distill(ctx: StudentContext, student: nn.Module) -> TrainResult:
    loss = MetaDistillLoss(ctx, student)
    result = ctx.teach(student, loss)
    if loss.learns_teacher:
        ctx.learned_teacher = loss.teacher.eval()
    if ctx.on_log is not None and loss.knobs.knobs:
        ctx.on_log(ctx.cfg.student.train.steps, loss.knobs.summary())
    return result


def train_meta_distill(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student = ctx.new_student()
    return student, _meta_distill(ctx, student)


def train_meta_distill_maml_init(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    """``maml_init``'s meta-learned initialisation, then ``meta_distill``'s training."""
    student, meta_result = _maml_initialised(ctx)
    result = _meta_distill(ctx, student)
    result.seconds += meta_result.seconds
    return student, result


STUDENT_METHODS: dict[str, StudentMethod] = {
    "scratch": train_scratch,
    "kd": train_kd,
    "kd_tuned": train_kd_tuned,
    "maml_init": train_maml_init,
    "meta_distill": train_meta_distill,
    "meta_distill+maml_init": train_meta_distill_maml_init,
}
