"""The whole tree (``PipelineConfig``), its cross-field checks, and the data set shapes
they check models against before any data is read.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, model_validator

from models.external import split_name
from models.registry import build_model, count_parameters
from pipelines.config.arch import ArchSearchConfig
from pipelines.config.data import DataConfig
from pipelines.config.errors import Strict
from pipelines.config.fewshot import FewShotConfig
from pipelines.config.runtime import DistConfig, TrackingConfig
from pipelines.config.students import (
    DISTKDConfig,
    DKDConfig,
    KDConfig,
    MamlConfig,
    MetaDistillConfig,
    MetaDistillPilotConfig,
    StudentConfig,
)
from pipelines.config.teacher import TeacherConfig, teacher_input_shape
from pipelines.config.training import ModelConfig


class PipelineConfig(Strict):
    preset: str = Field("digits", description="the named preset the tree starts from: --preset NAME, or preset: in a "
                                               "--config file")
    data: DataConfig = Field(default_factory=DataConfig, description="the data set, its splits, storage and "
                                                                      "augmentation")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="the teacher: trained here or brought, "
                                                                             "fine-tuned, improved on the transfer "
                                                                             "data")
    student: StudentConfig = Field(default_factory=StudentConfig, description="the student network, its training "
                                                                             "budget, and the methods and seeds "
                                                                             "compared")
    arch_search: ArchSearchConfig = Field(default_factory=ArchSearchConfig, description=(
        "the architecture stage: the student's network searched for this teacher under student.budget"))
    kd: KDConfig = Field(default_factory=KDConfig, description="Hinton KD (kd, kd_tuned and its grid) and the "
                                                              "transfer images every teacher-based method draws")
    dkd: DKDConfig = Field(default_factory=DKDConfig, description="decoupled KD (dkd, dkd_tuned and its grid)")
    dist_kd: DISTKDConfig = Field(default_factory=DISTKDConfig, description="DIST, KD by the teacher's class "
                                                                           "relations (dist_kd, dist_kd_tuned and its "
                                                                           "grid)")
    maml: MamlConfig = Field(default_factory=MamlConfig, description="the meta-learned initialisation of maml_init "
                                                                    "(MAML family, tasks from the training split)")
    meta_distill: MetaDistillConfig = Field(default_factory=MetaDistillConfig, description=(
        "learning to teach (method meta_distill): KD from a teacher whose head keeps learning while it teaches, "
        "guarded by held-out checks"))
    meta_distill_pilot: MetaDistillPilotConfig = Field(default_factory=MetaDistillPilotConfig, description=(
        "MetaDistil's pilot update (method meta_distill_pilot), kept as a baseline"))
    fewshot: FewShotConfig = Field(default_factory=FewShotConfig, description="metadistill fewshot: Omniglot "
                                                                             "meta-training and N-way K-shot tests")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="the MLflow experiment, "
                                                                                "registration and the promotion gate")
    dist: DistConfig = Field(default_factory=DistConfig, description="where training runs and how its processes "
                                                                    "start: device, torchrun, nodes, threads")

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        if self.tracking.experiment is None:
            self.tracking.experiment = default_experiment(self.data)
        shape, classes = dataset_shape(self.data)
        for role in ("teacher", "student"):
            batch = getattr(self, role).train.batch_size
            if batch > MIN_TRAIN_SIZE.get(self.data.name, batch) and self.data.label_budget is None:
                raise ValueError(f"{role}.train.batch_size={batch} exceeds the train split of {self.data.name}")
        if self.data.label_budget is not None and self.data.label_budget < self.student.train.batch_size:
            raise ValueError(f"data.label_budget={self.data.label_budget} is smaller than "
                             f"student.train.batch_size={self.student.train.batch_size}")
        if self.dist.nproc is not None:
            _check_splits(self, self.dist.nproc * self.dist.nnodes)
        if self.data.augment_policy == "learned" and self.data.augment_search.proxy == "teacher" \
                and self.teacher.brought():
            raise ValueError(f"data.augment_search.proxy=teacher trains teacher.model from scratch on the data, but "
                             f"teacher.source={self.teacher.source} brings a pretrained one: use proxy=student")
        if (self.student.concurrency or 1) > 1:
            if self.dist.launcher not in ("auto", "inprocess") or self.dist.nnodes * (self.dist.nproc or 1) > 1:
                raise ValueError(f"student.concurrency={self.student.concurrency} trains students side by side in "
                                 f"the flow's process; a torchrun stage already uses all its processes: leave "
                                 f"student.concurrency unset with dist.launcher={self.dist.launcher}, "
                                 f"dist.nproc={self.dist.nproc}, dist.nnodes={self.dist.nnodes}")
            if float(self.student.model.kwargs.get("dropout", 0) or 0) > 0:
                raise ValueError("student.concurrency > 1 needs students without dropout: dropout draws from the "
                                 "process's one global generator, so concurrent students would not repeat")
        if self.meta_distill.temperature.learn and self.student.train.optimizer.name != "sgd":
            raise ValueError(f"meta_distill.temperature.learn follows SGD steps; student.train.optimizer.name is "
                             f"{self.student.train.optimizer.name!r}: set it to sgd or turn temperature.learn off")
        if self.maml.meta_steps is None:  # the student's budget bounds maml_init's meta-training
            self.maml.meta_steps = min(300, max(1, self.student.train.steps // 5))
        if self.student.budget.limits() and not self.tracking.cost_card and self.tracking.register_best:
            raise ValueError(f"student.budget ({', '.join(self.student.budget.limits())}) is checked at promotion on "
                             f"the student's cost card: leave tracking.cost_card on")
        check_models(self, shape, classes)
        if self.arch_search.enabled:
            check_space(self, shape, classes or 2)
        return self


def check_space(cfg: PipelineConfig, shape: tuple[int, int, int], classes: int) -> None:
    """Every point of ``arch_search.space`` builds for the data, and a hard limit on
    parameters or MACs leaves at least one point: refused before any work, naming the key
    (a latency limit is checked by the pre-flight check, which measures)."""
    from models.cost import count_macs
    from models.space import points, to_model

    if cfg.student.init != "scratch":
        raise ValueError(f"arch_search.enabled searches the student's network, but student.init={cfg.student.init} "
                         f"brings the weights of one network: set student.init=scratch or arch_search.enabled=false")
    budget, fits = cfg.student.budget, []
    for family, knobs in points(cfg.arch_search.space):
        arch, kwargs = to_model(family, knobs)
        try:
            model = build_model(arch, shape, classes, **kwargs)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"arch_search.space.{family}: {arch} {kwargs} cannot be built for inputs "
                             f"{'x'.join(map(str, shape))}: {exc}") from exc
        if budget.mode == "hard" and (budget.params is not None or budget.macs is not None):
            params = count_parameters(model)
            macs = count_macs(model, shape) if budget.macs is not None else 0
            fits.append((budget.params is None or params <= budget.params)
                        and (budget.macs is None or macs <= budget.macs))
    if fits and not any(fits):
        limits = ", ".join(f"student.budget.{k}={v:,}" for k, v in (("params", budget.params), ("macs", budget.macs))
                           if v is not None)
        raise ValueError(f"no point of arch_search.space meets {limits}: raise the budget or add smaller points "
                         f"to arch_search.space")


def check_models(cfg: PipelineConfig, shape: tuple[int, int, int], classes: int | None) -> None:
    """The networks can be built for the data, and the student is the smaller; ``classes``
    None (an image folder before its folders are listed): buildable only, the rest waits
    for the pre-flight check, which passes the count it read."""
    where = "the image folder" if cfg.data.name == "imagefolder" else cfg.data.name
    if classes is not None and cfg.maml.ways is not None and cfg.maml.ways > classes:
        raise ValueError(f"maml.ways={cfg.maml.ways} exceeds the {classes} classes of {where}")
    student = _param_count(cfg.student.model, shape, classes or 2, "student")
    maml = [m for m in cfg.student.methods if "maml_init" in m]
    if maml and split_name(cfg.student.model.arch) is not None:
        raise ValueError(f"student.methods {maml} meta-train under torch.func, which needs networks without "
                         f"BatchNorm running statistics; {cfg.student.model.arch} has them: use one of "
                         f"this project's architectures for maml_init")
    if cfg.teacher.source in ("registry", "file"):
        return  # its architecture is in its spec: checked when the source is resolved
    teacher = _param_count(cfg.teacher.model, teacher_input_shape(cfg.teacher, shape), classes or 2, "teacher")
    if classes is not None and cfg.student.must_be_smaller and student > teacher:
        raise ValueError(f"student.model has {student:,} parameters, more than teacher.model's "
                         f"{teacher:,} (for the {classes} classes of {where}); shrink it or set "
                         f"student.must_be_smaller=false")


def _check_splits(cfg: PipelineConfig, world: int) -> None:
    """Data parallelism cuts every global batch into equal shards, one per process."""
    sizes = {"teacher.train.batch_size": cfg.teacher.train.batch_size,
             "student.train.batch_size": cfg.student.train.batch_size,
             "the transfer batch (kd.transfer_ratio * student.train.batch_size)":
                 cfg.kd.transfer_batch(cfg.student.train.batch_size),
             "maml.meta_batch": cfg.maml.meta_batch, "meta_distill.quiz_batch_size": cfg.meta_distill.quiz_batch_size}
    if "meta_distill_pilot" in cfg.student.methods:
        sizes["meta_distill_pilot.quiz_batch_size"] = cfg.meta_distill_pilot.quiz_batch_size
    for key, n in sizes.items():
        if n % world:
            raise ValueError(f"{key}={n} does not split evenly over {world} processes "
                             f"(dist.nnodes * dist.nproc): use a multiple of {world}")


def default_experiment(data: DataConfig) -> str:
    """``tracking.experiment`` when unset: named after the data, so that a run on other data
    registers its own student instead of meeting a champion that takes other inputs."""
    if data.name != "imagefolder" or data.root is None:
        return f"metadistill-{data.name}"
    folder = re.sub(r"[^A-Za-z0-9_.\-]+", "-", Path(str(data.root)).expanduser().resolve().name).strip("-.")
    return f"metadistill-imagefolder-{folder}" if folder else "metadistill-imagefolder"


def dataset_shape(data: DataConfig, classes: int | None = None) -> tuple[tuple[int, int, int], int | None]:
    """(C, H, W) and class count of the prepared data, known before any data is read; an
    image folder's count is None until its folders are listed (``classes``: that count)."""
    (channels, height, width), known = DATASET_SHAPES[data.name]
    size = data.image_size
    return ((channels, size, size) if size else (channels, height, width)), classes or known


# (C, H, W) and class count per data set, used to check models before any data is read; an
# image folder's classes are its folders, counted by the pre-flight check.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int | None]] = {
    "digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "omniglot": ((1, 28, 28), 964),
    "imagefolder": ((3, 32, 32), None),
}


MIN_TRAIN_SIZE = {"digits": 800, "mnist": 40000, "fashion-mnist": 40000, "cifar10": 5000,
                  "cifar100": 30000, "omniglot": 10000}  # an image folder's size is known once read


def _param_count(cfg: ModelConfig, shape, classes, role: str) -> int:
    try:
        model = build_model(cfg.arch, shape, classes, **cfg.kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{role}.model ({cfg.arch} with {cfg.kwargs}) cannot be built for inputs "
                         f"{'x'.join(map(str, shape))}: {exc}") from exc
    if split_name(cfg.arch) is not None:  # other libraries' networks may need a minimum size
        import torch

        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, *shape))
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{role}.model {cfg.arch} cannot take {'x'.join(map(str, shape))} inputs (set "
                             f"data.image_size): {str(exc).splitlines()[0][:200]}") from exc
    return count_parameters(model)
