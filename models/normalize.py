"""Input normalisation: baked into a deployable model (raw [0, 1] pixels in, logits out), and
adapted between the data and a network made for other inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Normalized(nn.Module):
    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


class Adapted(nn.Module):
    """A network fed the size, channels and normalisation it was made for.

    Takes inputs normalised with the *data's* statistics (what the pipeline's splits hold),
    undoes that, repeats a grey channel to RGB where the network wants three, resizes to
    its resolution and normalises with *its* statistics.  The pipeline keeps one copy of
    the data; a 224x224 teacher and a 32x32 student share a run.  The buffers are not
    persistent: the state dict is the network's, under ``model.``."""

    def __init__(self, model: nn.Module, data_mean: list[float], data_std: list[float],
                 input_shape: tuple[int, int, int], mean: list[float], std: list[float]):
        super().__init__()
        self.model, self.input_shape = model, tuple(input_shape)
        for name, values in (("data_mean", data_mean), ("data_std", data_std), ("mean", mean), ("std", std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.data_std + self.data_mean
        channels, height, width = self.input_shape
        if x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)  # grey -> RGB; the other way is refused earlier
        if x.shape[-2:] != (height, width):
            x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                              antialias=height < x.shape[-2])
        return self.model((x - self.mean) / self.std)


def adapt_input(model: nn.Module, spec: dict, data_shape: tuple[int, ...], data_mean: list[float],
                data_std: list[float]) -> nn.Module:
    """``model`` (built from ``spec``) fed from data of ``data_shape``/mean/std: itself when
    they match the spec, else wrapped in :class:`Adapted`."""
    same = (tuple(spec["input_shape"]) == tuple(data_shape) and list(spec["mean"]) == list(data_mean)
            and list(spec["std"]) == list(data_std))
    if same:
        return model
    if spec["input_shape"][0] < data_shape[0]:
        raise ValueError(f"the network takes {spec['input_shape'][0]}-channel images; the data has {data_shape[0]}")
    return Adapted(model, data_mean, data_std, tuple(spec["input_shape"]), spec["mean"], spec["std"])


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside an :class:`Adapted` wrapper (what is saved with its spec)."""
    return model.model if isinstance(model, Adapted) else model
