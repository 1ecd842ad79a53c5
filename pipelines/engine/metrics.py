"""TODO docstring."""

from __future__ import annotations

import math
import torch
from torch import nn
from pipelines.engine import distributed
from pipelines.engine.device import device_of, in_batches, inference_batch, part_of, to_device


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite: the stage fails rather than finish on garbage."""


def check_finite(value: float, desc: str, step: int, what: str = "training loss") -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"{desc}: the {what} is {value} at step {step}; training diverged. Lower the "
                               f"learning rate, set train.grad_clip, or lower kd.temperature")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    batch = batch or inference_batch(x)
    was_training = model.training
    model.eval()
    device = device_of(model, x.device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for i, images in zip(range(0, len(y), batch), in_batches(x, batch, device)):
        correct += (model(images).argmax(-1) == to_device(y[i:i + batch], device)).sum()
    model.train(was_training)
    return correct.item() / max(1, len(y))


def validation_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Each rank scores its part of the validation split; the counts are summed."""
    part = distributed.part(len(y))
    n = part.stop - part.start
    correct, n = distributed.mean_scalars([accuracy(model, part_of(x, part), y[part]) * n, float(n)])
    return correct / n
