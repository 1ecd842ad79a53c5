"""Architectures from torchvision and timm, addressed as ``torchvision:NAME`` / ``timm:NAME``,
and the two operations a network brought from elsewhere needs: a new classification head
for this data set's classes, and the count of classes its weights were made for.

Pure torch: the libraries build the modules; nothing here knows about files or registries.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

LIBRARIES = ("torchvision", "timm")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def split_name(name: str) -> tuple[str, str] | None:
    """``("torchvision", "resnet18")`` for ``torchvision:resnet18``; None for our own names."""
    library, sep, arch = name.partition(":")
    return (library, arch) if sep and library in LIBRARIES else None


def timm_installed() -> bool:
    return importlib.util.find_spec("timm") is not None


def torchvision_names() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)  # classification models only


def is_external(name: str) -> bool:
    parts = split_name(name)
    if parts is None:
        return False
    library, arch = parts
    if library == "torchvision":
        return arch in torchvision_names()
    if not timm_installed():
        return False
    import timm

    return timm.is_model(arch)


def unknown_external_message(name: str) -> str:
    library, arch = split_name(name) or ("", name)
    if library == "timm" and not timm_installed():
        return f"{name}: timm is not installed (pip install 'metadistill[timm]')"
    if library == "torchvision":
        close = [n for n in torchvision_names() if n.startswith(arch[:4])][:8]
        return f"unknown torchvision classification model {arch!r}" + (f"; similar: {', '.join(close)}" if close else "")
    return f"unknown timm model {arch!r} (timm.list_models() lists them)"


def build_external(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """A randomly initialised ``torchvision:``/``timm:`` network; torchvision's take RGB only."""
    library, arch = split_name(name)
    if library == "torchvision":
        if input_shape[0] != 3:
            raise ValueError(f"{name} takes 3-channel images; these have {input_shape[0]}")
        import torchvision

        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=input_shape[0], **kwargs)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classification head to replace")
    return linears[-1]


def features_before_head(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``model``'s classification head (its last linear layer) receives for ``x``:
    the penultimate features, whatever wraps the network."""
    _, head = last_linear(model)
    seen: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[-1]


def head_classes(state: dict[str, torch.Tensor], model: nn.Module) -> int:
    """Classes of ``state``'s head: the out-features of ``model``'s last linear layer there."""
    name, _ = last_linear(model)
    key = f"{name}.weight"
    if key not in state:
        raise KeyError(f"the weights have no {key!r} (the head of {type(model).__name__})")
    return int(state[key].shape[0])


def head_parameter_names(model: nn.Module) -> list[str]:
    """The parameters of the classification head (the last linear layer)."""
    name, head = last_linear(model)
    return [f"{name}.{p}" for p, _ in head.named_parameters()]


def replace_head(model: nn.Module, num_classes: int) -> list[str]:
    """Swap the last linear layer for a fresh one with ``num_classes`` outputs; returns the
    new head's parameter names (what a head-only fine-tune trains)."""
    name, old = last_linear(model)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    return [f"{name}.{p}" for p, _ in new.named_parameters()]
