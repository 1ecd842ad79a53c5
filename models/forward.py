"""The served forward pass, one for the server and for the cost card's latency: float32
pixels in [0, 1] as a numpy array in, float32 logits as a numpy array out."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn


def forward(model: nn.Module, pixels: np.ndarray) -> np.ndarray:
    """``model``'s logits for ``pixels`` (``[batch, C, H, W]`` float32), under inference mode on
    the model's device; what ``deploy/serve.py`` runs for each micro-batch."""
    # An int8 model has no parameters (its weights are packed); its buffers say where it is.
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    with torch.inference_mode():
        return model(torch.from_numpy(pixels).to(device)).float().cpu().numpy()
