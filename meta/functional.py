"""Functional parameter dicts: the currency of every meta-learning algorithm here.

A model's parameters travel as ``{name: tensor}`` and the model runs with
``torch.func.functional_call``; nothing mutates the module, so an adapted copy costs
one dict and the graph back to the initial parameters stays intact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def params_of(model: nn.Module, detach: bool = False) -> Params:
    return {k: (v.detach() if detach else v) for k, v in model.named_parameters()}


def forward(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    return functional_call(model, params, (x,))


def sgd_step(params: Params, grads: Params | tuple, lr: float | Params) -> Params:
    """``p - lr * g``; ``lr`` is a float or a per-parameter dict (Meta-SGD)."""
    if not isinstance(grads, dict):
        grads = dict(zip(params, grads))
    if isinstance(lr, dict):
        return {k: p - lr[k] * grads[k] for k, p in params.items()}
    return {k: p - lr * grads[k] for k, p in params.items()}


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)
