"""Training-time augmentation from the config, built on ``torchvision.transforms.v2``:
``data.augment_policy`` is ``fixed`` (the ``data.augment`` list), ``none``, or one of the
search-free policies ``trivialaugment`` (TrivialAugmentWide) and ``randaugment``.

Transforms run per sample (each image gets its own random parameters and its own seed,
drawn from the training loop's generator) on the normalised tensors.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from pipelines.config import AugmentConfig, DataConfig


def build_transform(cfg: AugmentConfig, size: tuple[int, int]) -> v2.Transform:
    if cfg.name == "random_crop":
        return v2.RandomCrop(size, padding=cfg.padding)
    if cfg.name == "horizontal_flip":
        return v2.RandomHorizontalFlip()
    if cfg.name == "random_affine":
        return v2.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate))
    return v2.ColorJitter(brightness=cfg.strength, contrast=cfg.strength)


class InPixels(torch.nn.Module):
    """A search-free policy (TrivialAugmentWide, RandAugment) applied to the image in 8-bit
    pixels, the range its colour ops are defined on: the normalised tensor is mapped back
    to [0, 255], augmented, and normalised again."""

    def __init__(self, policy: v2.Transform, mean: list[float], std: list[float]):
        super().__init__()
        self.policy = policy
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        pixels = ((img * self.std + self.mean).clamp(0, 1) * 255).round().to(torch.uint8)
        return (self.policy(pixels).float() / 255 - self.mean) / self.std


def build_policy(name: str, configs: list[AugmentConfig], size: tuple[int, int], mean: list[float],
                 std: list[float]) -> v2.Transform | None:
    """``data.augment_policy``'s transform for one image, or None for no augmentation."""
    if name == "fixed":
        return v2.Compose([build_transform(c, size) for c in configs]) if configs else None
    if name == "trivialaugment":
        return InPixels(v2.TrivialAugmentWide(), mean, std)
    if name == "randaugment":
        return InPixels(v2.RandAugment(), mean, std)
    return None


class Augmenter:
    def __init__(self, transform: v2.Transform):
        self.transform = transform

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Augment each image with its own seed (drawn by the training loop for the whole
        global batch), so a rank's shard gets exactly the augmentation one process would."""
        # v2 transforms draw from the global RNG: seed it per sample so runs repeat exactly.
        out = []
        with torch.random.fork_rng(devices=[]):
            for img, seed in zip(x, seeds.tolist()):
                torch.random.default_generator.manual_seed(seed)
                out.append(self.transform(img))
        return torch.stack(out)


def make_augmenter(cfg: DataConfig, data) -> Augmenter | None:
    """The training augmentation of ``cfg.augment_policy`` for the prepared ``data`` (None: none)."""
    transform = build_policy(cfg.augment_policy, cfg.augment, tuple(data.input_shape[1:]), data.mean, data.std)
    return Augmenter(transform) if transform is not None else None
