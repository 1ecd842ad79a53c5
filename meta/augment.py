"""A learned augmentation policy: differentiable image ops, their probabilities and
magnitudes, and the hypergradient that tunes them (in the style of DADA and MADAO).

The policy holds a logit and a bounded magnitude per op.  To augment a batch, each image
draws ``depth`` ops in turn (Gumbel-softmax over the logits: soft for the search, hard
when training), each with a random sign and, under ``sampling="uniform"``, a random
strength u in [0, 1); an op is applied at ``sign * u * magnitude`` (``sign * magnitude``
under ``sampling="exact"``).  Geometric ops go through ``affine_grid`` /
``grid_sample`` and colour ops through blends, and the strength is reparameterised, so
the output is differentiable in the magnitudes and, through the relaxed weights, in the
logits.  Posterize, solarize and equalize are steps: their forward is the real op and
their backward a smooth stand-in (straight-through).  A policy's ops come from one space
(:data:`SPACES`): ``narrow`` (the first nine ops) or ``wide`` (TrivialAugmentWide's
fourteen at its ranges).

The meta-objective is the quiz cross-entropy of a model after one or more unrolled SGD
steps on augmented batches (``meta.metadistill``'s pilot steps); its gradient with
respect to the policy is :func:`policy_hypergrad`.  Pure torch: the search loop lives in ``pipelines``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from meta.functional import Params, cross_entropy, forward
from meta.metadistill import Pilot, unrolled_steps

# The op spaces: op -> largest magnitude it may take (degrees, fractions of the size, blend
# factors, bits removed, or the share of the range solarized).  "narrow" is the first
# space (the published tables use it); "wide" is TrivialAugmentWide's ops at its ranges
# (32 px of a 32 px image = 1.0 of the size; posterize 8 down to 2 bits; solarize the
# whole range), plus identity, so a search can learn how often to augment at all.
SPACES = {
    "narrow": {"rotate": 30.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 0.3, "translate_y": 0.3,
               "scale": 0.3, "brightness": 0.5, "contrast": 0.5, "sharpness": 0.9},
    "wide": {"identity": 1.0, "rotate": 135.0, "shear_x": 0.99, "shear_y": 0.99, "translate_x": 1.0,
             "translate_y": 1.0, "brightness": 0.99, "contrast": 0.99, "saturation": 0.99, "sharpness": 0.99,
             "posterize": 6.0, "solarize": 1.0, "autocontrast": 1.0, "equalize": 1.0},
}
OPS = tuple(SPACES["narrow"])
SAMPLINGS = ("exact", "uniform")
MAX_DEPTH = 3
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y", "scale")
BLENDS = ("brightness", "contrast", "saturation", "sharpness")
# Ops whose output ignores the magnitude's sign (posterize, solarize) or the magnitude
# altogether (identity, autocontrast, equalize).
UNSIGNED = ("identity", "posterize", "solarize", "autocontrast", "equalize")
# Ops that are not differentiable in the pixels or the magnitude: their forward is the
# real op, their backward a smooth stand-in (straight-through).
STRAIGHT_THROUGH = ("posterize", "solarize", "equalize")
_SOLARIZE_SOFTNESS = 0.05  # width (in [0, 1] pixels) of the sigmoid that stands in for solarize's step


class PolicyError(ValueError):
    """A policy (JSON) names an unknown op, or a magnitude outside its range."""


def _affine(name: str, v: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) theta of ``affine_grid`` for op ``name`` at signed magnitudes ``v`` (N,)."""
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    if name == "rotate":
        a = v * math.pi / 180
        rows = [[torch.cos(a), -torch.sin(a), zero], [torch.sin(a), torch.cos(a), zero]]
    elif name == "shear_x":
        rows = [[one, v, zero], [zero, one, zero]]
    elif name == "shear_y":
        rows = [[one, zero, zero], [v, one, zero]]
    elif name == "translate_x":  # by v of the width, rightwards; the grid maps output to input, spanning 2
        rows = [[one, zero, -2 * v], [zero, one, zero]]
    elif name == "translate_y":
        rows = [[one, zero, zero], [zero, one, -2 * v]]
    else:  # scale: v > 0 zooms in
        s = 1 / (1 + v)
        rows = [[s, zero, zero], [zero, s, zero]]
    return torch.stack([torch.stack(r, -1) for r in rows], 1)


def apply_op(name: str, pixels: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Op ``name`` on images in [0, 1] (N, C, H, W), at signed magnitudes ``v`` (N,); every
    op is the identity at ``v = 0`` (autocontrast and equalize, which have no magnitude,
    excepted)."""
    if name in GEOMETRIC:
        grid = F.affine_grid(_affine(name, v).to(pixels.dtype), list(pixels.shape), align_corners=False)
        return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if name in BLENDS:
        factor = (1 + v).view(-1, 1, 1, 1)
        degenerate = _degenerate(name, pixels)
        return (degenerate + factor * (pixels - degenerate)).clamp(0, 1)
    if name == "identity":
        return pixels
    if name == "autocontrast":  # each channel stretched to [0, 1] (a flat channel is left alone)
        lo, hi = pixels.amin(dim=(2, 3), keepdim=True), pixels.amax(dim=(2, 3), keepdim=True)
        flat = hi - lo < 1e-6
        return ((pixels - torch.where(flat, 0, lo)) / torch.where(flat, 1, hi - lo)).clamp(0, 1)
    strength = v.abs().view(-1, 1, 1, 1)
    if name == "solarize":
        # Pixels above 1 - |v| are inverted ("above", not PIL's "at or above", so v = 0 is the
        # identity); the gradient is that of a sigmoid step of width _SOLARIZE_SOFTNESS.
        threshold = 1 - strength
        hard = torch.where(pixels > threshold, 1 - pixels, pixels)
        soft = pixels + torch.sigmoid((pixels - threshold) / _SOLARIZE_SOFTNESS) * (1 - 2 * pixels)
        return hard.detach() + soft - soft.detach()
    if name == "posterize":
        # |v| bits of the 8-bit value dropped (fractional in the search); the gradient is that
        # of the mean loss of a drop, half a step, and the identity in the pixels.
        step = 2 ** strength
        quantized = torch.floor((pixels * 255).round() / step) * step / 255
        hard = torch.where(strength > 0, quantized, pixels)
        soft = pixels - (step - 1) / (2 * 255)
        return hard.detach() + soft - soft.detach()
    if name == "equalize":
        return _equalize(pixels.detach()) + pixels - pixels.detach()
    raise ValueError(f"unknown augmentation op {name!r}")


def _degenerate(name: str, pixels: torch.Tensor) -> torch.Tensor:
    """What a blend op moves the image away from (factor 0), as in PIL's ImageEnhance."""
    if name == "brightness":
        return torch.zeros_like(pixels)
    if name == "contrast":
        return pixels.mean(dim=(1, 2, 3), keepdim=True).expand_as(pixels)
    if name == "saturation":  # the ITU-R 601-2 luma grey of an RGB image; a grey image is its own
        if pixels.shape[1] != 3:
            return pixels
        grey = (pixels * pixels.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return grey.expand_as(pixels)
    # sharpness: a 3x3 smoothed copy (PIL's kernel)
    kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=pixels.dtype, device=pixels.device) / 13
    weight = kernel.expand(pixels.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), weight, groups=pixels.shape[1])


def _equalize(pixels: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation of each channel, on the image's 8-bit levels, batched."""
    n, c, h, w = pixels.shape
    levels = (pixels * 255).round().long().clamp(0, 255).view(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=pixels.device).scatter_add_(1, levels,
                                                                                       torch.ones_like(levels))
    cumulative = hist.cumsum(1)
    last = hist.gather(1, cumulative.argmax(1, keepdim=True))  # the count of the highest level present
    step = (h * w - last) // 255
    lut = ((cumulative - hist + step // 2) // step.clamp(min=1)).clamp(max=255)
    equalized = torch.where(step > 0, lut.gather(1, levels), levels)
    return (equalized.to(pixels.dtype) / 255).view(n, c, h, w)


class Noise(NamedTuple):
    """The randomness of one augmentation of N images, each (depth, N, ops): Gumbel noise of
    the op choice, signs in {-1, 1}, and strengths in [0, 1] (ones under ``exact``)."""

    gumbel: torch.Tensor
    signs: torch.Tensor
    strength: torch.Tensor


class AugmentPolicy(nn.Module):
    """Probabilities and magnitudes of the ops of a space (:data:`SPACES`; all of them or a
    subset), learned or loaded; ``depth`` ops per image, at exact or uniformly drawn
    magnitudes (``sampling``)."""

    def __init__(self, ops: tuple[str, ...] | list[str] = OPS, init_magnitude: float = 0.3, depth: int = 1,
                 sampling: str = "exact", space: str = "narrow"):
        super().__init__()
        if space not in SPACES:
            raise PolicyError(f"space: {space!r} is not one of {', '.join(SPACES)}")
        unknown = [op for op in ops if op not in SPACES[space]]
        if unknown:
            raise PolicyError(f"unknown augmentation op(s) {unknown} in the {space} space; allowed: "
                              f"{', '.join(SPACES[space])}")
        if sampling not in SAMPLINGS:
            raise PolicyError(f"sampling: {sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
            raise PolicyError(f"depth: {depth!r} is not an integer in [1, {MAX_DEPTH}]")
        self.ops, self.depth, self.sampling, self.space = tuple(ops), depth, sampling, space
        self.logits = nn.Parameter(torch.zeros(len(self.ops)))
        # magnitude = max * sigmoid(raw): bounded to (0, max) whatever the search does
        raw = math.log(init_magnitude / (1 - init_magnitude))
        self.raw_magnitude = nn.Parameter(torch.full((len(self.ops),), raw))

    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(0)

    def magnitudes(self) -> torch.Tensor:
        scale = torch.tensor([SPACES[self.space][op] for op in self.ops], device=self.raw_magnitude.device)
        return scale * torch.sigmoid(self.raw_magnitude)

    def forward(self, pixels: torch.Tensor, noise: Noise, tau: float = 1.0, hard: bool = False) -> torch.Tensor:
        """Augment ``pixels`` in [0, 1] by ``depth`` ops in turn: at each, the Gumbel noise
        picks each image's op, softly (a weighted mix of every op's output) or hard
        (straight-through), at its magnitude times the sign and strength of ``noise``."""
        magnitudes = self.magnitudes()
        for layer in range(self.depth):
            weights = _relaxed(self.logits, noise.gumbel[layer], tau, hard)
            v = noise.signs[layer] * noise.strength[layer] * magnitudes
            out = torch.zeros_like(pixels)
            for k, op in enumerate(self.ops):
                out = out + weights[:, k].view(-1, 1, 1, 1) * apply_op(op, pixels, v[:, k])
            pixels = out
        return pixels

    def to_json(self) -> dict:
        p, m = self.probabilities().tolist(), self.magnitudes().tolist()
        return {"version": 3, "space": self.space, "depth": self.depth, "sampling": self.sampling,
                "ops": [{"name": op, "probability": p[k], "magnitude": m[k]} for k, op in enumerate(self.ops)]}

    @classmethod
    def from_json(cls, spec: dict) -> AugmentPolicy:
        """The policy ``to_json`` wrote; a field out of range raises :class:`PolicyError` naming
        it.  Keys other than the policy's own (a ``base`` the caller applies) are left to the caller."""
        if not isinstance(spec, dict) or not isinstance(spec.get("ops"), list) or not spec["ops"]:
            raise PolicyError("an augmentation policy is {\"version\": 3, \"space\", \"ops\": [{\"name\", "
                              "\"probability\", \"magnitude\"}, ...]}")
        space = spec.get("space", "narrow")  # versions 1 and 2 knew one space
        if space not in SPACES:
            raise PolicyError(f"space: {space!r} is not one of {', '.join(SPACES)}")
        ranges = SPACES[space]
        names, probs, mags = [], [], []
        for i, entry in enumerate(spec["ops"]):
            name = entry.get("name") if isinstance(entry, dict) else None
            if name not in ranges:
                raise PolicyError(f"ops[{i}].name: unknown augmentation op {name!r} in the {space} space; "
                                  f"allowed: {', '.join(ranges)}")
            p, m = entry.get("probability"), entry.get("magnitude")
            if not isinstance(p, (int, float)) or not 0 < p <= 1:
                raise PolicyError(f"ops[{i}].probability ({name}): {p!r} is not in (0, 1]")
            if not isinstance(m, (int, float)) or not 0 < m < ranges[name]:
                raise PolicyError(f"ops[{i}].magnitude ({name}): {m!r} is not in (0, {ranges[name]})")
            names.append(name)
            probs.append(float(p))
            mags.append(float(m))
        if len(set(names)) != len(names):
            raise PolicyError(f"ops: an op appears twice in {names}")
        if abs(sum(probs) - 1) > 1e-3:
            raise PolicyError(f"ops[*].probability: the probabilities sum to {sum(probs):.6f}, not 1")
        # version 1 (no depth, no sampling) was one op per image at its exact magnitude
        policy = cls(names, depth=spec.get("depth", 1), sampling=spec.get("sampling", "exact"), space=space)
        with torch.no_grad():
            policy.logits.copy_(torch.log(torch.tensor(probs)))
            fraction = torch.tensor([m / ranges[n] for n, m in zip(names, mags)])
            policy.raw_magnitude.copy_(torch.log(fraction / (1 - fraction)))
        return policy


def _relaxed(logits: torch.Tensor, gumbel: torch.Tensor, tau: float, hard: bool) -> torch.Tensor:
    """Gumbel-softmax weights with given noise (so a seed fixes them)."""
    soft = ((logits + gumbel) / tau).softmax(-1)
    if not hard:
        return soft
    index = soft.argmax(-1, keepdim=True)
    return torch.zeros_like(soft).scatter_(-1, index, 1.0) - soft.detach() + soft


def draw_noise(policy: AugmentPolicy, n: int, generator: torch.Generator, device: torch.device,
               dtype: torch.dtype = torch.float32) -> Noise:
    """The noise of ``policy``'s augmentation of ``n`` images, from ``generator``."""
    shape = (policy.depth, n, len(policy.ops))
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    signs = torch.randint(0, 2, shape, generator=generator) * 2 - 1
    strength = torch.rand(shape, generator=generator) if policy.sampling == "uniform" else torch.ones(shape)
    return Noise(*(t.to(device=device, dtype=dtype) for t in (-torch.log(-torch.log(u)), signs, strength)))


def policy_hypergrad(model: nn.Module, params: Params, policy: AugmentPolicy, pixels: torch.Tensor,
                     y: torch.Tensor, quiz: tuple[torch.Tensor, torch.Tensor], noise: Noise, lr: float,
                     normalize=lambda t: t, tau: float = 1.0, steps: int = 1) -> tuple[dict[str, torch.Tensor], float]:
    """Gradient of the quiz cross-entropy after ``steps`` unrolled SGD steps (step size
    ``lr``) of ``model`` on the policy's augmentation of ``pixels``, with respect to the
    policy's logits and magnitudes; and that quiz loss.  The batch splits into ``steps``
    equal parts, a step each.  ``normalize`` maps [0, 1] pixels to the model's inputs."""
    if steps < 1 or len(y) % steps:
        raise ValueError(f"steps: a batch of {len(y)} does not split into {steps} equal steps")
    augmented = normalize(policy(pixels, noise, tau=tau))
    batches = list(zip(augmented.chunk(steps), y.chunk(steps)))
    after = unrolled_steps(model, params, cross_entropy, batches, Pilot(lr=lr))
    loss = F.cross_entropy(forward(model, after, quiz[0]), quiz[1])
    names = [k for k, _ in policy.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in policy.named_parameters()])
    return dict(zip(names, grads)), float(loss.detach())
