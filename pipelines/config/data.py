"""``data.*``: the data set, its splits, storage and augmentation (and its search)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from meta.augment import SPACES as AUGMENT_SPACES
from pipelines.config.errors import Strict

DatasetName = Literal["digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "omniglot",
                      "imagefolder"]


class AugmentConfig(Strict):
    """One ``torchvision.transforms.v2`` transform, by name, applied to training batches."""

    name: Literal["random_crop", "horizontal_flip", "random_affine", "color_jitter"] = Field(
        description="the transform: random_crop (pad, then crop at a random offset), horizontal_flip, random_affine "
                    "(rotation and shift) or color_jitter (brightness and contrast)")
    padding: int = Field(2, ge=0, description="random_crop: pixels of padding (the mean colour) on each side")
    degrees: float = Field(10.0, ge=0, description="random_affine: largest rotation, in degrees")
    translate: float = Field(0.1, ge=0, le=0.5, description="random_affine: largest shift, as a share of the side")
    strength: float = Field(0.2, ge=0, le=1, description="color_jitter: brightness and contrast factors drawn "
                                                         "in [1 - strength, 1 + strength]")


class AugmentSearchConfig(Strict):
    """``data.augment_policy=learned``: the online hypergradient search of ``meta.augment``
    (or, ``method=population``, a few candidates scored on held-out data).
    A proxy network (``proxy``: ``student.model``'s architecture or ``teacher.model``'s)
    trains on the policy's augmented batches; every ``interval`` steps the policy takes one
    Adam step on the quiz cross-entropy after ``unroll_steps`` unrolled SGD steps of the proxy.  The
    defaults (two ops per image, uniform strengths, starting at 0.8 of each range, policy
    step 0.01) are the best of a screen on MNIST-1000 (docs/benchmarks/augment_screen.md)."""

    steps: int = Field(400, gt=0, description="training steps of the proxy network")
    batch_size: int = Field(64, gt=0, description="images per proxy step and per quiz batch of the hypergradient")
    interval: int = Field(2, ge=1, description="a policy update every this many proxy steps")
    policy_lr: float = Field(0.01, gt=0, description="Adam step size of the op logits and magnitudes")
    model_lr: float = Field(0.05, gt=0, description="SGD step size of the proxy, and of the unrolled steps")
    unroll_steps: int = Field(1, ge=1, le=50, description="unrolled SGD steps of the hypergradient, each on a "
                                                          "batch of its own: a longer look-ahead, at that many "
                                                          "times the cost")
    tau: float = Field(1.0, gt=0, description="Gumbel-softmax temperature of the relaxed op choice")
    init_magnitude: float = Field(0.8, gt=0, lt=1, description="starting magnitudes, as a share of each op's range")
    space: Literal["narrow", "wide"] = Field(
        "narrow", description="the op space (meta.augment.SPACES): narrow, the nine ops of the published "
                              "tables; wide, TrivialAugmentWide's fourteen ops (identity, posterize, solarize, "
                              "equalize, autocontrast, saturation ... ) at its ranges")
    ops: list[str] | None = Field(None, description="the ops searched over; default: all of the space's. narrow: "
                                                    + ", ".join(AUGMENT_SPACES["narrow"]) + "; wide: "
                                                    + ", ".join(AUGMENT_SPACES["wide"]))
    base: Literal["none", "fixed"] = Field(
        "none", description="fixed: every image first gets the data.augment list (a padded crop and a flip in "
                            "the fashion-mnist and cifar10 presets), then the searched ops; in the search and "
                            "in training")
    depth: int = Field(2, ge=1, le=3, description="ops applied to each image in turn")
    sampling: Literal["exact", "uniform"] = Field(
        "uniform", description="an op's magnitude: exactly the learned one (random sign), or drawn uniformly "
                             "in [0, learned] (random sign), as TrivialAugment draws its magnitudes")
    proxy: Literal["student", "teacher"] = Field("student", description="the architecture of the proxy network")
    method: Literal["hypergradient", "population"] = Field(
        "hypergradient", description="hypergradient: the online search above; population: a few candidate "
                                     "policies (every population_magnitudes x population_depths, equal "
                                     "probabilities; they replace init_magnitude and depth), each scored by the "
                                     "held-out (quiz) accuracy of a proxy trained population_steps steps under it "
                                     "with the proxy role's own training settings; the best is the policy")
    population_magnitudes: list[float] = Field(default_factory=lambda: [0.3, 0.6, 0.99],
                                               description="population: candidate magnitudes, as a share of each "
                                                           "op's range")
    population_depths: list[int] = Field(default_factory=lambda: [1, 2],
                                         description="population: candidate numbers of ops per image")
    population_steps: int = Field(500, gt=0, description="population: training steps of each candidate's proxy")
    seed: int = Field(0, description="seed of the proxy's initialisation and of the search's random draws")

    @model_validator(mode="after")
    def _population(self) -> AugmentSearchConfig:
        if not self.population_magnitudes or any(not 0 < m < 1 for m in self.population_magnitudes):
            raise ValueError(f"data.augment_search.population_magnitudes must be shares in (0, 1); "
                             f"got {self.population_magnitudes}")
        if not self.population_depths or any(not 1 <= d <= 3 for d in self.population_depths):
            raise ValueError(f"data.augment_search.population_depths must be in [1, 3]; got {self.population_depths}")
        return self

    @model_validator(mode="after")
    def _ops(self) -> AugmentSearchConfig:
        allowed = AUGMENT_SPACES[self.space]
        if self.ops is not None and (not self.ops or len(set(self.ops)) != len(self.ops)
                                     or any(op not in allowed for op in self.ops)):
            raise ValueError(f"data.augment_search.ops must be distinct ops out of the {self.space} space's "
                             f"{', '.join(allowed)}; got {self.ops}")
        return self

    @property
    def op_names(self) -> list[str]:
        """The ops searched over: ``ops``, or all of the space's."""
        return list(self.ops) if self.ops is not None else list(AUGMENT_SPACES[self.space])


class DataConfig(Strict):
    name: DatasetName = Field("digits", description="the data set read from data.root (layouts: the docs' Data "
                                                     "page); imagefolder: any <class>/<image> tree")
    root: Path | None = Field(None, description="data folder; default $METADISTILL_DATA")
    download: bool = Field(False, description="let torchvision download CIFAR (needs internet)")
    quiz_fraction: float = Field(0.1, gt=0, lt=1, description="held-out part of train for meta-objectives")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="share of the labelled pool held out as the validation "
                                                             "split (curves, choosing the student, kd_tuned's grid, "
                                                             "meta_distill's guard)")
    test_fraction: float = Field(0.2, gt=0, lt=1,
                                 description="test share carved out where the set has no test split")
    train_fraction: float = Field(1.0, gt=0, le=1, description="keep this share of the train split")
    label_budget: int | None = Field(None, gt=0, description="keep at most this many train labels")
    split_seed: int = Field(0, description="seed of every split draw: test, labelled subset, transfer, quiz, val")
    transfer: bool = Field(True, description="keep the training pool's examples left out by label_budget / "
                                              "train_fraction as an unlabeled transfer split (labels dropped)")
    transfer_root: Path | None = Field(None, description="a folder of unlabeled images (any depth, no class "
                                                          "folders) added to the transfer split")
    transfer_limit: int | None = Field(None, gt=0, description="keep at most this many transfer examples")
    augment: list[AugmentConfig] = Field(default_factory=list, description="the fixed augmentations, in order, on "
                                                                           "the training batches of roles whose "
                                                                           "train.augment is true (or a policy's "
                                                                           "base)")
    augment_policy: Literal["fixed", "none", "trivialaugment", "randaugment", "learned"] = Field(
        "fixed", description="fixed: the data.augment list; none; trivialaugment (TrivialAugmentWide) or "
                             "randaugment: torchvision's search-free policies, on 8-bit pixels; learned: "
                             "searched by the prepare-augmentation stage (data.augment_search), or read "
                             "from data.augment_policy_file")
    augment_policy_base: Literal["none", "fixed"] = Field(
        "none", description="trivialaugment or randaugment: fixed runs the data.augment list (the presets' "
                            "padded crop and flip) first, then the policy: the fair baseline of a learned "
                            "policy with data.augment_search.base=fixed")
    augment_search: AugmentSearchConfig = Field(default_factory=AugmentSearchConfig, description=(
        "the search of the learned policy (data.augment_policy=learned), in the prepare-augmentation stage"))
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
    shard_mb: int = Field(256, ge=1, description="storage=stream: target size of one tar shard, in MB")

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
    def _base(self) -> DataConfig:
        # a base is the data.augment list under a policy: the searched ops' (augment_search.base)
        # or a search-free policy's (augment_policy_base); either needs the list
        if self.augment_policy_base == "fixed" and self.augment_policy not in ("trivialaugment", "randaugment"):
            raise ValueError(f"data.augment_policy_base=fixed puts the data.augment list under trivialaugment or "
                             f"randaugment, but data.augment_policy is {self.augment_policy!r}; a learned policy "
                             f"takes its base from data.augment_search.base")
        searched = self.augment_policy == "learned" and self.augment_policy_file is None
        if searched and self.augment_search.base == "fixed":
            field, under = "data.augment_search.base", "the searched ops"
        elif self.augment_policy_base == "fixed":
            field, under = "data.augment_policy_base", "the policy"
        else:
            return self
        if not self.augment:
            raise ValueError(f"{field}=fixed puts the data.augment list under {under}, but data.augment is empty; "
                             f"list its ops (e.g. [{{name: random_crop}}, {{name: horizontal_flip}}]) or set "
                             f"{field}=none")
        return self

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.quiz_fraction + self.val_fraction >= 0.9:
            raise ValueError(f"data.quiz_fraction + data.val_fraction = "
                             f"{self.quiz_fraction + self.val_fraction:.2f} leaves under 10% "
                             f"of train for training; keep their sum below 0.9")
        return self


def read_policy_file(path: Path) -> dict:
    """A learned policy's JSON, checked field by field (``meta.augment.AugmentPolicy``, and
    its ``base``: a ``data.augment`` list)."""
    from meta.augment import AugmentPolicy, PolicyError

    try:
        spec = json.loads(path.read_text())
        AugmentPolicy.from_json(spec)
        policy_base(spec)
    except FileNotFoundError:
        raise ValueError(f"data.augment_policy_file: {path} does not exist") from None
    except (json.JSONDecodeError, PolicyError) as exc:
        raise ValueError(f"data.augment_policy_file {path}: {exc}") from None
    return spec


def policy_base(spec: dict) -> list[AugmentConfig]:
    """The ops a learned policy's JSON puts under its searched ops (``base``; none when absent)."""
    from meta.augment import PolicyError

    base = spec.get("base", [])
    if not isinstance(base, list):
        raise PolicyError(f"base: {base!r} is not a list of data.augment ops")
    configs = []
    for i, entry in enumerate(base):
        try:
            configs.append(AugmentConfig.model_validate(entry))
        except ValueError as exc:
            raise PolicyError(f"base[{i}]: {exc}") from None
    return configs
