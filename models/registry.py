"""Name -> factory registry for every architecture."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from models.cnn import CNN
from models.conv4 import Conv4
from models.external import build_external, is_external, split_name
from models.mlp import MLP
from models.resnet import CifarResNet, WideResNet

Factory = Callable[..., nn.Module]

RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)


def _mlp(input_shape, num_classes, hidden=(256, 256), **kw):
    return MLP(input_shape, num_classes, hidden=tuple(hidden), **kw)


def _cnn(input_shape, num_classes, widths=(16, 32), **kw):
    return CNN(input_shape, num_classes, widths=tuple(widths), **kw)


def _conv4(input_shape, num_classes, **kw):
    return Conv4(input_shape, num_classes, **kw)


def _resnet(depth: int) -> Factory:
    def factory(input_shape, num_classes, **kw):
        return CifarResNet(input_shape, num_classes, depth=depth, **kw)

    return factory


def _wrn(input_shape, num_classes, depth=16, widen=4, **kw):
    return WideResNet(input_shape, num_classes, depth=depth, widen=widen, **kw)


_FACTORIES: dict[str, Factory] = {
    "mlp": _mlp,
    "cnn": _cnn,
    "conv4": _conv4,
    "wrn": _wrn,
    **{f"resnet{d}": _resnet(d) for d in RESNET_DEPTHS},
}
MODEL_NAMES: tuple[str, ...] = tuple(_FACTORIES) + ("wrn-D-W", "torchvision:NAME", "timm:NAME")
_WRN_NAME = re.compile(r"^wrn-(\d+)-(\d+)$")


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build architecture ``name`` for inputs of ``input_shape`` (C, H, W) and ``num_classes``.

    ``wrn-16-4`` style names fix depth and width of a wide ResNet; ``torchvision:NAME`` and
    ``timm:NAME`` come from those libraries (randomly initialised).
    """
    if split_name(name) is not None:
        return build_external(name, tuple(input_shape), num_classes, **kwargs)
    match = _WRN_NAME.match(name)
    if match:
        depth, widen = int(match.group(1)), int(match.group(2))
        return WideResNet(tuple(input_shape), num_classes, depth=depth, widen=widen, **kwargs)
    if name not in _FACTORIES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")
    return _FACTORIES[name](tuple(input_shape), num_classes, **kwargs)


def is_known_model(name: str) -> bool:
    return name in _FACTORIES or bool(_WRN_NAME.match(name)) or is_external(name)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
