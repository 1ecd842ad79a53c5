"""``student.*`` and the settings of the student methods: ``kd.*``, ``maml.*`` and
``meta_distill.*``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.config.errors import Strict
from pipelines.config.sources import FromSource, InitSource, check_source
from pipelines.config.training import ModelConfig, TrainConfig


class KDConfig(Strict):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft (teacher) term")
    soft_loss: Literal["kl", "mse"] = "kl"
    transfer_ratio: float = Field(1.0, ge=0, description="transfer (unlabeled) examples per labelled example in "
                                                         "each step of the teacher-based methods; 0: labels only")
    grid_alpha: list[float] = Field(default_factory=lambda: [0.5, 0.9, 1.0],
                                    description="kd_tuned: alphas searched on the validation split")
    grid_temperature: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0],
                                          description="kd_tuned: temperatures searched")
    grid_transfer_ratio: list[float] | None = Field(None, description="kd_tuned: transfer ratios searched "
                                                                      "(default: kd.transfer_ratio only)")
    grid_seed: int = Field(0, description="kd_tuned: the student seed of the search")

    @field_validator("grid_alpha", "grid_temperature", "grid_transfer_ratio")
    @classmethod
    def _grid(cls, values: list[float] | None, info) -> list[float] | None:
        if values is None:
            return values
        if not values:
            raise ValueError(f"kd.{info.field_name} must list at least one value")
        low, high = {"grid_alpha": (0.0, 1.0), "grid_temperature": (1e-9, float("inf")),
                     "grid_transfer_ratio": (0.0, float("inf"))}[info.field_name]
        bad = [v for v in values if not low <= v <= high]
        if bad:
            raise ValueError(f"kd.{info.field_name} has out-of-range values {bad}")
        return values

    def transfer_batch(self, batch_size: int) -> int:
        """Transfer examples drawn beside each labelled batch of ``batch_size``."""
        return int(round(self.transfer_ratio * batch_size))


Learnable = Literal["head", "teacher", "calibration", "kd_params", "weights"]


class MetaDistillConfig(Strict):
    """Learning to teach: what the teacher learns is meta-updated on the pilot student's quiz loss."""

    learn: list[Learnable] = Field(
        default_factory=lambda: ["head"],
        description="head: the teacher's head keeps learning while it teaches, from the labels, the student's "
                    "feedback and a trust region (alone); teacher: all its weights (MetaDistil); calibration: a "
                    "per-class temperature and bias on its logits; kd_params: the KD temperature and alpha; "
                    "weights: a per-example soft/hard weight from a tiny net. Knobs sit on a frozen teacher "
                    "unless 'teacher' is listed too")
    temperature: float | None = Field(2.0, gt=0, description="the KD temperature meta_distill teaches at (the "
                                                              "start of a learned one); None: kd.temperature")
    alpha: float | None = Field(1.0, ge=0, le=1, description="weight of the soft term; None: kd.alpha")
    feedback: float = Field(0.0, ge=0, description="head: weight of the student's feedback, h * CE(teacher, its "
                                                   "pseudo-labels), h the student's held-out gain from its last "
                                                   "step (normalised by its running RMS). Off by default: in 10 "
                                                   "paired seeds on three presets it changed nothing (+0.06, +0.10, "
                                                   "+0.00 points; docs/distill_ablation.md) and costs two held-out "
                                                   "forwards per update")
    feedback_clip: float = Field(2.0, gt=0, description="head: the normalised h is clipped to +-this")
    head_lr: float = Field(1e-3, ge=0, description="head: Adam step size of the teacher's head")
    trust_kl: float = Field(1.0, ge=0, description="head: weight of KL(starting teacher || teacher), the pull back")
    max_drift: float = Field(0.1, gt=0, description="head: the head stops learning once that KL passes this")
    guard_every: int = Field(200, ge=0, description="head: student steps between checks of the held-out "
                                                    "accuracy against the last accepted snapshot (0: no guard)")
    guard_z: float = Field(2.0, gt=0, description="head: falling behind the snapshot by more than this many "
                                                  "standard errors reverts to it")
    guard_damping: float = Field(0.5, gt=0, le=1, description="head: a revert multiplies head_lr by this")
    learn_temperature: bool = Field(False, description="head: the KD temperature learns too, by forward-mode "
                                                       "tangents through the student's whole trajectory (RTHO, "
                                                       "discounted as MARTHE); SGD students; about 3x a kd step")
    temperature_lr: float = Field(0.05, gt=0, description="learn_temperature: the step of log T once a window "
                                                           "of hypergradients clears its noise")
    temperature_box: tuple[float, float] = Field((1.0, 8.0), description="learn_temperature: bounds on T")
    horizon_discount: float = Field(0.99, ge=0, le=1, description="learn_temperature: the tangent's discount per "
                                                                  "step (1: RTHO's full horizon; 0: one step)")
    temperature_share: float = Field(1.0, gt=0, le=1, description="learn_temperature: T learns over this share "
                                                                  "of the student's steps, then stays where it ends; "
                                                                  "the tangent costs ~4x a kd step while it runs")
    horizon_window: int = Field(5, ge=2, description="learn_temperature: hypergradient readings (one per update) "
                                                     "per decision")
    knob_lr: float = Field(0.03, ge=0, description="Adam/SGD step size of the teaching knobs")
    order: Literal["second", "first"] = Field("second", description="second: MetaDistil; first: MPL-style")
    pilot_steps: int = Field(1, ge=1, description="K pilot SGD steps of the student copy")
    pilot_lr: float | None = Field(None, gt=0, description="pilot step size; default: student.train.optimizer.lr")
    teacher_lr: float = Field(1e-4, ge=0)
    teacher_optimizer: Literal["adam", "sgd"] = "adam"
    interval: int = Field(10, ge=1, description="a teacher update every n student steps")
    start_step: int = Field(0, ge=0, description="no teacher update before this student step")
    stop_step: int | None = Field(None, ge=1, description="no teacher update after this student step "
                                                          "(MetaDistil freezes its teacher for the rest)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the teacher's and knobs' learning rates over the update window")
    quiz_batch_size: int = Field(256, gt=0, description="held-out images per evaluation, rotating through the "
                                                          "quiz and validation splits (head) or drawn from quiz")
    teacher_ce_weight: float = Field(0.0, ge=0, description="adds the teacher's own CE on the batch, against forgetting")

    @model_validator(mode="after")
    def _what_is_learned(self) -> MetaDistillConfig:
        if not self.learn or len(set(self.learn)) != len(self.learn):
            raise ValueError(f"meta_distill.learn must list distinct items, got {self.learn}")
        if "head" in self.learn and self.learn != ["head"]:
            raise ValueError(f"meta_distill.learn=[head] trains the teacher's head alone; got {self.learn}")
        if self.learn_temperature and self.learn != ["head"]:
            raise ValueError("meta_distill.learn_temperature goes with meta_distill.learn=[head]")
        low, high = self.temperature_box
        if not 0 < low <= high:
            raise ValueError(f"meta_distill.temperature_box={list(self.temperature_box)} must be 0 < low <= high")
        if self.order == "first" and self.learn != ["teacher"]:
            raise ValueError("meta_distill.order=first (MPL's estimator) only learns the teacher's weights: "
                             "set meta_distill.learn=[teacher]")
        if self.stop_step is not None and self.stop_step <= self.start_step:
            raise ValueError(f"meta_distill.stop_step={self.stop_step} must exceed "
                             f"meta_distill.start_step={self.start_step}")
        return self


class MamlConfig(Strict):
    """Meta-learning of an initialisation over episodic tasks (MAML family)."""

    algorithm: Literal["maml", "fomaml", "metasgd", "reptile"] = "maml"
    ways: int | None = Field(None, gt=1, description="classes per task; default: every class of the data set")
    shots: int = Field(5, gt=0)
    queries: int = Field(5, gt=0, description="query examples per class")
    inner_steps: int = Field(3, ge=0)
    inner_lr: float = Field(0.3, gt=0)
    outer_lr: float = Field(1e-3, gt=0, description="Adam; for reptile: the outer step size epsilon (SGD)")
    meta_batch: int = Field(8, gt=0, description="tasks per meta-step")
    meta_steps: int = Field(300, ge=0)
    time_budget_s: float | None = Field(None, gt=0, description="stop meta-training after this many seconds")
    vectorize: bool = Field(True, description="batch tasks with torch.func.vmap (else a per-task loop)")
    vmap_query: bool = Field(True, description="with vectorize, vmap the query pass too (else a loop over "
                                                "tasks' query sets: faster for large query sets on CPU)")
    chunk_size: int | None = Field(None, gt=0, description="vmap chunk size, bounds memory")
    workers: int | None = Field(None, gt=0, description="task-parallel threads; default: one per CPU core")
    rotations: bool = Field(False, description="add 90/180/270-degree rotations as extra classes")
    eval_inner_steps: int | None = Field(None, ge=0, description="inner steps at evaluation (default: inner_steps)")
    log_every: int = Field(10, gt=0)


# Student methods (pipelines/students.py implements one function per name; a test keeps
# the two lists equal).  Teacher-based methods see the transfer split; the others do not.
TEACHER_METHODS = ("kd", "kd_tuned", "meta_distill", "meta_distill+maml_init")


METHOD_NAMES = ("scratch", "maml_init", *TEACHER_METHODS)


class StudentConfig(FromSource):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(arch="mlp", kwargs={"hidden": [16]}))
    train: TrainConfig = Field(default_factory=TrainConfig)
    methods: list[str] = Field(default_factory=lambda: ["scratch", "kd", "maml_init", "meta_distill"])
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    finetune_steps: int = Field(0, ge=0, description="teacher-based methods end with this many cross-entropy "
                                                     "steps on the labels (as Meta Pseudo Labels does)")
    finetune_lr: float = Field(0.005, gt=0, description="constant step size of the label fine-tune")
    must_be_smaller: bool = Field(True, description="refuse a student with more parameters than the teacher")
    concurrency: int | None = Field(None, ge=1, description="students of the sweep (methods x seeds) trained at "
                                                            "once; default: one per GPU on CUDA, else 1")
    init: InitSource = Field("scratch", description="where the student's starting weights come from (a new head "
                                                    "where the classes differ); maml_init meta-trains from them")
    init_uri: str | None = Field(None, description="file: safetensors + spec.json; registry: models:/...; "
                                                   "torchvision/timm: a weights file or named weights")

    @model_validator(mode="after")
    def _init(self) -> StudentConfig:
        check_source("student.init", self.init, self.init_uri, "student.init_uri", self.model.arch)
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, methods: list[str]) -> list[str]:
        unknown = [m for m in methods if m not in METHOD_NAMES]
        if unknown or not methods:
            raise ValueError(f"unknown student method(s) {unknown}; allowed: {', '.join(METHOD_NAMES)}")
        if len(set(methods)) != len(methods):
            raise ValueError(f"student.methods lists a method twice: {methods}")
        return methods

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError("student.seeds must be a non-empty list of distinct integers")
        return seeds
