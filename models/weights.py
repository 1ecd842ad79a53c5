"""Models on disk: ``model.safetensors`` plus a ``spec.json`` naming the architecture,
written atomically, read without unpickling anything.  Shared by the pipeline (teacher
cache, registration) and ``deploy`` (serving)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.registry import build_model


def saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``model.safetensors`` holds: the state dict, contiguous, on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, folder: Path, spec: dict) -> None:
    """Write ``model.safetensors`` and ``spec.json`` into ``folder`` atomically (temp + rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    save_file(saved_state(model), str(tmp / "model.safetensors"))
    (tmp / "spec.json").write_text(json.dumps(spec, indent=2))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_weights(folder: Path) -> tuple[nn.Module, dict]:
    """Rebuild the architecture named in ``spec.json`` and load its safetensors weights."""
    folder = Path(folder)
    spec = json.loads((folder / "spec.json").read_text())
    model = build_model(spec["arch"], tuple(spec["input_shape"]), spec["num_classes"], **spec.get("kwargs", {}))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval(), spec
