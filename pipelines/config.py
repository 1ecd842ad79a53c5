"""The typed configuration tree, its presets, and the override rules.

Everything is validated before any work starts: unknown keys, wrong types and impossible
combinations raise :class:`ConfigError`, whose message names the key and what is allowed.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from meta.augment import OPS as AUGMENT_OPS
from models.external import split_name, unknown_external_message
from models.registry import MODEL_NAMES, build_model, count_parameters, is_known_model

DatasetName = Literal["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "omniglot",
                      "imagefolder"]
AUGMENTATIONS = ("random_crop", "horizontal_flip", "random_affine", "color_jitter")


class ConfigError(ValueError):
    """A configuration problem found before any work started."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class AugmentConfig(Strict):
    """One ``torchvision.transforms.v2`` transform, by name, applied to training batches."""

    name: Literal["random_crop", "horizontal_flip", "random_affine", "color_jitter"]
    padding: int = Field(2, ge=0, description="random_crop: zero padding on each side")
    degrees: float = Field(10.0, ge=0, description="random_affine: max rotation")
    translate: float = Field(0.1, ge=0, le=0.5, description="random_affine: max shift fraction")
    strength: float = Field(0.2, ge=0, le=1, description="color_jitter: brightness/contrast")


class AugmentSearchConfig(Strict):
    """``data.augment_policy=learned``: the online hypergradient search of ``meta.augment``.
    A proxy network (``proxy``: ``student.model``'s architecture or ``teacher.model``'s)
    trains on the policy's augmented batches; every ``interval`` steps the policy takes one
    Adam step on the quiz cross-entropy after ``unroll_steps`` unrolled SGD steps of the proxy.  The
    defaults (two ops per image, uniform strengths, starting at 0.8 of each range, policy
    step 0.01) are the best of a screen on MNIST-1000 (docs/benchmarks/augment_screen.md)."""

    steps: int = Field(400, gt=0, description="training steps of the proxy network")
    batch_size: int = Field(64, gt=0)
    interval: int = Field(2, ge=1, description="a policy update every this many proxy steps")
    policy_lr: float = Field(0.01, gt=0, description="Adam step size of the op logits and magnitudes")
    model_lr: float = Field(0.05, gt=0, description="SGD step size of the proxy, and of the unrolled steps")
    unroll_steps: int = Field(1, ge=1, le=50, description="unrolled SGD steps of the hypergradient, each on a "
                                                          "batch of its own: a longer look-ahead, at that many "
                                                          "times the cost")
    tau: float = Field(1.0, gt=0, description="Gumbel-softmax temperature of the relaxed op choice")
    init_magnitude: float = Field(0.8, gt=0, lt=1, description="starting magnitudes, as a share of each op's range")
    ops: list[str] = Field(default_factory=lambda: list(AUGMENT_OPS),
                           description="the ops searched over: " + ", ".join(AUGMENT_OPS))
    depth: int = Field(2, ge=1, le=3, description="ops applied to each image in turn")
    sampling: Literal["exact", "uniform"] = Field(
        "uniform", description="an op's magnitude: exactly the learned one (random sign), or drawn uniformly "
                             "in [0, learned] (random sign), as TrivialAugment draws its magnitudes")
    proxy: Literal["student", "teacher"] = Field("student", description="the architecture of the proxy network")
    seed: int = 0

    @field_validator("ops")
    @classmethod
    def _ops(cls, ops: list[str]) -> list[str]:
        unknown = [op for op in ops if op not in AUGMENT_OPS]
        if unknown or not ops or len(set(ops)) != len(ops):
            raise ValueError(f"data.augment_search.ops must be distinct ops out of {', '.join(AUGMENT_OPS)}; "
                             f"got {ops}")
        return ops


class DataConfig(Strict):
    name: DatasetName = "digits"
    root: Path | None = Field(None, description="data folder; default $METADISTILL_DATA")
    download: bool = Field(False, description="let torchvision download CIFAR (needs internet)")
    quiz_fraction: float = Field(0.1, gt=0, lt=1, description="held-out part of train for meta-objectives")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1,
                                 description="test share carved out where the set has no test split")
    train_fraction: float = Field(1.0, gt=0, le=1, description="keep this share of the train split")
    label_budget: int | None = Field(None, gt=0, description="keep at most this many train labels")
    split_seed: int = 0
    transfer: bool = Field(True, description="keep the training pool's examples left out by label_budget / "
                                              "train_fraction as an unlabeled transfer split (labels dropped)")
    transfer_root: Path | None = Field(None, description="a folder of unlabeled images (any depth, no class "
                                                          "folders) added to the transfer split")
    transfer_limit: int | None = Field(None, gt=0, description="keep at most this many transfer examples")
    augment: list[AugmentConfig] = Field(default_factory=list)
    augment_policy: Literal["fixed", "none", "trivialaugment", "randaugment", "learned"] = Field(
        "fixed", description="fixed: the data.augment list; none; trivialaugment (TrivialAugmentWide) or "
                             "randaugment: torchvision's search-free policies, on 8-bit pixels; learned: "
                             "searched by the prepare-augmentation stage (data.augment_search), or read "
                             "from data.augment_policy_file")
    augment_search: AugmentSearchConfig = Field(default_factory=AugmentSearchConfig)
    augment_policy_file: Path | None = Field(None, description="a learned policy's JSON (as the search writes "
                                                                "it) to use instead of searching")
    on_bad_image: Literal["fail", "skip"] = Field("fail", description="an unreadable image: fail naming it, "
                                                                    "or skip it (the count is logged)")
    image_size: int | None = Field(None, ge=4, le=1024, description=(
        "side of the square images every source is brought to: the shorter side is resized to it "
        "(bilinear, antialiased when shrinking), then the centre is cropped; default: the set's own "
        "(digits 8, MNIST/Fashion-MNIST/Omniglot 28, CIFAR 32, image folders 32)"))
    storage: Literal["auto", "memory", "stream"] = Field("auto", description=(
        "memory: every split decoded into one float32 tensor in RAM (fast for small sets); stream: "
        "the splits written once as WebDataset-style tar shards, read through DataLoader workers "
        "that decode each batch (bounded memory); auto: stream for image folders and the CIFAR "
        "JPEG zips whose float32 tensors would take over data.memory_limit_gb, else memory"))
    memory_limit_gb: float = Field(4.0, gt=0, description="storage=auto: the largest prepared size kept in RAM")
    workers: int | None = Field(None, ge=0, description="storage=stream: DataLoader worker processes per "
                                                        "training process (0: decode in the training "
                                                        "process); default: min(4, CPU cores - 1)")
    shard_mb: int = Field(256, ge=1, description="storage=stream: target size of one tar shard")

    @model_validator(mode="after")
    def _policy_file(self) -> DataConfig:
        if self.augment_policy_file is None:
            return self
        if self.augment_policy != "learned":
            raise ValueError(f"data.augment_policy_file is set but data.augment_policy is "
                             f"{self.augment_policy!r}; set data.augment_policy=learned")
        read_policy_file(Path(self.augment_policy_file).expanduser())
        return self

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.quiz_fraction + self.val_fraction >= 0.9:
            raise ValueError(f"data.quiz_fraction + data.val_fraction = "
                             f"{self.quiz_fraction + self.val_fraction:.2f} leaves under 10% "
                             f"of train for training; keep their sum below 0.9")
        return self


def read_policy_file(path: Path) -> dict:
    """A learned policy's JSON, checked field by field (``meta.augment.AugmentPolicy``)."""
    from meta.augment import AugmentPolicy, PolicyError

    try:
        spec = json.loads(path.read_text())
        AugmentPolicy.from_json(spec)
    except FileNotFoundError:
        raise ValueError(f"data.augment_policy_file: {path} does not exist") from None
    except (json.JSONDecodeError, PolicyError) as exc:
        raise ValueError(f"data.augment_policy_file {path}: {exc}") from None
    return spec


class ModelConfig(Strict):
    arch: str = "mlp"
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   description="architecture arguments, e.g. {hidden: [64]}")

    @field_validator("arch")
    @classmethod
    def _known(cls, arch: str) -> str:
        if not is_known_model(arch):
            if split_name(arch) is not None:
                raise ValueError(unknown_external_message(arch))
            raise ValueError(f"unknown model {arch!r}; allowed: {', '.join(MODEL_NAMES)}")
        return arch


class OptimConfig(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "cosine"] = "cosine"


class TrainConfig(Strict):
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(64, gt=0)
    optimizer: OptimConfig = Field(default_factory=OptimConfig)
    log_every: int = Field(50, gt=0, description="steps between logged training metrics")
    augment: bool = Field(True, description="apply data.augment to this role's training batches")
    grad_clip: float | None = Field(5.0, gt=0, description="clip the gradient's global norm to this (None: off); "
                                                           "keeps KD's T^2-scaled gradient from blowing up")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="matmul/conv precision on CUDA: fp32, tf32 (TensorFloat-32 matmuls and convolutions) "
                            "or bf16 (autocast; parameters and optimizer state stay float32). The CPU trains in fp32")
    compile: bool = Field(False, description="torch.compile the network's forward (CUDA; pays on long runs of "
                                             "big batches, costs its compile time on short ones)")
    channels_last: bool = Field(False, description="NHWC memory layout for convolutional networks on CUDA")


TeacherSource = Literal["train", "registry", "file", "torchvision", "timm"]
InitSource = Literal["scratch", "file", "registry", "torchvision", "timm"]
# models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest
REGISTRY_URI = re.compile(r"^models:/([A-Za-z0-9_.\-]+)(?:@([A-Za-z0-9_\-]+)|/([0-9]+|latest))$")


def _library_prefix(data: Any, source_key: str, model_key: str = "model") -> Any:
    """``source=torchvision`` with ``model.arch=resnet18`` means ``torchvision:resnet18``."""
    if isinstance(data, dict) and data.get(source_key) in ("torchvision", "timm"):
        model = data.get(model_key)
        if isinstance(model, dict) and isinstance(model.get("arch"), str) and ":" not in model["arch"]:
            data = {**data, model_key: {**model, "arch": f"{data[source_key]}:{model['arch']}"}}
    return data


def _check_source(prefix: str, source: str, location: str | None, location_key: str, arch: str) -> None:
    """Cross-field checks of a weights source (teacher, student init, few-shot init)."""
    if source in ("train", "scratch"):
        if location is not None:
            raise ValueError(f"{location_key} is set but {prefix} source is {source!r}; "
                             f"choose registry, file, torchvision or timm")
        return
    if location is None:
        what = {"registry": "models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest",
                "file": "a safetensors file or folder with its spec.json",
                "torchvision": "a local .safetensors/.pth weights file, or the library's named weights (DEFAULT)",
                "timm": "a local .safetensors/.pth weights file, or 'pretrained' (needs internet)"}[source]
        raise ValueError(f"{prefix} source {source!r} needs {location_key}: {what}")
    if source == "registry" and not REGISTRY_URI.match(location):
        raise ValueError(f"{location_key}={location!r} is not a registry URI; use models:/NAME@ALIAS, "
                         f"models:/NAME/VERSION or models:/NAME/latest")
    if source in ("torchvision", "timm") and not arch.startswith(f"{source}:"):
        raise ValueError(f"{prefix} source {source!r} builds a {source} architecture, but the model is {arch!r}")


class FinetuneConfig(TrainConfig):
    """Adapting a teacher brought from elsewhere to this data set."""

    mode: Literal["none", "head", "all"] = Field(
        "none", description="none: use it as it is (its classes must be the data's); head: a new head for the "
                            "data's classes, trained alone; all: a new head, then the whole network trains")
    steps: int = Field(500, gt=0)
    optimizer: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=0.01))


class TeacherConfig(Strict):
    source: TeacherSource = Field("train", description="train: trained here (teacher.model, teacher.train); "
                                                       "registry / file: a model you bring (teacher.uri); "
                                                       "torchvision / timm: teacher.model.arch from that "
                                                       "library with teacher.weights")
    uri: str | None = Field(None, description="registry: models:/NAME@ALIAS | models:/NAME/VERSION | "
                                              "models:/NAME/latest; file: safetensors file or folder + spec.json")
    weights: str | None = Field(None, description="torchvision/timm: local .safetensors or .pth (plain tensors), "
                                                  "or named weights (torchvision: DEFAULT, IMAGENET1K_V1...; "
                                                  "timm: pretrained) where the machine has internet")
    image_size: int | None = Field(None, ge=8, description="torchvision/timm: the resolution the teacher sees "
                                                           "(default: the data's); inputs are resized to it")
    mean: list[float] | None = Field(None, description="torchvision/timm: the teacher's input normalisation "
                                                       "(default: ImageNet's, or the data's without weights)")
    std: list[float] | None = Field(None, description="see mean")
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(arch="mlp", kwargs={"hidden": [256, 256]}))
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=3000))
    seed: int = Field(0, description="training / the new head's initialisation")

    @model_validator(mode="before")
    @classmethod
    def _prefix(cls, data: Any) -> Any:
        return _library_prefix(data, "source")

    @model_validator(mode="after")
    def _source(self) -> TeacherConfig:
        location = self.weights if self.source in ("torchvision", "timm") else self.uri
        key = "weights" if self.source in ("torchvision", "timm") else "uri"
        _check_source("teacher", self.source, location, f"teacher.{key}", self.model.arch)
        other = "uri" if key == "weights" else "weights"
        if getattr(self, other) is not None:
            raise ValueError(f"teacher.{other} does not apply to teacher.source={self.source!r} (use teacher.{key})")
        if self.source not in ("torchvision", "timm"):
            for name in ("image_size", "mean", "std"):
                if getattr(self, name) is not None:
                    raise ValueError(f"teacher.{name} applies to torchvision/timm teachers; a {self.source!r} "
                                     f"teacher's input follows its spec")
        if (self.mean is None) != (self.std is None):
            raise ValueError("set teacher.mean and teacher.std together")
        if self.source == "train" and self.finetune.mode != "none":
            raise ValueError("teacher.finetune applies to a teacher you bring (teacher.source registry, file, "
                             "torchvision or timm); a trained teacher trains with teacher.train")
        return self

    def brought(self) -> bool:
        return self.source != "train"


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


Learnable = Literal["teacher", "calibration", "kd_params", "weights"]


class MetaDistillConfig(Strict):
    """Learning to teach: what the teacher learns is meta-updated on the pilot student's quiz loss."""

    learn: list[Learnable] = Field(
        default_factory=lambda: ["kd_params", "weights"],
        description="teacher: all its weights (MetaDistil); calibration: a per-class temperature and bias on "
                    "its logits; kd_params: the KD temperature and alpha; weights: a per-example soft/hard "
                    "weight from a tiny net. Knobs sit on a frozen teacher unless 'teacher' is listed too")
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
    quiz_batch_size: int = Field(64, gt=0)
    teacher_ce_weight: float = Field(0.0, ge=0, description="adds the teacher's own CE on the batch, against forgetting")

    @model_validator(mode="after")
    def _what_is_learned(self) -> MetaDistillConfig:
        if not self.learn or len(set(self.learn)) != len(self.learn):
            raise ValueError(f"meta_distill.learn must list distinct items, got {self.learn}")
        if self.order == "first" and self.learn != ["teacher"]:
            raise ValueError("meta_distill.order=first (MPL's estimator) only learns the teacher's weights: "
                             "set meta_distill.learn=[teacher]")
        if self.stop_step is not None and self.stop_step <= self.start_step:
            raise ValueError(f"meta_distill.stop_step={self.stop_step} must exceed "
                             f"meta_distill.start_step={self.start_step}")
        return self


class MetaConfig(Strict):
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


class FewShotConfig(Strict):
    """``metadistill fewshot``: meta-train on Omniglot background characters, test on
    evaluation characters, one model per number of ways."""

    # MAML's Omniglot recipe (Finn et al. 2017): batch-statistics norm, one inner step in
    # training and three at test, lr 0.4, 32 tasks a step, one query per class in training.
    # 32 channels rather than 64: on 2 cores it runs 1.7x the steps in the same time, and
    # both widths reached the same accuracy after 2,000 steps (docs/fewshot.md).
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(
        arch="conv4", kwargs={"channels": 32, "norm": "batch"}))
    meta: MetaConfig = Field(default_factory=lambda: MetaConfig(
        ways=5, shots=1, queries=1, inner_steps=1, inner_lr=0.4, meta_batch=32, meta_steps=100000,
        time_budget_s=1500, rotations=True, eval_inner_steps=3))
    train_ways: list[int] = Field(default_factory=lambda: [5, 20])
    eval_shots: list[int] = Field(default_factory=lambda: [1, 5])
    eval_tasks: int = Field(600, gt=0)
    eval_queries: int = Field(15, gt=0, description="query examples per class at evaluation (20 - 5 shots max)")
    lake_runs: bool = Field(True, description="also score the 20 one-shot runs of Lake et al. (all_runs.zip)")
    seed: int = 0
    init: InitSource = Field("scratch", description="starting weights of the model MAML meta-trains "
                                                    "(pretrained first, then meta-trained); see student.init")
    init_uri: str | None = Field(None, description="see student.init_uri")

    @model_validator(mode="before")
    @classmethod
    def _prefix(cls, data: Any) -> Any:
        return _library_prefix(data, "init")

    @model_validator(mode="after")
    def _fits_twenty(self) -> FewShotConfig:
        _check_source("fewshot.init", self.init, self.init_uri, "fewshot.init_uri", self.model.arch)
        if max(self.eval_shots) + self.eval_queries > 20:
            raise ValueError(f"fewshot: max(eval_shots) + eval_queries = {max(self.eval_shots) + self.eval_queries} "
                             f"exceeds Omniglot's 20 drawings per character")
        return self


# Student methods (pipelines/students.py implements one function per name; a test keeps
# the two lists equal).  Teacher-based methods see the transfer split; the others do not.
TEACHER_METHODS = ("kd", "kd_tuned", "meta_distill", "meta_distill+maml_init")
METHOD_NAMES = ("scratch", "maml_init", *TEACHER_METHODS)


class StudentConfig(Strict):
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

    @model_validator(mode="before")
    @classmethod
    def _prefix(cls, data: Any) -> Any:
        return _library_prefix(data, "init")

    @model_validator(mode="after")
    def _init(self) -> StudentConfig:
        _check_source("student.init", self.init, self.init_uri, "student.init_uri", self.model.arch)
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


class TrackingConfig(Strict):
    experiment: str = Field("metadistill-digits", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    register_best: bool = Field(True, description="register the best student in the model registry")
    register_teacher: bool = Field(False, description="register this run's teacher as <experiment>-teacher "
                                                      "(models:/<experiment>-teacher/latest)")


class DistConfig(Strict):
    """Training stages as torchrun workers: data-parallel over ``nnodes * nproc`` processes."""

    launcher: Literal["auto", "inprocess", "torchrun", "srun"] = Field(
        "auto", description="auto: torchrun when nnodes * nproc > 1, else inside the flow's process; "
                            "srun: torchrun on every node of the Slurm allocation")
    nproc: int | None = Field(None, ge=1, description="processes per node; default: one per GPU when training on "
                                                      "CUDA, else 1")
    nnodes: int = Field(1, ge=1, description="nodes; each runs the same torchrun line (see docs/distributed.md)")
    rdzv_endpoint: str = Field("127.0.0.1:0", pattern=r"^[A-Za-z0-9_.\-\[\]:]+:\d+$",
                               description="c10d rendezvous HOST:PORT; port 0: a free local port (one node only)")
    max_restarts: int = Field(3, ge=0, description="torchrun restarts all workers after a failure, this often")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where training runs: auto is CUDA when present (each worker on cuda:LOCAL_RANK), "
                            "else the CPU; cuda on a machine without it exits 2 before any work")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl when training on CUDA, else gloo")
    threads: int | None = Field(None, ge=1, description="intra-op threads per process; default: cores / nproc")
    checkpoint_every: int = Field(100, ge=1, description="steps between checkpoints of a torchrun stage")

    @model_validator(mode="after")
    def _endpoint(self) -> DistConfig:
        if self.nnodes > 1 and self.rdzv_endpoint.endswith(":0"):
            raise ValueError(f"dist.nnodes={self.nnodes} needs dist.rdzv_endpoint=HOST:PORT that every node "
                             f"can reach; port 0 only works on one node")
        return self

    @model_validator(mode="after")
    def _backend(self) -> DistConfig:
        if self.backend == "nccl" and self.device == "cpu":
            raise ValueError("dist.backend=nccl needs CUDA tensors, but dist.device=cpu: use dist.backend=gloo "
                             "or auto, or dist.device=cuda")
        return self

    def uses_cuda(self) -> bool:
        import torch

        return self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())

    def procs_per_node(self) -> int:
        import torch

        return self.nproc or (max(1, torch.cuda.device_count()) if self.uses_cuda() else 1)

    def threads_per_process(self, local_processes: int) -> int:
        """Intra-op threads of each of ``local_processes`` processes on this node."""
        return self.threads or max(1, (os.cpu_count() or 1) // local_processes)

    def uses_torchrun(self) -> bool:
        if self.launcher != "auto":
            return self.launcher != "inprocess"
        return self.nnodes * self.procs_per_node() > 1


class PipelineConfig(Strict):
    preset: str = "digits"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    maml: MetaConfig = Field(default_factory=MetaConfig)
    meta_distill: MetaDistillConfig = Field(default_factory=MetaDistillConfig)
    fewshot: FewShotConfig = Field(default_factory=FewShotConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    dist: DistConfig = Field(default_factory=DistConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
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
        if self.maml.ways is not None and self.maml.ways > classes:
            raise ValueError(f"maml.ways={self.maml.ways} exceeds the {classes} classes of {self.data.name}")
        student = _param_count(self.student.model, shape, classes, "student")
        maml = [m for m in self.student.methods if "maml_init" in m]
        if maml and split_name(self.student.model.arch) is not None:
            raise ValueError(f"student.methods {maml} meta-train under torch.func, which needs networks without "
                             f"BatchNorm running statistics; {self.student.model.arch} has them: use one of "
                             f"this project's architectures for maml_init")
        if self.teacher.source in ("registry", "file"):
            return self  # its architecture is in its spec: checked when the source is resolved
        teacher = _param_count(self.teacher.model, teacher_input_shape(self.teacher, shape), classes, "teacher")
        if self.student.must_be_smaller and student > teacher:
            raise ValueError(f"student.model has {student:,} parameters, more than teacher.model's "
                             f"{teacher:,}; shrink it or set student.must_be_smaller=false")
        return self


def teacher_input_shape(teacher: TeacherConfig, data_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """What a teacher built here sees: the data's shape, or for torchvision/timm networks
    RGB at ``teacher.image_size`` (grey data is repeated to three channels)."""
    if teacher.source not in ("torchvision", "timm"):
        return tuple(data_shape)
    size = teacher.image_size
    return (3, size or data_shape[1], size or data_shape[2])


def _check_splits(cfg: PipelineConfig, world: int) -> None:
    """Data parallelism cuts every global batch into equal shards, one per process."""
    sizes = {"teacher.train.batch_size": cfg.teacher.train.batch_size,
             "student.train.batch_size": cfg.student.train.batch_size,
             "the transfer batch (kd.transfer_ratio * student.train.batch_size)":
                 cfg.kd.transfer_batch(cfg.student.train.batch_size),
             "maml.meta_batch": cfg.maml.meta_batch, "meta_distill.quiz_batch_size": cfg.meta_distill.quiz_batch_size}
    for key, n in sizes.items():
        if n % world:
            raise ValueError(f"{key}={n} does not split evenly over {world} processes "
                             f"(dist.nnodes * dist.nproc): use a multiple of {world}")


def dataset_shape(data: DataConfig) -> tuple[tuple[int, int, int], int]:
    """(C, H, W) and class count of the prepared data, known before any data is read."""
    (channels, height, width), classes = DATASET_SHAPES[data.name]
    size = data.image_size
    return ((channels, size, size) if size else (channels, height, width)), classes


# (C, H, W) and class count per data set, used to check models before any data is read.
DATASET_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "omniglot": ((1, 28, 28), 964),
    "imagefolder": ((3, 32, 32), 10),
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


def _cnn_teacher(arch: str, steps: int, lr: float = 0.05) -> dict:
    return {"model": {"arch": arch}, "train": {"steps": steps, "batch_size": 64,
                                               "optimizer": {"name": "sgd", "lr": lr}}}


_SMALL_SHIFTS = [{"name": "random_affine", "degrees": 10, "translate": 0.1}]


PRESETS: dict[str, dict[str, Any]] = {
    "digits": {
        # The teacher (resnet8, augmented: ~99% test accuracy) is far stronger than the
        # 64-16-10 MLP student (~95-96% alone); augmentation is for the teacher only.
        "data": {"name": "digits", "augment": _SMALL_SHIFTS},
        "teacher": _cnn_teacher("resnet8", 4000),
        "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [16]}},
                    "train": {"steps": 1500, "batch_size": 64, "augment": False},
                    "seeds": [0, 1, 2]},
        "tracking": {"experiment": "metadistill-digits"},
    },
    "mnist": {
        # 1,000 labels; the other 59,000 training images are the unlabeled transfer split.
        "data": {"name": "mnist", "label_budget": 1000},
        "teacher": _cnn_teacher("resnet8", 2000),
        "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [32]}}, "train": {"steps": 1500}},
        "tracking": {"experiment": "metadistill-mnist"},
    },
    "fashion-mnist": {
        # Without crops and flips the resnet8 teacher (79.6%) fell below the MLP student
        # from scratch (79.9%): it had nothing to teach.  With them it reaches ~82%.
        "data": {"name": "fashion-mnist", "label_budget": 1000,
                 "augment": [{"name": "random_crop", "padding": 2}, {"name": "horizontal_flip"}]},
        "teacher": _cnn_teacher("resnet8", 3000),
        "student": {"model": {"arch": "mlp", "kwargs": {"hidden": [64]}},
                    "train": {"steps": 2000, "augment": False}},
        "tracking": {"experiment": "metadistill-fashion-mnist"},
    },
    "cifar10": {
        # The 50,000-image train zip with 2,000 labels (the rest is transfer data), reported
        # on the 10,000 test images.  The teacher trains on augmented crops and flips; the
        # students do not augment (the 48,000 transfer images are their regulariser), which
        # lets the teacher's outputs be computed once instead of every step.
        "data": {"name": "cifar10", "label_budget": 2000,
                 "augment": [{"name": "random_crop", "padding": 4}, {"name": "horizontal_flip"}]},
        "teacher": _cnn_teacher("resnet20", 4000, lr=0.1),
        "student": {"model": {"arch": "resnet8", "kwargs": {"base_width": 8}},
                    "train": {"steps": 2000, "augment": False}},
        "tracking": {"experiment": "metadistill-cifar10"},
    },
    "cifar100": {
        "data": {"name": "cifar100", "augment": [{"name": "random_crop", "padding": 4},
                                                 {"name": "horizontal_flip"}]},
        "teacher": _cnn_teacher("resnet56", 60000, lr=0.1),
        "student": {"model": {"arch": "resnet20"}, "train": {"steps": 60000}},
        "tracking": {"experiment": "metadistill-cifar100"},
    },
    "omniglot": {
        "data": {"name": "omniglot"},
        "teacher": _cnn_teacher("conv4", 3000),
        "student": {"model": {"arch": "conv4", "kwargs": {"channels": 32}}, "train": {"steps": 3000}},
        "tracking": {"experiment": "metadistill-omniglot"},
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    if "arch" in over and "kwargs" not in over and over["arch"] != base.get("arch"):
        out["kwargs"] = {}  # another architecture: the old one's arguments do not apply
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "kwargs":
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path}: cannot parse: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: the top level must be a table/mapping")
    return data


def _parse_set(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _check_path(parts: list[str], model: type[BaseModel] = None) -> None:
    """Name the first unknown segment of a dotted key, with the allowed keys at that level."""
    model = model or PipelineConfig
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"unknown key {'.'.join(parts)!r}: {where} allows "
                              f"{', '.join(sorted(fields))}")
        annotation = fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return


def _apply_set(tree: dict, parts: list[str], value: Any) -> None:
    _check_path(parts)
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {part} is not a table")
    if parts[-1] == "arch" and node.get("arch") != value:
        node["kwargs"] = {}  # another architecture: the old one's arguments do not apply
    node[parts[-1]] = value


def apply_override(tree: dict, item: str) -> None:
    """Apply one ``dotted.key=value`` item to a config tree (checked, not yet validated)."""
    parts, value = _parse_set(item)
    _apply_set(tree, parts, value)


def load_config(preset: str | None = None, config_file: str | Path | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Preset, then file, then ``--set`` items, validated as one tree."""
    tree: dict[str, Any] = {}
    if config_file is not None:
        tree = _read_file(Path(config_file))
    name = preset or tree.get("preset") or "digits"
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    # Start from the full default tree so a partial override of a nested default
    # (e.g. fewshot.model.kwargs) keeps the default's other fields.
    defaults = PipelineConfig.model_construct().model_dump(mode="json")
    tree = _merge(_merge(_merge(defaults, PRESETS[name]), tree), {"preset": name})
    for item in overrides:
        apply_override(tree, item)
    return validate_tree(tree)


def validate_tree(tree: dict) -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def _format_errors(exc: ValidationError) -> str:
    lines = ["invalid configuration:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden"
                                          and not isinstance(err.get("input"), dict) else ""))
    return "\n".join(lines)


def flatten(cfg: PipelineConfig) -> dict[str, str]:
    """Dotted-key view of the config, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict) and node and not prefix.endswith("kwargs"):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = json.dumps(node) if not isinstance(node, str) else node

    walk("", cfg.model_dump(mode="json"))
    return out
