"""Where weights come from (``teacher.source``, ``student.init``, ``fewshot.init``) and the
checks they share.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from pipelines.config.errors import Strict

TeacherSource = Literal["train", "registry", "file", "torchvision", "timm"]
InitSource = Literal["scratch", "file", "registry", "torchvision", "timm"]


# models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest
REGISTRY_URI = re.compile(r"^models:/([A-Za-z0-9_.\-]+)(?:@([A-Za-z0-9_\-]+)|/([0-9]+|latest))$")


def library_prefix(data: Any, source_key: str, model_key: str = "model") -> Any:
    """``source=torchvision`` with ``model.arch=resnet18`` means ``torchvision:resnet18``."""
    if isinstance(data, dict) and data.get(source_key) in ("torchvision", "timm"):
        model = data.get(model_key)
        if isinstance(model, dict) and isinstance(model.get("arch"), str) and ":" not in model["arch"]:
            data = {**data, model_key: {**model, "arch": f"{data[source_key]}:{model['arch']}"}}
    return data


def check_source(prefix: str, source: str, location: str | None, location_key: str, arch: str) -> None:
    """Cross-field checks of a weights source (teacher, student init, few-shot init)."""
    if source in ("train", "scratch"):
        if location is not None:
            raise ValueError(f"{location_key} is set but {prefix} source is {source!r}; "
                             f"choose registry, file, torchvision or timm")
        return
    if location is None:
        what = {"registry": "models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest",
                "file": "a safetensors file or folder with its spec.json",
                "torchvision": "a local .safetensors/.pth weights file, or the library's named weights (DEFAULT)",
                "timm": "a local .safetensors/.pth weights file, or 'pretrained' (needs internet)"}[source]
        raise ValueError(f"{prefix} source {source!r} needs {location_key}: {what}")
    if source == "registry" and not REGISTRY_URI.match(location):
        raise ValueError(f"{location_key}={location!r} is not a registry URI; use models:/NAME@ALIAS, "
                         f"models:/NAME/VERSION or models:/NAME/latest")
    if source in ("torchvision", "timm") and not arch.startswith(f"{source}:"):
        raise ValueError(f"{prefix} source {source!r} builds a {source} architecture, but the model is {arch!r}")


class FromSource(Strict):
    """A section whose network may come from another library: ``SOURCE=torchvision`` with
    ``model.arch=resnet18`` means ``torchvision:resnet18`` (``SOURCE`` is ``source_field``)."""

    source_field: ClassVar[str] = "init"

    @model_validator(mode="before")
    @classmethod
    def _library_prefix(cls, data: Any) -> Any:
        return library_prefix(data, cls.source_field)
