"""The prepared splits as the stages see them, where they live, the spec a model is saved
with, and the data's normalisation (the one place that maps tensors to pixels and back).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

SPLITS = ("train", "quiz", "val", "test")  # labelled; "transfer" has inputs only


@dataclass
class Prepared:
    tensors: dict[str, torch.Tensor]  # {split}_x float32 (N,C,H,W) normalised, {split}_y int64; transfer_x
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: list[str]
    mean: list[float]
    std: list[float]
    key: str
    source: str
    cached: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")  # where training on it runs (see `place`)
    storage: str = "memory"  # or "stream": the x splits are lazy `pipelines.shards.ShardImages`

    def x(self, split: str) -> torch.Tensor:
        return self.tensors[f"{split}_x"]

    def y(self, split: str) -> torch.Tensor:
        return self.tensors[f"{split}_y"]

    def transfer(self) -> torch.Tensor | None:
        """The unlabeled transfer inputs, or None when there are none."""
        x = self.tensors.get("transfer_x")
        return x if x is not None and len(x) else None


def place(data: Prepared, device: torch.device, share: float = 0.5) -> Prepared:
    """``data`` for training on ``device``.  Its tensors move there once when they take at
    most ``share`` of the device's free memory; else they stay on the host in pinned
    memory, and the training loops copy each batch over without blocking."""
    if device.type == "cpu" or data.device == device or data.storage == "stream":  # copied as decoded
        return dataclasses.replace(data, device=device)
    nbytes = sum(t.numel() * t.element_size() for t in data.tensors.values())
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= share * free:
        tensors = {k: t.to(device) for k, t in data.tensors.items()}
    else:
        tensors = {k: t.pin_memory() for k, t in data.tensors.items()}
    return dataclasses.replace(data, tensors=tensors, device=device)


def split_counts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    counts = {s: len(tensors[f"{s}_y"]) for s in SPLITS}
    counts["transfer"] = len(tensors["transfer_x"]) if "transfer_x" in tensors else 0
    return counts


def model_spec(arch: str, kwargs: dict, data: Prepared) -> dict:
    """Everything needed to rebuild a model and feed it raw [0, 1] images."""
    return {"arch": arch, "kwargs": kwargs, "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "class_names": data.class_names,
            "mean": data.mean, "std": data.std, "data_key": data.key}


def channel_sums(images: np.ndarray) -> np.ndarray:
    """Each image's per-channel sum and sum of squares, in float64: (N, 2, C) for (N, C, H, W)
    images.  Both storage modes compute the training split's statistics from these (stream
    storage image by image while it scans), so their means and deviations are the same bits."""
    flat = images.reshape(*images.shape[:2], -1).astype(np.float64)
    return np.stack([flat.sum(2), (flat * flat).sum(2)], axis=1)


def mean_std(sums: np.ndarray, pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """The channels' mean and standard deviation (+1e-6) over images with ``sums``
    (:func:`channel_sums`) of ``pixels`` pixels each, as float32."""
    total, squares = sums[:, 0].sum(0), sums[:, 1].sum(0)
    count = len(sums) * pixels
    mean = total / count
    return mean.astype(np.float32), (np.sqrt(np.maximum(squares / count - mean * mean, 0.0)) + 1e-6).astype(np.float32)


class Normalization:
    """The data's normalisation, one channel at a time: ``(pixels - mean) / std`` and back.
    Every place that maps prepared tensors to [0, 1] pixels (augmentation, figures, the
    served model's example) goes through here.  Works on (C, H, W) and (N, C, H, W)."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def to(self, device: torch.device) -> Normalization:
        """The same normalisation with its tensors on ``device`` (built once per loop)."""
        moved = Normalization([], [])
        moved.mean, moved.std = self.mean.to(device), self.std.to(device)
        return moved

    def _on(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)

    def to_pixels(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        mean, std = self._on(x)
        pixels = x * std + mean
        return pixels.clamp(0, 1) if clamp else pixels

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        mean, std = self._on(pixels)
        return (pixels - mean) / std
