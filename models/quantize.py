"""int8 variants of a float model: dynamic quantization of its ``nn.Linear`` layers.

Dynamic quantization is a pure function of the float weights (per-tensor min/max of each
weight matrix), so nothing int8 is ever stored: the registry keeps the float safetensors,
and the pipeline, ``serve`` and ``export`` all rebuild the int8 model with
:func:`quantize_int8`.  Convolutions are not covered (torch's dynamic quantization handles
``nn.Linear`` and recurrent layers only): a conv student gets an int8 head and float
convolutions, so it gains little.  Activations are quantized at run time, per batch, so a
row's logits can move slightly with the rows it is batched with.  Quantized kernels run on
the CPU only.
"""

from __future__ import annotations

import copy
import io
import warnings

import torch
from torch import nn


def quantize_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of ``model`` in eval mode with every ``nn.Linear`` replaced by its dynamic
    int8 version (qint8 weights); ``model`` itself is left as it was."""
    float_copy = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        # torch 2.x announces that torch.ao.quantization moves to the torchao package, and that
        # qint8 tensor constructors will go; both still work in the torch this project pins, and
        # torchao is not a dependency.  The warnings say nothing a user of this model can act on.
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(float_copy, {nn.Linear}, dtype=torch.qint8)


def float_layers(model: nn.Module) -> int:
    """How many weight layers :func:`quantize_int8` leaves in float (convolutions)."""
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def torchscript_bytes(model: nn.Module, example: torch.Tensor, extra_files: dict[str, str] | None = None) -> bytes:
    """``model`` traced on ``example`` and saved as a TorchScript archive (with ``extra_files``
    inside): the file a server without this code loads, and the size of the int8 variant (a
    state dict of packed int8 weights has no meaningful size)."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.x marks torch.jit deprecated in favour of torch.export, which cannot take the
        # packed weights of a dynamically quantized model: TorchScript is its one portable file.
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        torch.jit.save(torch.jit.trace(model, example), buffer, _extra_files=extra_files or {})
    return buffer.getvalue()
