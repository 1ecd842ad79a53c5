"""Small helpers shared by the tests."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable

import numpy as np
import torch


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, alive: Callable[[], bool] = lambda: True, why: Callable[[], str] = str) -> None:
    """Poll ``url`` until it answers; fail early with ``why()`` if ``alive()`` turns false."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            assert alive(), why()
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")
