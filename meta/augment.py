"""A learned augmentation policy: differentiable image ops, their probabilities and
magnitudes, and the hypergradient that tunes them (in the style of DADA and MADAO).

The policy holds a logit and a bounded magnitude per op.  To augment a batch, each image
draws ``depth`` ops in turn (Gumbel-softmax over the logits: soft for the search, hard
when training), each with a random sign and, under ``sampling="uniform"``, a random
strength u in [0, 1); an op is applied at ``sign * u * magnitude`` (``sign * magnitude``
under ``sampling="exact"``).  Geometric ops go through ``affine_grid`` /
``grid_sample`` and colour ops through blends, and the strength is reparameterised, so
the output is differentiable in the magnitudes and, through the relaxed weights, in the
logits.

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

# op -> largest magnitude it may take (degrees, fractions of the size, or blend factors)
MAX_MAGNITUDE = {"rotate": 30.0, "shear_x": 0.3, "shear_y": 0.3, "translate_x": 0.3, "translate_y": 0.3,
                 "scale": 0.3, "brightness": 0.5, "contrast": 0.5, "sharpness": 0.9}
OPS = tuple(MAX_MAGNITUDE)
SAMPLINGS = ("exact", "uniform")
MAX_DEPTH = 3
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y", "scale")


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
    """Op ``name`` on images in [0, 1] (N, C, H, W), at signed magnitudes ``v`` (N,)."""
    if name in GEOMETRIC:
        grid = F.affine_grid(_affine(name, v).to(pixels.dtype), list(pixels.shape), align_corners=False)
        return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    factor = (1 + v).view(-1, 1, 1, 1)
    if name == "brightness":
        degenerate = torch.zeros_like(pixels)
    elif name == "contrast":
        degenerate = pixels.mean(dim=(1, 2, 3), keepdim=True).expand_as(pixels)
    else:  # sharpness: blend with a 3x3 smoothed copy (PIL's kernel)
        kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=pixels.dtype, device=pixels.device) / 13
        weight = kernel.expand(pixels.shape[1], 1, 3, 3)
        degenerate = F.conv2d(F.pad(pixels, (1, 1, 1, 1), mode="replicate"), weight, groups=pixels.shape[1])
    return (degenerate + factor * (pixels - degenerate)).clamp(0, 1)


class Noise(NamedTuple):
    """The randomness of one augmentation of N images, each (depth, N, ops): Gumbel noise of
    the op choice, signs in {-1, 1}, and strengths in [0, 1] (ones under ``exact``)."""

    gumbel: torch.Tensor
    signs: torch.Tensor
    strength: torch.Tensor


class AugmentPolicy(nn.Module):
    """Probabilities and magnitudes of :data:`OPS` (or a subset), learned or loaded;
    ``depth`` ops per image, at exact or uniformly drawn magnitudes (``sampling``)."""

    def __init__(self, ops: tuple[str, ...] | list[str] = OPS, init_magnitude: float = 0.3, depth: int = 1,
                 sampling: str = "exact"):
        super().__init__()
        unknown = [op for op in ops if op not in MAX_MAGNITUDE]
        if unknown:
            raise PolicyError(f"unknown augmentation op(s) {unknown}; allowed: {', '.join(OPS)}")
        if sampling not in SAMPLINGS:
            raise PolicyError(f"sampling: {sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
            raise PolicyError(f"depth: {depth!r} is not an integer in [1, {MAX_DEPTH}]")
        self.ops, self.depth, self.sampling = tuple(ops), depth, sampling
        self.logits = nn.Parameter(torch.zeros(len(self.ops)))
        # magnitude = max * sigmoid(raw): bounded to (0, max) whatever the search does
        raw = math.log(init_magnitude / (1 - init_magnitude))
        self.raw_magnitude = nn.Parameter(torch.full((len(self.ops),), raw))

    def probabilities(self) -> torch.Tensor:
        return self.logits.softmax(0)

    def magnitudes(self) -> torch.Tensor:
        scale = torch.tensor([MAX_MAGNITUDE[op] for op in self.ops], device=self.raw_magnitude.device)
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
        return {"version": 2, "depth": self.depth, "sampling": self.sampling,
                "ops": [{"name": op, "probability": p[k], "magnitude": m[k]} for k, op in enumerate(self.ops)]}

    @classmethod
    def from_json(cls, spec: dict) -> AugmentPolicy:
        """The policy ``to_json`` wrote; a field out of range raises :class:`PolicyError` naming it."""
        if not isinstance(spec, dict) or not isinstance(spec.get("ops"), list) or not spec["ops"]:
            raise PolicyError("an augmentation policy is {\"version\": 1, \"ops\": [{\"name\", \"probability\", "
                              "\"magnitude\"}, ...]}")
        names, probs, mags = [], [], []
        for i, entry in enumerate(spec["ops"]):
            name = entry.get("name") if isinstance(entry, dict) else None
            if name not in MAX_MAGNITUDE:
                raise PolicyError(f"ops[{i}].name: unknown augmentation op {name!r}; allowed: {', '.join(OPS)}")
            p, m = entry.get("probability"), entry.get("magnitude")
            if not isinstance(p, (int, float)) or not 0 < p <= 1:
                raise PolicyError(f"ops[{i}].probability ({name}): {p!r} is not in (0, 1]")
            if not isinstance(m, (int, float)) or not 0 < m < MAX_MAGNITUDE[name]:
                raise PolicyError(f"ops[{i}].magnitude ({name}): {m!r} is not in (0, {MAX_MAGNITUDE[name]})")
            names.append(name)
            probs.append(float(p))
            mags.append(float(m))
        if len(set(names)) != len(names):
            raise PolicyError(f"ops: an op appears twice in {names}")
        if abs(sum(probs) - 1) > 1e-3:
            raise PolicyError(f"ops[*].probability: the probabilities sum to {sum(probs):.6f}, not 1")
        # version 1 (no depth, no sampling) was one op per image at its exact magnitude
        policy = cls(names, depth=spec.get("depth", 1), sampling=spec.get("sampling", "exact"))
        with torch.no_grad():
            policy.logits.copy_(torch.log(torch.tensor(probs)))
            fraction = torch.tensor([m / MAX_MAGNITUDE[n] for n, m in zip(names, mags)])
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
