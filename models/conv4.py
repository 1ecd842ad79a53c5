"""The standard four-block few-shot network (Vinyals et al. 2016; Finn et al. 2017).

Each block is conv3x3 -> norm -> ReLU -> maxpool2.  The norm is GroupNorm with one
group per channel by default (per-sample statistics, no running buffers), which keeps
the network exact under ``functional_call`` and ``vmap`` on the meta path.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if norm == "group":
        layers.append(nn.GroupNorm(cout, cout))
    elif norm != "none":
        raise ValueError(f"conv4 norm must be 'group' or 'none', got {norm!r}")
    layers += [nn.ReLU(), nn.MaxPool2d(2, ceil_mode=False)]
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 channels: int = 64, norm: str = "group"):
        super().__init__()
        cin, h, w = input_shape
        self.features = nn.Sequential(*[_block(cin if i == 0 else channels, channels, norm)
                                        for i in range(4)])
        for _ in range(4):
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"conv4 needs inputs of at least 16x16, got {input_shape}")
        self.head = nn.Linear(channels * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))
