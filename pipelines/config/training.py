"""The settings every training stage shares: a model, an optimiser, a training run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from models.external import split_name, unknown_external_message
from models.registry import MODEL_NAMES, is_known_model
from pipelines.config.errors import Strict


class ModelConfig(Strict):
    arch: str = Field("mlp", description="the network: an architecture of models/, or torchvision:NAME / timm:NAME")
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
    name: Literal["sgd", "adam", "adamw"] = Field("sgd", description="the optimiser: sgd (Nesterov momentum when "
                                                                    "momentum > 0), adam or adamw")
    lr: float = Field(0.05, gt=0, description="learning rate at the first step (where the cosine schedule starts)")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd's Nesterov momentum (adam and adamw ignore it)")
    weight_decay: float = Field(5e-4, ge=0, description="L2 penalty on the weights (decoupled for adamw)")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="constant lr, or cosine: from lr down to 0 "
                                                                         "over the run's steps")


class TrainConfig(Strict):
    steps: int = Field(1500, gt=0, description="optimiser steps of this training run")
    batch_size: int = Field(64, gt=0, description="labelled images per step, summed over all processes (transfer "
                                                  "images are drawn beside them)")
    optimizer: OptimConfig = Field(default_factory=OptimConfig, description="the optimiser and its learning-rate "
                                                                           "schedule")
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
