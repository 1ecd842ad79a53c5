"""The settings every training stage shares: a model, an optimiser, a training run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from models.external import split_name, unknown_external_message
from models.registry import MODEL_NAMES, is_known_model
from pipelines.config.errors import Strict


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
