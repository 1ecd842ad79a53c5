"""The int8 variant of the chosen student: its ``nn.Linear`` layers quantized
(:func:`models.quantize.quantize_int8`), evaluated on the same test split as the float
model, and kept only when it loses at most ``tracking.int8_max_drop`` and makes a smaller
file.

Nothing int8 is registered: the version keeps its float weights, and its tags
(``int8.test_acc``, ``int8.kept``, ``int8.reason``) say whether ``serve``/``export
--variant int8`` may rebuild the quantized model from them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.cost import Cost, flat
from models.quantize import float_layers, quantize_int8, torchscript_bytes
from pipelines.common.home import project_home
from pipelines.data.prepared import Prepared
from pipelines.evaluate.compare import StudentOutcome
from pipelines.evaluate.metrics import evaluate
from pipelines.register.student import deployable
from pipelines.tracking.runs import RunLogger

ARTIFACT = "int8/student-int8.torchscript"  # in the register run, when kept
# Accuracies are image counts over the split; a drop that equals the margin must not be
# lost to float rounding (0.9 - 0.895 > 0.005 in binary).
_ROUNDING = 1e-9


@dataclass
class Int8Check:
    test_acc: float
    kept: bool
    reason: str
    torchscript: bytes  # the int8 model as served (raw [0, 1] pixels in), traced
    float_size_bytes: int  # the float model's TorchScript file, for comparison
    cost: Cost | None = None  # its cost card when kept (measured beside the float one's)

    def tags(self) -> dict[str, str]:
        card = {f"int8.{k}": f"{v:.6g}" for k, v in flat(self.cost).items()} if self.cost else {}
        return {"int8.test_acc": f"{self.test_acc:.6f}", "int8.kept": str(self.kept).lower(), "int8.reason": self.reason,
                **card}

    def summary(self) -> dict:
        return {"test_acc": self.test_acc, "kept": self.kept, "reason": self.reason,
                "size_bytes": len(self.torchscript), "float_size_bytes": self.float_size_bytes, "cost": self.cost}


def keep_int8(float_acc: float, int8_acc: float, max_drop: float, int8_bytes: int, float_bytes: int) -> tuple[bool, str]:
    """Whether the int8 model is kept, and why: it loses at most ``max_drop`` test accuracy
    and its TorchScript file is smaller than the float model's (a tiny MLP's is not: the
    quantized layers' code outweighs the bytes its weights save)."""
    drop = float_acc - int8_acc
    accurate = drop <= max_drop + _ROUNDING
    smaller = int8_bytes < float_bytes
    change = (f"loses {100 * drop:.2f} points" if drop > _ROUNDING else f"gains {100 * -drop:.2f} points"
              if drop < -_ROUNDING else "the same accuracy")
    limit = f"within the {100 * max_drop:.2f} allowed" if accurate else f"more than the {100 * max_drop:.2f} allowed"
    size = f"TorchScript {int8_bytes:,} bytes vs {float_bytes:,} float" + ("" if smaller else ": no smaller")
    return accurate and smaller, (f"int8 test acc {int8_acc:.4f} vs float {float_acc:.4f}: {change}, {limit} "
                                  f"(tracking.int8_max_drop={max_drop:g}); {size}")


def check_int8(best: StudentOutcome, prepared: Prepared, max_drop: float | None) -> Int8Check | None:
    """Quantize the chosen student, evaluate it on the test split and size its TorchScript
    file; None when ``tracking.int8_max_drop`` is null (no int8 step)."""
    if max_drop is None:
        return None
    deployed, example = deployable(best, prepared)
    int8 = quantize_int8(deployed)  # normalisation inside; .model takes the split's normalised images
    evaluation = evaluate(int8.model, prepared.x("test"), prepared.y("test"), prepared.num_classes,
                          device=torch.device("cpu"))  # quantized kernels run on the CPU only
    pixels = torch.from_numpy(example)
    int8_file, float_bytes = torchscript_bytes(int8, pixels), len(torchscript_bytes(deployed, pixels))
    kept, reason = keep_int8(best.evaluation.accuracy, evaluation.accuracy, max_drop, len(int8_file), float_bytes)
    if convs := float_layers(deployed):  # say what a conv student gains little from
        reason += f"; nn.Linear layers only: {convs} convolution(s) stay float"
    return Int8Check(evaluation.accuracy, kept, reason, int8_file, float_bytes)


def log_int8(run: RunLogger, check: Int8Check | None) -> None:
    """The int8 TorchScript file as an artifact of the register run, when it is kept."""
    if check is None or not check.kept:
        return
    path = project_home() / "cache" / "staging" / f"{run.run_id}-int8" / ARTIFACT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(check.torchscript)
    run.log_artifact(path, "int8")
