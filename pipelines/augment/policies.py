"""Training-time augmentation from the config: ``data.augment_policy`` is ``fixed`` (the
``data.augment`` list), ``none``, or one of torchvision's search-free policies
``trivialaugment`` (TrivialAugmentWide) and ``randaugment``.

Every image gets its own random parameters from its own seed (drawn by the training loop
for the whole global batch), so a rank's shard is augmented exactly as one process would.
The fixed ops run batched on the batch's device (CPU or GPU): their parameters come from a
counter-based hash of (seed, op, draw), the same numbers on every device and process.  The
search-free policies run torchvision per image, seeded the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from pipelines.common.rng import global_rng
from pipelines.config.data import AugmentConfig, DataConfig, policy_base
from pipelines.data.prepared import Normalization

_MASK = 0x7FFFFFFF


def _mix(h: torch.Tensor) -> torch.Tensor:
    # 31-bit values times 31-bit constants stay inside int64: no overflow on any device.
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _MASK
    h = ((h ^ (h >> 12)) * 0x297A2D39) & _MASK
    return h ^ (h >> 15)


def uniform(seeds: torch.Tensor, draw: int) -> torch.Tensor:
    """A float32 in [0, 1) per seed for draw number ``draw``: deterministic on any device."""
    h = _mix(_mix(seeds.long() & _MASK) ^ ((draw * 0x9E3779B1 + 0x165667B1) & _MASK))
    return h.float() / 2**31


class FixedOps:
    """The ``data.augment`` list as batched tensor ops on normalised images (N, C, H, W)."""

    def __init__(self, configs: list[AugmentConfig], mean: list[float], std: list[float], first_draw: int = 0):
        # first_draw: where this list's draws start, so a learned policy's base draws
        # numbers of its own, not the searched ops' (which start at 0)
        self.configs, self.normalization, self.first_draw = configs, Normalization(mean, std), first_draw

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        seeds = seeds.to(x.device, non_blocking=True)
        for i, cfg in enumerate(self.configs):
            draws = lambda j, i=i: uniform(seeds, self.first_draw + 8 * i + j)  # noqa: E731
            x = getattr(self, cfg.name)(x, cfg, draws)
        return x

    @staticmethod
    def random_crop(x: torch.Tensor, cfg: AugmentConfig, draws) -> torch.Tensor:
        """Zero padding (the mean colour, in normalised units), then a crop at a random offset."""
        p = cfg.padding
        if p == 0:
            return x
        n, c, h, w = x.shape
        padded = F.pad(x, (p, p, p, p))
        dy = (draws(0) * (2 * p + 1)).long().clamp(max=2 * p)
        dx = (draws(1) * (2 * p + 1)).long().clamp(max=2 * p)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w)
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
        picked_rows = padded.gather(2, rows[..., :1].expand(n, c, h, w + 2 * p))
        return picked_rows.gather(3, cols)

    @staticmethod
    def horizontal_flip(x: torch.Tensor, cfg: AugmentConfig, draws) -> torch.Tensor:
        return torch.where((draws(0) < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)

    @staticmethod
    def random_affine(x: torch.Tensor, cfg: AugmentConfig, draws) -> torch.Tensor:
        """Rotation by up to ``degrees`` and a shift by up to ``translate`` of the size,
        nearest-neighbour, zero fill (as torchvision's RandomAffine)."""
        angle = (draws(0) * 2 - 1) * math.radians(cfg.degrees)
        tx, ty = (draws(1) * 2 - 1) * cfg.translate * 2, (draws(2) * 2 - 1) * cfg.translate * 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
        grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    def color_jitter(self, x: torch.Tensor, cfg: AugmentConfig, draws) -> torch.Tensor:
        """Brightness, then contrast, each by a factor in [1 - strength, 1 + strength], on
        pixels in [0, 1] (clamped), renormalised."""
        s = cfg.strength
        brightness = (1 + (draws(0) * 2 - 1) * s).view(-1, 1, 1, 1).to(x.dtype)
        contrast = (1 + (draws(1) * 2 - 1) * s).view(-1, 1, 1, 1).to(x.dtype)
        pixels = (self.normalization.to_pixels(x, clamp=False) * brightness).clamp(0, 1)
        grey = pixels.mean(dim=(1, 2, 3), keepdim=True)
        pixels = ((pixels - grey) * contrast + grey).clamp(0, 1)
        return self.normalization.from_pixels(pixels)


_BASE_FIRST_DRAW = 1000  # past any searched op's draws (3 per layer)


class LearnedOps:
    """A learned policy (``meta.augment``), batched: first its ``base`` (fixed ops, if any),
    then for each of the policy's ``depth`` layers, each image draws one op from the
    policy's probabilities, a sign and (under uniform sampling) a strength, from its seed,
    and gets that op at sign x strength x the policy's magnitude.  Every op runs on the
    whole batch and each image keeps its own op's result (no data-dependent shapes, so no
    host sync on CUDA)."""

    def __init__(self, spec: dict, mean: list[float], std: list[float]):
        from meta.augment import AugmentPolicy

        base = policy_base(spec)
        self.base = FixedOps(base, mean, std, first_draw=_BASE_FIRST_DRAW) if base else None
        policy = AugmentPolicy.from_json(spec)
        self.ops, self.depth, self.uniform = policy.ops, policy.depth, policy.sampling == "uniform"
        with torch.no_grad():
            self.cumulative = policy.probabilities().cumsum(0)
            self.magnitudes = policy.magnitudes()
        self.normalization = Normalization(mean, std)

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        from meta.augment import apply_op

        seeds = seeds.to(x.device, non_blocking=True)
        cumulative, magnitudes = self.cumulative.to(x.device), self.magnitudes.to(x.device, x.dtype)
        if self.base is not None:
            x = self.base(x, seeds)
        pixels = self.normalization.to_pixels(x)
        for layer in range(self.depth):
            choice = torch.searchsorted(cumulative, uniform(seeds, 3 * layer).contiguous()).clamp(max=len(self.ops) - 1)
            share = torch.where(uniform(seeds, 3 * layer + 1) < 0.5, -1.0, 1.0).to(x.dtype)  # of the magnitude
            if self.uniform:
                share = share * uniform(seeds, 3 * layer + 2).to(x.dtype)
            out = pixels
            for k, op in enumerate(self.ops):
                out = torch.where((choice == k).view(-1, 1, 1, 1), apply_op(op, pixels, share * magnitudes[k]), out)
            pixels = out
        return self.normalization.from_pixels(pixels)


class InPixels(torch.nn.Module):
    """A search-free policy (TrivialAugmentWide, RandAugment) applied to the image in 8-bit
    pixels, the range its colour ops are defined on: the normalised tensor is mapped back
    to [0, 255], augmented, and normalised again."""

    def __init__(self, policy: v2.Transform, mean: list[float], std: list[float]):
        super().__init__()
        self.policy, self.normalization = policy, Normalization(mean, std)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        pixels = (self.normalization.to_pixels(img) * 255).round().to(torch.uint8)
        return self.normalization.from_pixels(self.policy(pixels).float() / 255)


class PerImage:
    """A torchvision transform applied image by image, each under its own seed (after a
    ``base`` of fixed ops on the whole batch, if any)."""

    def __init__(self, transform: v2.Transform, base: FixedOps | None = None):
        self.transform, self.base = transform, base

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        if self.base is not None:
            x = self.base(x, seeds)
        # v2 transforms draw from the global RNG: seed it per image so runs repeat exactly.
        out = []
        with global_rng(), torch.random.fork_rng(devices=[]):
            for img, seed in zip(x, seeds.tolist()):
                torch.random.default_generator.manual_seed(seed)
                out.append(self.transform(img))
        return torch.stack(out)


Augmenter = FixedOps | PerImage | LearnedOps


def build_augmenter(name: str, configs: list[AugmentConfig], mean: list[float],
                    std: list[float], learned: dict | None = None, base: str = "none") -> Augmenter | None:
    """``data.augment_policy``'s augmentation of a batch, or None for no augmentation;
    ``learned`` is the learned policy's JSON (policy ``learned``); ``base="fixed"`` runs
    ``configs`` under a search-free policy (``data.augment_policy_base``)."""
    if name == "fixed":
        return FixedOps(configs, mean, std) if configs else None
    if name == "learned":
        if learned is None:
            raise ValueError("data.augment_policy=learned needs its policy: run the prepare-augmentation stage "
                             "(pipelines.augment_search.learned_policy) or set data.augment_policy_file")
        return LearnedOps(learned, mean, std)
    under = FixedOps(configs, mean, std, first_draw=_BASE_FIRST_DRAW) if base == "fixed" else None
    if name == "trivialaugment":
        return PerImage(InPixels(v2.TrivialAugmentWide(), mean, std), under)
    if name == "randaugment":
        return PerImage(InPixels(v2.RandAugment(), mean, std), under)
    return None


def make_augmenter(cfg: DataConfig, data, learned: dict | None = None) -> Augmenter | None:
    """The training augmentation of ``cfg.augment_policy`` for the prepared ``data`` (None:
    none); ``learned``: the policy JSON when the policy is ``learned``."""
    return build_augmenter(cfg.augment_policy, cfg.augment, data.mean, data.std, learned, cfg.augment_policy_base)


def to_torchvision(spec: dict) -> v2.Transform:
    """A learned policy as a torchvision v2 transform on [0, 1] image tensors, for other
    training stacks: its base (crop, flip, ...), then ``depth`` ops per image in turn, each
    with the policy's probabilities, magnitudes as symmetric ranges drawn uniformly (as
    ``sampling="uniform"`` does; an ``exact`` policy applies exactly +-magnitude).
    torchvision has no random range for sharpness, posterize or solarize: they are applied
    at the range's mean strength (sharpness at 1 + magnitude)."""

    from meta.augment import AugmentPolicy

    policy = AugmentPolicy.from_json(spec)
    probs, mags = policy.probabilities().tolist(), policy.magnitudes().tolist()
    layer = lambda: v2.RandomChoice([_torchvision_op(n, m) for n, m in zip(policy.ops, mags)], p=probs)  # noqa: E731
    base = [_torchvision_base(cfg) for cfg in policy_base(spec)]
    layers = [layer() for _ in range(policy.depth)]
    return layers[0] if not base and policy.depth == 1 else v2.Compose([*base, *layers])


def _torchvision_op(name: str, m: float) -> v2.Transform:
    if name == "rotate":
        return v2.RandomAffine(degrees=m)
    if name in ("shear_x", "shear_y"):
        deg = math.degrees(math.atan(m))
        return v2.RandomAffine(degrees=0, shear=(-deg, deg, 0, 0) if name == "shear_x" else (0, 0, -deg, deg))
    if name in ("translate_x", "translate_y"):
        return v2.RandomAffine(degrees=0, translate=(m, 0) if name == "translate_x" else (0, m))
    if name == "scale":
        return v2.RandomAffine(degrees=0, scale=(1 / (1 + m), 1 + m))
    if name in ("brightness", "contrast", "saturation"):
        return v2.ColorJitter(**{name: m})
    if name == "sharpness":
        return v2.RandomAdjustSharpness(1 + m, p=1.0)
    if name == "posterize":
        return v2.Compose([v2.ToDtype(torch.uint8, scale=True), v2.RandomPosterize(bits=8 - round(m / 2), p=1.0),
                           v2.ToDtype(torch.float32, scale=True)])
    if name == "solarize":
        return v2.RandomSolarize(threshold=1 - m / 2, p=1.0)
    if name == "autocontrast":
        return v2.RandomAutocontrast(p=1.0)
    if name == "equalize":
        return v2.RandomEqualize(p=1.0)
    return v2.Identity()


def _torchvision_base(cfg: AugmentConfig) -> v2.Transform:
    if cfg.name == "random_crop":
        return _PaddedCrop(cfg.padding)
    if cfg.name == "horizontal_flip":
        return v2.RandomHorizontalFlip()
    if cfg.name == "random_affine":
        return v2.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate))
    return v2.ColorJitter(brightness=cfg.strength, contrast=cfg.strength)


class _PaddedCrop(torch.nn.Module):
    """Zero padding (black: the export knows no normalisation, where the pipeline's
    ``random_crop`` pads with the mean colour), then a crop of the image's own size at a
    random offset (torchvision's RandomCrop needs the size up front; this takes it from
    each image)."""

    def __init__(self, padding: int):
        super().__init__()
        self.padding = padding

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        p, (h, w) = self.padding, img.shape[-2:]
        top, left = (int(torch.randint(0, 2 * p + 1, ())) for _ in range(2))
        return F.pad(img, (p, p, p, p))[..., top:top + h, left:left + w]
