"""Export a registered student for other serving stacks: TorchScript or ONNX.

The exported graph includes input normalisation: it takes raw [0, 1] pixels."""

from __future__ import annotations

from pathlib import Path

import torch

from deploy.registry import LoadedModel

FORMATS = ("torchscript", "onnx")


def export(loaded: LoadedModel, fmt: str, out: Path) -> Path:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, *loaded.spec["input_shape"])
    tmp = out.with_name(out.name + ".tmp")
    if fmt == "torchscript":
        with torch.no_grad():
            torch.jit.trace(loaded.model, example).save(str(tmp))
    else:
        batch = torch.export.Dim("batch", min=1)
        torch.onnx.export(loaded.model, (example,), str(tmp), input_names=["pixels"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False)
    tmp.replace(out)  # never leave a half-written file under the final name
    return out
