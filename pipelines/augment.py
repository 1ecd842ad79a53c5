"""Training-time augmentation from the config, built on ``torchvision.transforms.v2``.

Transforms run per sample (each image gets its own random parameters and its own seed,
drawn from the training loop's generator) on the normalised tensors.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from pipelines.config import AugmentConfig


def build_transform(cfg: AugmentConfig, size: tuple[int, int]) -> v2.Transform:
    if cfg.name == "random_crop":
        return v2.RandomCrop(size, padding=cfg.padding)
    if cfg.name == "horizontal_flip":
        return v2.RandomHorizontalFlip()
    if cfg.name == "random_affine":
        return v2.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate))
    return v2.ColorJitter(brightness=cfg.strength, contrast=cfg.strength)


class Augmenter:
    def __init__(self, configs: list[AugmentConfig], size: tuple[int, int]):
        self.transform = v2.Compose([build_transform(c, size) for c in configs])

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


def make_augmenter(configs: list[AugmentConfig], input_shape: tuple[int, ...]) -> Augmenter | None:
    return Augmenter(configs, tuple(input_shape[1:])) if configs else None
