"""What every student method is given: the same architecture, budget, seed-driven data
order and initialisation (so methods are paired), and the training every method shares.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from models.registry import build_model
from pipelines.augment.search import AugmentContext, augmenter_for
from pipelines.common.rng import global_rng
from pipelines.config.students import (
    DISTKDConfig,
    DKDConfig,
    KDConfig,
    MamlConfig,
    MetaDistillConfig,
    MetaDistillPilotConfig,
    StudentConfig,
)
from pipelines.engine.batches import Augment, Transfer
from pipelines.engine.checkpoint import Checkpointer
from pipelines.engine.loop import LogFn, StepHook, TrainResult, supervised_loss, train_classifier
from pipelines.engine.metrics import held_out
from pipelines.teacher.sources import WeightsSource, start_from

if TYPE_CHECKING:
    from pipelines.config.pipeline import PipelineConfig
    from pipelines.data.prepared import Prepared


@dataclass
class StudentContext:
    """One student's inputs.  It holds the config sections the methods read (``student``,
    ``kd``, ``dkd``, ``dist_kd``, ``maml``, ``meta_distill``, ``meta_distill_pilot``) and the
    augmentation the stage chose, never the whole tree: :meth:`from_config` is where the tree is taken apart."""

    student: StudentConfig
    kd: KDConfig
    maml: MamlConfig
    meta_distill: MetaDistillConfig
    augment: Augment | None  # the student's training augmentation; None when student.train.augment is off
    augment_key: dict | list  # what cache keys know of the augmentation policy
    data: Prepared
    teacher: nn.Module
    seed: int
    on_log: LogFn | None = None
    desc: str = "student"
    learned_teacher: nn.Module | None = None  # set by methods that train the teacher too
    checkpoint: Checkpointer | None = None  # set by torchrun workers, for elastic recovery
    init: WeightsSource | None = None  # student.init: the weights every method starts from
    rng_after_init: torch.Tensor | None = None  # the global generator's state right after new_student
    meta_distill_pilot: MetaDistillPilotConfig = field(default_factory=MetaDistillPilotConfig)
    dkd: DKDConfig = field(default_factory=DKDConfig)
    dist_kd: DISTKDConfig = field(default_factory=DISTKDConfig)

    @classmethod
    def from_config(cls, cfg: PipelineConfig, data: Prepared, teacher: nn.Module, seed: int,
                    **options) -> StudentContext:
        """The context of one student of ``cfg`` (``options``: on_log, desc, checkpoint, init)."""
        augmentation = AugmentContext.from_config(cfg, data)
        return cls(cfg.student, cfg.kd, cfg.maml, cfg.meta_distill,
                   augmenter_for(augmentation) if cfg.student.train.augment else None, augmentation.policy_fingerprint,
                   data, teacher, seed, meta_distill_pilot=cfg.meta_distill_pilot, dkd=cfg.dkd,
                   dist_kd=cfg.dist_kd, **options)

    def new_student(self) -> nn.Module:
        with global_rng(self.seed):
            if self.init is not None:
                model = start_from(self.init, self.data.num_classes, self.seed)[0]
            else:
                model_cfg = self.student.model
                model = build_model(model_cfg.arch, self.data.input_shape, self.data.num_classes, **model_cfg.kwargs)
            self.rng_after_init = torch.get_rng_state()
        return model.to(self.data.device)

    def held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The labelled images that steer a method's choices (``kd_tuned``'s grid point,
        ``meta_distill``'s teacher and guard): the quiz and validation splits, never trained on."""
        return held_out(self.data)

    def transfer(self) -> Transfer | None:
        """The unlabeled examples drawn beside each labelled batch (teacher-based methods)."""
        x, per_step = self.data.transfer(), self.kd.transfer_batch(self.student.train.batch_size)
        return Transfer(x, per_step) if x is not None and per_step > 0 else None

    def fit(self, model: nn.Module, loss_fn, transfer: Transfer | None = None,
            hooks: Sequence[StepHook] = ()) -> TrainResult:
        return train_classifier(
            model, self.data.x("train"), self.data.y("train"), self.student.train, loss_fn,
            seed=self.seed, hooks=hooks, augment=self.augment,
            val=(self.data.x("val"), self.data.y("val")), on_log=self.on_log, desc=self.desc,
            checkpoint=self.checkpoint, transfer=transfer, device=self.data.device)

    def teach(self, model: nn.Module, loss_fn, hooks: Sequence[StepHook] = ()) -> TrainResult:
        """Training of every teacher-based method: labelled and transfer examples under
        ``loss_fn`` (and the method's step ``hooks``), then the same label fine-tune
        (``student.finetune_steps``)."""
        result = self.fit(model, loss_fn, self.transfer(), hooks)
        if self.student.finetune_steps:
            self.finetune(model, result)
        return result

    def finetune(self, model: nn.Module, result: TrainResult) -> None:
        """Cross-entropy steps on the labels at a constant rate; curves and seconds are
        added to ``result``, with steps counted on from the main training's."""
        train = self.student.train
        optimizer = train.optimizer.model_copy(update={"lr": self.student.finetune_lr, "schedule": "constant"})
        cfg = train.model_copy(update={"steps": self.student.finetune_steps, "optimizer": optimizer})
        on_log = (lambda step, m: self.on_log(train.steps + step, m)) if self.on_log else None
        tuned = train_classifier(model, self.data.x("train"), self.data.y("train"), cfg, supervised_loss,
                                 seed=self.seed + 1, augment=self.augment,
                                 val=(self.data.x("val"), self.data.y("val")), on_log=on_log,
                                 desc=f"{self.desc} finetune", checkpoint=self.checkpoint, phase="finetune",
                                 device=self.data.device)
        result.curve.update({f"finetune_{k}": [(train.steps + s, v) for s, v in c] for k, c in tuned.curve.items()})
        result.seconds += tuned.seconds


StudentMethod = Callable[[StudentContext], tuple[nn.Module, TrainResult]]


def train_scratch(ctx: StudentContext) -> tuple[nn.Module, TrainResult]:
    student = ctx.new_student()
    return student, ctx.fit(student, supervised_loss)
