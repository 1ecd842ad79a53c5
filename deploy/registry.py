"""Registered students: resolve ``name@alias``, fetch weights, rebuild the model.

Only ``spec.json`` (JSON) and ``model.safetensors`` (tensors) are ever read: nothing is
unpickled, so an artifact crafted to run code on load is refused, not executed.  Registry
access goes through ``pipelines.tracking``, the one module that imports MLflow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from torch import nn

from models.normalize import Normalized
from models.weights import load_weights


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: nn.Module  # takes raw [0, 1] pixels (normalisation inside)
    spec: dict
    name: str
    version: str
    alias: str
    run_id: str
    tags: dict

    @property
    def metadata(self) -> dict:
        return {"model": self.name, "version": self.version, "alias": self.alias, "run_id": self.run_id,
                "method": self.tags.get("method"), "test_metrics": {"test_acc": _float(self.tags.get("test_acc"))},
                "input_shape": self.spec["input_shape"], "class_names": self.spec["class_names"],
                "input": "float pixels in [0, 1], shape [batch, C, H, W] (or [batch, H, W] for one channel)",
                "input_range": [0.0, 1.0]}


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def load_folder(folder: Path) -> tuple[nn.Module, dict]:
    """The model in ``folder`` (``spec.json`` + ``model.safetensors``), wrapped so that it
    takes raw [0, 1] pixels; anything else is refused with ModelLoadError."""
    folder = Path(folder)
    if not (folder / "spec.json").is_file() or not (folder / "model.safetensors").is_file():
        present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        raise ModelLoadError(f"{folder}: expected spec.json and model.safetensors, found {present}; "
                             f"other formats (pickles, .pt files) are refused")
    try:
        model, spec = load_weights(folder)
    except (SafetensorError, json.JSONDecodeError, KeyError, RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"{folder / 'model.safetensors'}: not a valid safetensors model for its spec "
                             f"({exc}); refused") from exc
    return Normalized(model, spec["mean"], spec["std"]).eval(), spec


def load_registered(name: str, alias: str = "champion") -> LoadedModel:
    from pipelines import tracking

    version = tracking.model_version_by_alias(name, alias)
    if version is None:
        raise ModelLoadError(f"no version of registered model {name!r} has alias {alias!r}")
    run_id = version["tags"].get("source_run_id") or version["run_id"]
    folder = tracking.download_artifacts(run_id, "weights")
    model, spec = load_folder(folder)
    return LoadedModel(model, spec, name, version["version"], alias, run_id, version["tags"])
