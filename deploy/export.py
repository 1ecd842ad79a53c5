"""Export a registered student for other serving stacks: TorchScript or ONNX.

The exported graph includes input normalisation: it takes raw [0, 1] pixels.  What a caller
needs to feed it (class names, input shape and range, the normalisation inside) goes with the
file: into the ONNX model's ``metadata_props`` (each value a JSON text), into the TorchScript
archive as ``extra/metadistill.json``, and as ``<file>.json`` beside either."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deploy.registry import LoadedModel
from models.quantize import torchscript_bytes

FORMATS = ("torchscript", "onnx")
ONNX_PACKAGES = ("onnx", "onnxscript")
ONNX_PIP = "pip install 'onnx>=1.16' 'onnxscript>=0.1'"
EXTRA_FILE = "metadistill.json"  # the TorchScript archive's extra file


class ExportError(RuntimeError):
    """An export that cannot be written on this install (a package it needs is missing)."""


def check_format(fmt: str, variant: str = "float") -> None:
    """Refuse an unknown format, ONNX of the int8 variant, or ONNX where ``onnx``/``onnxscript``
    do not import (they are in the base install: a broken or older one), before any model is loaded."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if fmt == "onnx" and variant == "int8":
        # torch.export (under torch.onnx's dynamo exporter) cannot trace the packed int8 weights of
        # dynamically quantized layers; ONNX Runtime quantizes a float ONNX file itself.
        raise ExportError("--format onnx --variant int8: a dynamically quantized torch model does not export to "
                          "ONNX; use --format torchscript --variant int8, or export the float model to ONNX and "
                          "quantize that file with onnxruntime.quantization.quantize_dynamic")
    if fmt != "onnx":
        return
    for package in ONNX_PACKAGES:
        try:
            __import__(package)
        except ImportError as exc:
            missing = exc.name or package
            raise ExportError(f"--format onnx needs the Python package {missing!r}, which does not import here "
                              f"({exc}): {ONNX_PIP} (or reinstall metadistill: pip install -e .); "
                              f"--format torchscript needs nothing more") from exc


def export_metadata(loaded: LoadedModel) -> dict:
    """What the exported file takes and returns, and where it came from."""
    spec = loaded.spec
    return {**loaded.metadata,
            "input": f"float32 pixels in [0, 1], shape [batch, {', '.join(str(d) for d in spec['input_shape'])}]",
            "input_name": "pixels",
            "output": "logits [batch, classes] in class_names order (softmax gives probabilities)",
            "output_name": "logits",
            "normalisation": {"mean": list(spec["mean"]), "std": list(spec["std"]),
                              "applied": "inside the graph: (pixels - mean) / std per channel; feed raw [0, 1] pixels"}}


def metadata_path(out: Path) -> Path:
    """The JSON written beside an exported file: ``student.onnx`` -> ``student.onnx.json``."""
    out = Path(out)
    return out.with_name(out.name + ".json")


def export(loaded: LoadedModel, fmt: str, out: Path) -> Path:
    check_format(fmt, loaded.variant)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = export_metadata(loaded)
    example = torch.rand(2, *loaded.spec["input_shape"])
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "torchscript":
        tmp.write_bytes(torchscript_bytes(loaded.model, example, {EXTRA_FILE: json.dumps(meta)}))
    else:
        import onnx

        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(loaded.model, (example,), str(tmp), input_names=["pixels"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False)
        model = onnx.load(str(tmp))
        props = {prop.key: prop.value for prop in model.metadata_props}  # keep what the exporter wrote
        onnx.helper.set_model_props(model, {**props, **{key: json.dumps(value) for key, value in meta.items()}})
        model.doc_string = (f"{loaded.name} v{loaded.version}: float32 pixels in [0, 1] -> logits over "
                            f"{len(loaded.spec['class_names'])} classes; normalisation inside (metadata_props)")
        onnx.save(model, str(tmp))
    side = metadata_path(out)
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(json.dumps({"format": fmt, "file": out.name, **meta}, indent=2) + "\n")
    tmp.replace(out)  # never leave a half-written file under the final name
    side_tmp.replace(side)
    return out
