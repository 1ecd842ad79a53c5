"""torch's global generator is one per process.  Code that seeds it and draws from it
(building a seeded network, torchvision's per-image transforms) holds this lock, so
students trained concurrently in threads draw exactly what they would draw alone."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_LOCK = threading.RLock()


@contextlib.contextmanager
def global_rng(seed: int | None = None, state: torch.Tensor | None = None) -> Iterator[None]:
    """Hold the global generator, seeded with ``seed`` or set to ``state`` when given."""
    with _LOCK:
        if seed is not None:
            torch.manual_seed(seed)
        if state is not None:
            torch.set_rng_state(state)
        yield


def held_out_generator(seed: int) -> torch.Generator:
    """The generator of a student's held-out draws (the quiz batches of learning to teach):
    seeded apart from the data order's, which ``seed`` itself seeds."""
    return torch.Generator().manual_seed(10_000 + seed)


def judge_generator(seed: int) -> torch.Generator:
    """The generator of a student's split of the held-out images into the part that steers
    learning to teach and the part kept to judge it (``meta_distill.judge_fraction``)."""
    return torch.Generator().manual_seed(20_000 + seed)
