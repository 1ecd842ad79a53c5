"""What a model costs to run, its *cost card*: parameters, multiply-accumulates of one
forward at batch 1, the size of its safetensors file and its CPU latency at batch 1 and 64.

Measured in this process; ``deploy/cost.py`` measures it in a process of its own on one
thread, which is what the pipeline reports.  Latency is the median over ``repeats`` of the
per-call time of N back-to-back calls of the served forward (:func:`models.forward.forward`),
and its spread is the range of those repeats relative to that median."""

from __future__ import annotations

import gc
import statistics
import time
from typing import NotRequired, TypedDict

import numpy as np
import torch
from safetensors.torch import save
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.forward import forward
from models.normalize import Normalized
from models.registry import count_parameters
from models.weights import saved_state

BATCHES = (1, 64)  # the card's latency batches: one request alone, a full micro-batch of the server


class Latency(TypedDict):
    median_ms: float  # per call, the median over the repeats
    spread_pct: float  # (slowest - fastest repeat) / median * 100
    calls: int  # calls per repeat
    repeats: int
    batch: int


class Cost(TypedDict):
    """The cost card.  ``macs`` and the latencies are None where nobody measured them (a
    version registered before the cost tags); ``threads`` and ``torch`` say how they were."""

    parameters: int
    macs: int | None
    size_bytes: int
    latency_b1: Latency | None
    latency_b64: Latency | None
    threads: NotRequired[int]
    torch: NotRequired[str]


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward at batch 1 (torch's FLOP counter: matmuls and
    convolutions, 2 FLOPs per MAC; elementwise ops are not counted)."""
    was_training = model.training
    model.eval()
    x = torch.rand(1, *input_shape, device=_device(model))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def weights_bytes(model: nn.Module) -> int:
    """The size of ``model.safetensors`` as ``models.weights.save_weights`` writes it."""
    return len(save(saved_state(model)))


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch: int, *, repeats: int = 5,
                    target_s: float = 0.1, max_calls: int = 200, min_calls: int = 5) -> Latency:
    """CPU latency of the served forward at ``batch`` random [0, 1] inputs: a warm-up, then
    ``repeats`` timings of N calls, N = ``max_calls`` or fewer so that a repeat of a slow model
    lasts about ``target_s`` (never under ``min_calls``)."""
    if batch < 1 or repeats < 1 or not 1 <= min_calls <= max_calls or target_s <= 0:
        raise ValueError(f"latency needs batch >= 1, repeats >= 1, 1 <= min_calls <= max_calls and target_s > 0; "
                         f"got batch={batch}, repeats={repeats}, min_calls={min_calls}, max_calls={max_calls}, "
                         f"target_s={target_s}")
    model.eval()
    pixels = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    forward(model, pixels)  # the first call pays for allocations and lazy initialisation
    one = _per_call(model, pixels, 1)
    calls = max(min_calls, min(max_calls, int(target_s / max(one, 1e-9))))
    enabled = gc.isenabled()
    gc.disable()  # a collection inside one repeat would read as latency (as timeit does)
    try:
        times = sorted(_per_call(model, pixels, calls) for _ in range(repeats))
    finally:
        if enabled:
            gc.enable()
    median = statistics.median(times)
    return {"median_ms": median * 1e3, "spread_pct": (times[-1] - times[0]) / median * 100, "calls": calls,
            "repeats": repeats, "batch": batch}


def _per_call(model: nn.Module, pixels: np.ndarray, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        forward(model, pixels)
    return (time.perf_counter() - start) / calls


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def measure_cost(model: nn.Module, input_shape: tuple[int, ...], size_bytes: int | None = None) -> Cost:
    """The whole card of ``model`` (as served: raw pixels in), in this process.  ``size_bytes``:
    the real file's size where there is one, else the size its safetensors would have."""
    network = model.model if isinstance(model, Normalized) else model  # what is saved: no normalisation buffers
    return {"parameters": count_parameters(model), "macs": count_macs(model, input_shape),
            "size_bytes": weights_bytes(network) if size_bytes is None else size_bytes,
            **{f"latency_b{b}": measure_latency(model, input_shape, b) for b in BATCHES}}


# ---------------------------------------------------------------- flat keys (metrics, tags)

def flat(cost: Cost) -> dict[str, float]:
    """The card as flat keys (``cost.parameters``, ``cost.latency_b1_ms``...) for MLflow
    metrics and registry tags; what nobody measured is left out."""
    out = {f"cost.{k}": float(cost[k]) for k in ("parameters", "macs", "size_bytes") if cost.get(k) is not None}
    for b in BATCHES:
        if (latency := cost.get(f"latency_b{b}")) is not None:
            out[f"cost.latency_b{b}_ms"] = float(latency["median_ms"])
            out[f"cost.latency_b{b}_spread_pct"] = float(latency["spread_pct"])
    return out


def from_flat(values: dict) -> Cost | None:
    """The card back from flat keys (a version's tags, strings); None without them."""
    try:
        cost: Cost = {"parameters": int(float(values["cost.parameters"])), "macs": int(float(values["cost.macs"])),
                      "size_bytes": int(float(values["cost.size_bytes"])), "latency_b1": None, "latency_b64": None}
    except (KeyError, TypeError, ValueError):
        return None
    for b in BATCHES:
        try:
            cost[f"latency_b{b}"] = {"median_ms": float(values[f"cost.latency_b{b}_ms"]),
                                     "spread_pct": float(values[f"cost.latency_b{b}_spread_pct"]), "batch": b}
        except (KeyError, TypeError, ValueError):
            pass
    return cost


# ---------------------------------------------------------------- words

def cost_text(cost: Cost) -> str:
    """``1,210 params · 1,184 MACs · 5.1 KiB · 9 us at batch 1 (±2.1%) · 0.12 ms at batch 64``;
    ± is half the spread of the repeats."""
    parts = [f"{_count(cost['parameters'])} params"] + ([f"{_count(cost['macs'])} MACs"] if cost.get("macs") else [])
    parts.append(_bytes(cost["size_bytes"]))
    for b in BATCHES:
        if (latency := cost.get(f"latency_b{b}")) is not None:
            spread = f" (±{latency['spread_pct'] / 2:.1f}%)" if b == 1 else ""
            parts.append(f"{_duration(latency['median_ms'])} at batch {b}{spread}")
    return " · ".join(parts)


def cost_change(cost: Cost, champion: Cost) -> str:
    """``+12% parameters, +12% MACs, -3% batch-1 latency``: the candidate against the champion
    (what both have measured)."""
    pairs = [("parameters", cost["parameters"], champion["parameters"])]
    if cost.get("macs") is not None and champion.get("macs") is not None:
        pairs.append(("MACs", cost["macs"], champion["macs"]))
    if cost.get("latency_b1") and champion.get("latency_b1"):
        pairs.append(("batch-1 latency", cost["latency_b1"]["median_ms"], champion["latency_b1"]["median_ms"]))
    return ", ".join(f"{100 * (new / old - 1):+.0f}% {name}" if old else f"{new:g} {name} (champion: 0)"
                     for name, new, old in pairs)


def _count(n: int) -> str:
    return f"{n:,}" if n < 10_000_000 else f"{n / 1e6:,.1f} M" if n < 10_000_000_000 else f"{n / 1e9:,.1f} G"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 1000 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


def _duration(ms: float) -> str:
    if ms < 1:
        return f"{ms * 1e3:.3g} us"
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1e3:.3g} s"
