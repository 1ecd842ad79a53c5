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

from models.cost import Cost, from_flat
from models.normalize import Normalized
from models.quantize import quantize_int8
from models.registry import count_parameters
from models.weights import load_weights

VARIANTS = ("float", "int8")
INT8_LAYERS = "nn.Linear layers as int8 (dynamic quantization, activations quantized per batch); convolutions stay float"


class ModelLoadError(RuntimeError):
    pass


class VariantUnavailable(ModelLoadError):
    """A variant this version cannot be served as (no kept int8), or not on this device."""


@dataclass
class LoadedModel:
    model: nn.Module  # takes raw [0, 1] pixels (normalisation inside)
    spec: dict
    name: str
    version: str
    alias: str
    run_id: str
    tags: dict
    cost: Cost | None = None  # the cost card (registered_cost)
    variant: str = "float"  # or "int8": rebuilt from the float weights by models.quantize.quantize_int8

    @property
    def metadata(self) -> dict:
        return {**variant_metadata(self.variant, self.tags),
                "model": self.name, "version": self.version, "alias": self.alias, "run_id": self.run_id,
                "method": self.tags.get("method"), "test_metrics": {"test_acc": _float(self.tags.get("test_acc"))},
                "arch": self.spec["arch"], "kwargs": self.spec.get("kwargs", {}), "cost": self.cost,
                "input_shape": self.spec["input_shape"], "class_names": self.spec["class_names"],
                "input": "float pixels in [0, 1], shape [batch, C, H, W] (or [batch, H, W] for one channel)",
                "input_range": [0.0, 1.0]}


def variant_metadata(variant: str, tags: dict) -> dict:
    """Which variant is served, which ones the version offers, and the int8 one's test accuracy."""
    offered = ["float", "int8"] if tags.get("int8.kept") == "true" else ["float"]
    meta = {"variant": variant, "variants": offered}
    if "int8" in offered:
        meta["int8"] = {"test_acc": _float(tags.get("int8.test_acc")), "quantized": INT8_LAYERS}
    return meta


def int8_refusal(name: str, version: str, tags: dict) -> str | None:
    """Why ``name`` v``version`` has no int8 variant to serve (None: it has one)."""
    if tags.get("int8.kept") == "true":
        return None
    if "int8.kept" not in tags:
        return (f"{name} v{version} predates int8 variants (no int8.kept tag): register a new version with "
                f"`metadistill run` (tracking.int8_max_drop set, 0.005 by default), or use --variant float")
    return (f"{name} v{version} kept no int8 variant ({tags.get('int8.reason', 'no reason recorded')}): use "
            f"--variant float (tracking.int8_max_drop sets how much accuracy the next run's variant may lose)")


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


def load_registered(name: str, alias: str = "champion", variant: str = "float") -> LoadedModel:
    """``name@alias`` as ``variant``: the float weights, or (``int8``) the model quantized from
    them, refused with :class:`VariantUnavailable` unless the pipeline kept its int8 variant."""
    from pipelines import tracking

    if variant not in VARIANTS:
        raise VariantUnavailable(f"unknown variant {variant!r}; allowed: {', '.join(VARIANTS)}")
    version = tracking.model_version_by_alias(name, alias)
    if version is None:
        raise ModelLoadError(f"no version of registered model {name!r} has alias {alias!r}")
    if variant == "int8" and (why := int8_refusal(name, version["version"], version["tags"])) is not None:
        raise VariantUnavailable(why)
    run_id = version["tags"].get("source_run_id") or version["run_id"]
    folder = tracking.download_artifacts(run_id, "weights")
    model, spec = load_folder(folder)
    cost = registered_cost(version["tags"], model, folder)  # the float model's, as registered
    if variant == "int8":
        model = quantize_int8(model)
        tags = version["tags"]  # its own card, where the run measured it (int8.cost.*)
        cost = from_flat({k.removeprefix("int8."): v for k, v in tags.items() if k.startswith("int8.cost.")}) or cost
    return LoadedModel(model, spec, name, version["version"], alias, run_id, version["tags"], cost, variant)


def registered_cost(tags: dict, model: nn.Module, folder: Path) -> Cost:
    """The version's cost card from its tags (measured when it was registered); for a version
    registered before those tags, what the loaded model says (parameters, file size) and
    None for what only a measurement says (MACs, latency)."""
    return from_flat(tags) or {"parameters": count_parameters(model), "macs": None,
                               "size_bytes": (Path(folder) / "model.safetensors").stat().st_size,
                               "latency_b1": None, "latency_b64": None}
