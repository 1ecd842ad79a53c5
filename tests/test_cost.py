"""The cost card: MACs and sizes against hand-computed numbers, the card measured in a
process of its own (one thread), the latency probe of an architecture search, and the
promotion gate's budget and cost change."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from deploy.cost import INT8, CostError, LatencyProbe, cost_card, cost_cards, measure_folder
from deploy.registry import ModelLoadError
from models import build_model
from models.cost import (
    cost_change,
    cost_text,
    count_macs,
    flat,
    from_flat,
    measure_cost,
    measure_latency,
    weights_bytes,
)
from models.normalize import Normalized
from models.registry import count_parameters
from models.weights import save_weights
from pipelines.config.students import BudgetConfig
from pipelines.register.promotion import decide

SPEC = {"arch": "mlp", "kwargs": {"hidden": [16]}, "input_shape": [1, 8, 8], "num_classes": 10,
        "class_names": [str(i) for i in range(10)], "mean": [0.3], "std": [0.4]}


def test_macs_and_parameters_by_hand():
    mlp = build_model("mlp", (1, 8, 8), 10, hidden=[16])
    assert count_macs(mlp, (1, 8, 8)) == 64 * 16 + 16 * 10 == 1184
    assert count_parameters(mlp) == 64 * 16 + 16 + 16 * 10 + 10 == 1210
    # a 3x3 convolution, 3 -> 8 channels, padding 1 on 10x10: every output pixel of every
    # output channel takes 3 * 3 * 3 products; the flatten-and-linear head adds 800 * 5
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 10 * 10, 5)).train()
    assert count_macs(conv, (3, 10, 10)) == 8 * 10 * 10 * 3 * 3 * 3 + 800 * 5 == 25_600
    assert conv.training  # measured in eval mode, handed back as it came
    # stride 2 without padding on 9x9: a 4x4 output
    assert count_macs(nn.Conv2d(1, 2, 3, stride=2), (1, 9, 9)) == 2 * 4 * 4 * 9


def test_the_size_is_the_saved_file_and_normalisation_is_free(tmp_path):
    mlp = build_model("mlp", (1, 8, 8), 10, hidden=[16])
    save_weights(mlp, tmp_path / "m", SPEC)
    assert weights_bytes(mlp) == (tmp_path / "m" / "model.safetensors").stat().st_size
    assert 1210 * 4 < weights_bytes(mlp) < 1210 * 4 + 1024  # float32 tensors and a JSON header
    served = Normalized(mlp, [0.3], [0.4])
    assert count_macs(served, (1, 8, 8)) == 1184 and measure_cost(served, (1, 8, 8))["size_bytes"] == weights_bytes(mlp)


def test_latency_counts_calls_and_reports_its_spread():
    mlp = Normalized(build_model("mlp", (1, 8, 8), 10, hidden=[16]), [0.3], [0.4])
    fast = measure_latency(mlp, (1, 8, 8), 1, repeats=3, max_calls=50)
    assert fast["calls"] == 50 and fast["repeats"] == 3 and fast["batch"] == 1  # a fast model: max_calls
    assert fast["median_ms"] > 0 and fast["spread_pct"] >= 0
    slow = measure_latency(mlp, (1, 8, 8), 8, target_s=1e-7, min_calls=3)
    assert slow["calls"] == 3 and slow["batch"] == 8  # a repeat "too long" already: min_calls
    with pytest.raises(ValueError, match="min_calls <= max_calls"):
        measure_latency(mlp, (1, 8, 8), 1, min_calls=10, max_calls=5)


def test_flat_keys_text_and_change():
    cost = {"parameters": 51_466, "macs": 50_816, "size_bytes": 206_000,
            "latency_b1": {"median_ms": 0.047, "spread_pct": 0.8, "calls": 200, "repeats": 5, "batch": 1},
            "latency_b64": {"median_ms": 0.31, "spread_pct": 2.0, "calls": 200, "repeats": 5, "batch": 64}}
    keys = flat(cost)
    assert keys == {"cost.parameters": 51466.0, "cost.macs": 50816.0, "cost.size_bytes": 206000.0,
                    "cost.latency_b1_ms": 0.047, "cost.latency_b1_spread_pct": 0.8, "cost.latency_b64_ms": 0.31,
                    "cost.latency_b64_spread_pct": 2.0}
    back = from_flat({k: str(v) for k, v in keys.items()})
    assert back["macs"] == 50_816 and back["latency_b1"]["median_ms"] == 0.047 and from_flat({}) is None
    assert cost_text(cost) == "51,466 params · 50,816 MACs · 201 KiB · 47 us at batch 1 (±0.4%) · 310 us at batch 64"
    bigger = {**cost, "parameters": 57_642, "macs": 56_914,
              "latency_b1": {**cost["latency_b1"], "median_ms": 0.0456}}
    assert cost_change(bigger, cost) == "+12% parameters, +12% MACs, -3% batch-1 latency"
    unmeasured = {**cost, "macs": None, "latency_b1": None, "latency_b64": None}
    assert cost_change(bigger, unmeasured) == "+12% parameters" and set(flat(unmeasured)) == {
        "cost.parameters", "cost.size_bytes"}


def test_the_card_of_a_saved_model_in_its_own_process_on_one_thread(tmp_path):
    model = build_model("mlp", (1, 8, 8), 10, hidden=[16])
    save_weights(model, tmp_path / "m", SPEC)
    start = time.perf_counter()
    card = cost_card(tmp_path / "m")
    seconds = time.perf_counter() - start
    assert (card["parameters"], card["macs"]) == (1210, 1184)
    assert card["size_bytes"] == (tmp_path / "m" / "model.safetensors").stat().st_size == weights_bytes(model)
    assert card["threads"] == 1 and card["torch"] == torch.__version__
    for batch in (1, 64):
        latency = card[f"latency_b{batch}"]
        assert latency["batch"] == batch and latency["median_ms"] > 0 and latency["spread_pct"] >= 0
    assert seconds < 20, seconds  # about 2.5 s idle on 2 cores, most of it importing torch


def test_the_int8_card_counts_the_same_network_in_its_own_smaller_file(tmp_path):
    save_weights(build_model("mlp", (1, 8, 8), 10, hidden=[256, 256]), tmp_path / "m",
                 {**SPEC, "kwargs": {"hidden": [256, 256]}})
    float_card, int8_card = cost_cards([tmp_path / "m", f"{INT8}{tmp_path / 'm'}"])
    assert (int8_card["parameters"], int8_card["macs"]) == (float_card["parameters"], float_card["macs"])
    assert int8_card["size_bytes"] < 0.5 * float_card["size_bytes"]  # TorchScript of packed int8 weights
    assert int8_card["latency_b1"]["median_ms"] > 0 and int8_card["latency_b64"]["batch"] == 64
    with pytest.raises(ModelLoadError, match="expected spec.json and model.safetensors"):
        measure_folder(tmp_path)  # what the child answers a folder that holds no model (in this process)


def test_the_probe_times_candidates_in_one_process_and_names_a_bad_one():
    with LatencyProbe() as probe:
        mlp = probe.latency("mlp", {"hidden": [32]}, (1, 8, 8), 10, batch=1, repeats=2, max_calls=20)
        pid = probe._proc.pid
        conv = probe.latency("conv4", {}, (1, 16, 16), 5, batch=4, repeats=2, target_s=0.01)
        assert mlp["batch"] == 1 and mlp["calls"] == 20 and conv["batch"] == 4 and conv["median_ms"] > 0
        with pytest.raises(CostError, match=r"latency of nope \{\} at batch 1: ValueError: unknown model 'nope'"):
            probe.latency("nope", {}, (1, 8, 8), 10)
        with pytest.raises(CostError, match=r"latency of mlp \{\"width\": 3\}.*unexpected keyword"):
            probe.latency("mlp", {"width": 3}, (1, 8, 8), 10)
        assert probe.latency("mlp", {"hidden": [8]}, (1, 8, 8), 10, repeats=1)["repeats"] == 1
        assert probe._proc.pid == pid  # one process for every candidate
    # a child that does not answer in time is stopped, never waited on forever
    with LatencyProbe(timeout_s=0.01) as probe, pytest.raises(CostError, match="mlp.*no answer in 0.01 s"):
        probe.latency("mlp", {}, (1, 8, 8), 10)


CARD = {"parameters": 1210, "macs": 1184, "size_bytes": 5128,
        "latency_b1": {"median_ms": 0.08, "spread_pct": 5.0}, "latency_b64": None}


def test_a_budget_holds_back_a_better_candidate_naming_the_limit():
    assert decide(0.9, None, cost=CARD, budget=BudgetConfig(params=2000, latency_ms=0.1)).alias == "champion"
    over = decide(0.9, None, cost=CARD, budget=BudgetConfig(params=1000, macs=5000))
    assert over.alias == "challenger" and over.reason == ("over budget: 1,210 parameters > student.budget.params="
                                                          "1,000; no champion yet")
    # latency: a reading within the slack passes, past it fails with the measured value
    assert decide(0.9, None, cost=CARD, budget=BudgetConfig(latency_ms=0.078)).alias == "champion"
    slow = decide(0.95, 0.5, "3", cost=CARD, champion_cost={**CARD, "macs": 1000},
                  budget=BudgetConfig(latency_ms=0.07, mode="soft"))
    assert slow.alias == "challenger" and slow.reason.startswith(
        "over budget: batch-1 latency 0.08 ms > student.budget.latency_ms=0.07 (+5% slack: 0.0735 ms); beats champion v3")
    assert slow.cost_change == "+0% parameters, +18% MACs, +0% batch-1 latency"
    assert slow.reason.endswith("; cost vs champion v3: +0% parameters, +18% MACs, +0% batch-1 latency")
    unmeasured = decide(0.9, None, cost=None, budget=BudgetConfig(macs=10))
    assert unmeasured.alias == "challenger" and "no cost card was measured" in unmeasured.reason
    assert decide(0.9, None, cost=None).alias == "champion"  # no budget: nothing to check
