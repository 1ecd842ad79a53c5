"""``teacher.*``: the teacher trained here or brought (and its fine-tune)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from pipelines.config.sources import FromSource, TeacherSource, check_source
from pipelines.config.training import ModelConfig, OptimConfig, TrainConfig


class FinetuneConfig(TrainConfig):
    """Adapting a teacher brought from elsewhere to this data set."""

    mode: Literal["none", "head", "all"] = Field(
        "none", description="none: use it as it is (its classes must be the data's); head: a new head for the "
                            "data's classes, trained alone; all: a new head, then the whole network trains")
    steps: int = Field(500, gt=0, description="optimiser steps of the fine-tune")
    optimizer: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=0.01),
                                   description="the fine-tune's optimiser (SGD at 0.01, cosine)")


class ImproveConfig(TrainConfig):
    """``teacher.improve``: the teacher learns from the unlabeled transfer split too, starting
    from the labelled teacher: consistency training (FixMatch's confident weak-view
    pseudo-label as the target of a strong view; UDA's sharpened soft target with
    ``sharpen``).  Its own stage, cached; every teacher-based student learns from the
    improved teacher.  Skipped when the data has no transfer split."""

    method: Literal["none", "consistency"] = Field(
        "consistency", description="none: the students learn from the labelled teacher as it is")
    steps: int = Field(300, gt=0, description="optimiser steps of consistency training")
    optimizer: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=0.02),
                                   description="its optimiser (SGD at 0.02, cosine)")
    unlabeled_ratio: float = Field(3.0, gt=0, description="transfer examples per labelled example in each step")
    threshold: float = Field(0.9, ge=0, le=1, description="keep a pseudo-label where the weak view's top "
                                                          "probability reaches this")
    sharpen: float | None = Field(None, gt=0, description="None: hard pseudo-labels (FixMatch); a temperature: "
                                                          "soft targets softmax(logits / sharpen) (UDA)")
    weight: float = Field(1.0, ge=0, description="weight of the consistency term beside the labelled cross-entropy")
    strong: Literal["randaugment", "learned"] = Field(
        "randaugment", description="the strong view's ops: randaugment, strong_depth ops per image drawn "
                                   "uniformly from meta.augment's narrow ops, each at up to its full range "
                                   "(FixMatch's RandAugment); learned: the learned augmentation policy "
                                   "(data.augment_search, or data.augment_policy_file), its base included")
    strong_depth: int = Field(2, ge=1, le=3, description="strong view (randaugment): ops per image, drawn from "
                                                         "every narrow op of meta.augment at up to its full range")
    cutout: float = Field(0.5, ge=0, lt=1, description="strong view: a square of this share of the side, "
                                                      "set to the mean colour, at a random place (0: none)")
    ema: float | None = Field(None, gt=0, lt=1, description="None: the improved teacher is the trained weights; a "
                                                          "decay (0.999): their exponential moving average over "
                                                          "the steps, buffers included (Mean Teacher, Noisy "
                                                          "Student's EMA)")
    keep_p: float = Field(0.05, gt=0, le=1, description="the improved teacher replaces the original only when it "
                                                        "beats it on the held-out labelled images beyond noise: "
                                                        "McNemar's exact test on the images the two disagree on, "
                                                        "one-sided p below this (1: always replace it)")


class TeacherConfig(FromSource):
    source_field: ClassVar[str] = "source"
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
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig, description="adapting a brought teacher to the "
                                                                                "data: mode and training run")
    improve: ImproveConfig = Field(default_factory=ImproveConfig, description="the teacher's consistency training on "
                                                                             "the transfer split, its own cached "
                                                                             "stage")
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(arch="mlp", kwargs={"hidden": [256, 256]}),
                               description="the teacher's network (source train, torchvision or timm)")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(steps=3000),
                               description="the teacher's training run (source train)")
    seed: int = Field(0, description="training / the new head's initialisation")

    @model_validator(mode="after")
    def _source(self) -> TeacherConfig:
        location = self.weights if self.source in ("torchvision", "timm") else self.uri
        key = "weights" if self.source in ("torchvision", "timm") else "uri"
        check_source("teacher", self.source, location, f"teacher.{key}", self.model.arch)
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


def teacher_input_shape(teacher: TeacherConfig, data_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """What a teacher built here sees: the data's shape, or for torchvision/timm networks
    RGB at ``teacher.image_size`` (grey data is repeated to three channels)."""
    if teacher.source not in ("torchvision", "timm"):
        return tuple(data_shape)
    size = teacher.image_size
    return (3, size or data_shape[1], size or data_shape[2])
