"""What training measures: the running loss and accuracy of the loop (on the device, read
at log steps only), the first non-finite loss, and validation accuracy over ranks."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipelines.engine import distributed
from pipelines.engine.device import device_of, in_batches, inference_batch, part_of, to_device

if TYPE_CHECKING:
    from pipelines.data.prepared import Prepared


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite: the stage fails rather than finish on garbage."""


def check_finite(value: float, desc: str, step: int, what: str = "training loss") -> None:
    if not math.isfinite(value):
        raise TrainingDiverged(f"{desc}: the {what} is {value} at step {step}; training diverged. Lower the "
                               f"learning rate, set train.grad_clip, or lower kd.temperature")


@torch.no_grad()
def correctness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Per example, whether the model's top class is its label (bool, on the host): what a
    paired comparison of two models on the same images needs (``sign_test``)."""
    batch = batch or inference_batch(x)
    was_training = model.training
    model.eval()
    device = device_of(model, x.device)
    hits = [model(images).argmax(-1) == to_device(y[i:i + batch], device)
            for i, images in zip(range(0, len(y), batch), in_batches(x, batch, device))]
    model.train(was_training)
    return torch.cat(hits).cpu() if hits else torch.zeros(0, dtype=torch.bool)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    hits = correctness(model, x, y, batch)
    return hits.sum().item() / max(1, len(hits))


def sign_test(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int, float]:
    """Whether model ``a`` beats model ``b`` beyond noise on the same examples (their
    ``correctness``): the examples only ``a`` gets right, those only ``b`` gets right, and the
    exact one-sided p-value of McNemar's test (a sign test on the disagreements: the chance
    of ``a`` winning at least that many of them if neither model were better)."""
    if a.shape != b.shape:
        raise ValueError(f"sign_test compares two models on the same examples; got {tuple(a.shape)} and {tuple(b.shape)}")
    wins, losses = int((a & ~b).sum()), int((b & ~a).sum())
    n = wins + losses
    return wins, losses, sum(math.comb(n, k) for k in range(wins, n + 1)) / 2 ** n


def pack_hits(hits: torch.Tensor) -> str:
    """``correctness`` as text for JSON (a '0'/'1' character per example): a study's trials
    keep theirs so that any two can be compared later, in any process."""
    return "".join("1" if h else "0" for h in hits.tolist())


def unpack_hits(text: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def held_out(data: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled images that steer a run's choices (``kd_tuned``'s grid point,
    ``meta_distill``'s guard, the improved teacher's keep, the architecture search): the quiz
    and validation splits, never trained on, as one tensor pair."""
    def whole(x) -> torch.Tensor:  # a stream split is decoded once: these splits are small
        return x if isinstance(x, torch.Tensor) else torch.cat(list(in_batches(x, inference_batch(x), x.device)))

    return (torch.cat([whole(data.x("quiz")), whole(data.x("val"))]), torch.cat([data.y("quiz"), data.y("val")]))


def validation_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Each rank scores its part of the validation split; the counts are summed."""
    part = distributed.part(len(y))
    n = part.stop - part.start
    correct, n = distributed.mean_scalars([accuracy(model, part_of(x, part), y[part]) * n, float(n)])
    return correct / n


class RunningMetrics:
    """Loss and accuracy summed on the device between log steps (no host sync per step),
    and the first step whose loss was not finite."""

    def __init__(self, device: torch.device):
        # loss sum, correct, examples, labelled examples (this rank's shard)
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), device=device)

    @torch.no_grad()
    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        value, labelled = loss.detach().float(), y >= 0
        newly_bad = (self.first_bad == 0) & ~torch.isfinite(value)
        self.first_bad = torch.where(newly_bad, step, self.first_bad)
        self.bad_value = torch.where(newly_bad, value, self.bad_value)
        self.sums[0] += value * len(y)
        self.sums[1] += ((logits.argmax(-1) == y) & labelled).sum()
        self.sums[2] += len(y)
        self.sums[3] += labelled.sum()

    def check(self, desc: str) -> None:
        """Raise :class:`TrainingDiverged` naming the first bad step (one host sync)."""
        if (bad := int(self.first_bad)) > 0:
            check_finite(self.bad_value.item(), desc, bad)

    def read(self) -> dict[str, float]:
        """The means since the last read, over every rank; then start again."""
        loss_sum, correct, n, n_labelled = distributed.mean_tensor(self.sums).tolist()
        self.sums.zero_()
        return {"train_loss": loss_sum / n, "train_acc": correct / max(n_labelled, 1)}
