"""Small helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipelines.common.net import free_port, wait_http

__all__ = ["free_port", "wait_http", "worst_relative_error"]


def worst_relative_error(analytic: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                         loss_at: Callable[[dict[str, torch.Tensor]], float], eps: float = 1e-6) -> float:
    """Largest per-tensor relative error of ``analytic`` against central finite differences
    of ``loss_at`` around ``base``."""
    worst = 0.0
    for name, tensor in base.items():
        numeric = torch.zeros_like(tensor)
        for idx in np.ndindex(*tensor.shape):
            plus = {k: v.clone() for k, v in base.items()}
            minus = {k: v.clone() for k, v in base.items()}
            plus[name][idx] += eps
            minus[name][idx] -= eps
            numeric[idx] = (loss_at(plus) - loss_at(minus)) / (2 * eps)
        worst = max(worst, ((analytic[name] - numeric).norm() / numeric.norm().clamp(min=1e-12)).item())
    return worst
