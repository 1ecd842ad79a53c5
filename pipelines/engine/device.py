"""Devices: where a model lives, copying batches to it without blocking, inference batch
sizes, and the CUDA precision modes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn


def device_of(model: nn.Module, default: torch.device | None = None) -> torch.device:
    """Where ``model``'s weights live (``default``, else the CPU, when it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return default or torch.device("cpu")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor bound for CUDA goes through pinned memory, so the
    copy does not block the host."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def rows(t: torch.Tensor, idx: torch.Tensor, device: torch.device,
         idx_there: torch.Tensor | None = None) -> torch.Tensor:
    """``t[idx]`` on ``device``: indexed there when ``t`` lives there (by ``idx_there``,
    ``idx`` already copied, when given), else gathered on the host and copied."""
    if t.device == device:
        return t[idx_there if idx_there is not None else to_device(idx, device)]
    return to_device(t[idx], device)


def inference_batch(x) -> int:
    """Rows per forward pass when only scoring ``x``: 1024 images of 3x32x32, fewer of
    larger images, so the activations of a pass stay the same size at any resolution."""
    per_image = math.prod(x.shape[1:])
    return max(8, min(1024, 1024 * 3 * 32 * 32 // per_image))


def in_batches(x, size: int, device: torch.device) -> Iterator[torch.Tensor]:
    """``x``'s rows in order, ``size`` at a time, on ``device``; a stream split's are
    decoded ahead by its DataLoader workers."""
    if hasattr(x, "chunks"):
        yield from x.chunks(size, device)
        return
    for i in range(0, len(x), size):
        yield to_device(x[i:i + size], device)


def part_of(x, part: slice):
    """Rows ``part`` (a slice or an index tensor) of ``x``; a stream split stays lazy."""
    return x.subset(part) if hasattr(x, "subset") else x[part]


@contextlib.contextmanager
def precision(device: torch.device, mode: str) -> Iterator[None]:
    """``train.precision``'s math mode on CUDA: TensorFloat-32 matmuls and convolutions for
    tf32 and bf16.  The CPU always computes in float32."""
    if device.type != "cuda" or mode == "fp32":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for the forward pass and the loss on CUDA under ``train.precision=bf16``.
    Backward, gradient clipping and the optimizer step stay outside it: under autocast the
    gradient norm of clipping can overflow, and clipping by an infinite norm zeroes the step."""
    if device.type == "cuda" and mode == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
