"""A plain convolutional network in stages, the architecture search's small family.

Stage ``i`` has ``depth`` blocks of conv(kernel) -> GroupNorm -> ReLU at ``widths[i]``
channels, then halves the resolution (max-pool) while it is at least 2; a global average
pool and a linear head end it.  GroupNorm, as in the ResNets here, keeps it free of running
statistics (it runs under ``functional_call`` on the meta path too).
"""

from __future__ import annotations

import torch
from torch import nn


class CNN(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, widths: tuple[int, ...] = (16, 32),
                 depth: int = 1, kernel: int = 3):
        super().__init__()
        if not widths or min(widths) < 1 or depth < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"cnn needs widths >= 1, depth >= 1 and an odd kernel; got widths={list(widths)}, "
                             f"depth={depth}, kernel={kernel}")
        layers: list[nn.Module] = []
        cin, size = input_shape[0], min(input_shape[1:])
        for width in widths:
            for _ in range(depth):
                layers += [nn.Conv2d(cin, width, kernel, padding=kernel // 2, bias=False),
                           nn.GroupNorm(min(8, width), width), nn.ReLU()]
                cin = width
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))
