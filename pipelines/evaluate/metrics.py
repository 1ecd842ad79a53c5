"""Test-split metrics: accuracy, loss, expected calibration error, per-class accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.engine.device import device_of, in_batches, inference_batch


@dataclass
class Evaluation:
    accuracy: float
    loss: float
    ece: float
    per_class_accuracy: list[float]
    confusion: np.ndarray
    correct: np.ndarray | None = None  # per test image, for paired comparisons on the same images

    def metrics(self, prefix: str = "test_") -> dict[str, float]:
        out = {f"{prefix}acc": self.accuracy, f"{prefix}loss": self.loss, f"{prefix}ece": self.ece}
        out.update({f"{prefix}acc_class_{i}": a for i, a in enumerate(self.per_class_accuracy)})
        return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Guo et al. 2017: sum over confidence bins of |accuracy - confidence| weighted by bin size."""
    confidence, predicted = probs.max(-1)
    correct = (predicted == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch: int | None = None,
              device: torch.device | None = None) -> torch.Tensor:
    """The model's logits for ``x`` (float32, on the host), in eval mode.  ``device``: where
    the forward runs; default where the model's weights are (an int8 model, whose packed
    weights are no parameters, says ``torch.device("cpu")``)."""
    model.eval()
    device = device or device_of(model, x.device)
    return torch.cat([model(images).float().cpu() for images in in_batches(x, batch or inference_batch(x), device)])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
             batch: int | None = None, device: torch.device | None = None) -> Evaluation:
    """``device``: where the forward runs (see :func:`logits_of`)."""
    # Forward on the model's device; the metrics on the host (y's device when it is there).
    logits = logits_of(model, x, batch, device)
    y = y.cpu()
    probs = logits.softmax(-1)
    predicted = logits.argmax(-1)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((y, predicted), torch.ones_like(y), accumulate=True)
    support = confusion.sum(1).clamp(min=1)
    return Evaluation(accuracy=float((predicted == y).float().mean()),
                      loss=float(F.cross_entropy(logits, y)),
                      ece=expected_calibration_error(probs, y),
                      per_class_accuracy=(confusion.diag() / support).tolist(),
                      confusion=confusion.numpy(), correct=(predicted == y).numpy())
