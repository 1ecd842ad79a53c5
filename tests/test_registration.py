"""Registering the chosen student against a real MLflow store (the project home's SQLite
registry): the paired gate on the same images, one alias per version, and no version left
behind when promotion fails."""

from __future__ import annotations

import pytest
import torch

from models.registry import build_model
from pipelines import tracking
from pipelines.config.data import DataConfig
from pipelines.config.runtime import TrackingConfig
from pipelines.data.prepare import prepare
from pipelines.data.prepared import model_spec
from pipelines.engine.loop import TrainResult
from pipelines.evaluate.compare import Choice, StudentOutcome
from pipelines.evaluate.metrics import evaluate

NAME = "reg-test-student"


def _student(prepared, seed: int, hidden: int = 16) -> StudentOutcome:
    torch.manual_seed(seed)
    model = build_model("mlp", prepared.input_shape, prepared.num_classes, hidden=[hidden]).eval()
    ev = evaluate(model, prepared.x("test"), prepared.y("test"), prepared.num_classes)
    return StudentOutcome("scratch", seed, model, TrainResult(), ev, 0.5)


def _register(prepared, outcome: StudentOutcome, gate: TrackingConfig = TrackingConfig(), hidden: int = 16,
              cost=None, budget=None, int8=None):
    from pipelines.register.student import register_student

    spec = model_spec("mlp", {"hidden": [hidden]}, prepared)
    with tracking.pipeline_run("reg-test", "run", {}) as run:
        return register_student(run, run.run_id, NAME, Choice(outcome, "the only one"), prepared, spec, {},
                                tracking.current_champion(NAME), gate, cost, budget, int8)


def test_the_gate_reads_the_champion_image_by_image_and_keeps_one_alias(home):
    prepared = prepare(DataConfig(name="digits"))
    first = _student(prepared, 0)
    reg, decision = _register(prepared, first)
    assert (reg.version, reg.alias, decision.reason) == ("1", "champion", "no champion yet")
    # The same weights again: tied on every image, p = 1, stays challenger.
    reg, decision = _register(prepared, first)
    assert reg.alias == "challenger" and decision.p_value == 1.0
    assert tracking.model_version(NAME, "2")["aliases"] == ["challenger"]
    assert tracking.model_version(NAME, "1")["aliases"] == ["champion"]
    # With the gate opened (alpha 1, i.e. any non-negative-p win), a different model that is
    # better by accuracy takes the alias; the old champion becomes challenger, one alias each.
    other = max((_student(prepared, s) for s in range(1, 8)), key=lambda o: o.evaluation.accuracy)
    assert other.evaluation.accuracy > first.evaluation.accuracy
    reg, decision = _register(prepared, other, TrackingConfig(promotion_alpha=1.0))
    assert reg.alias == "champion" and "McNemar exact p" in decision.reason
    aliases = {v: tracking.model_version(NAME, v)["aliases"] for v in ("1", "2", reg.version)}
    assert aliases == {"1": ["challenger"], "2": [], reg.version: ["champion"]}


def test_the_cost_card_goes_to_the_tags_and_a_budget_holds_back_a_better_candidate(home):
    from models.cost import from_flat, measure_cost
    from pipelines.config.students import BudgetConfig

    prepared = prepare(DataConfig(name="digits"))
    first = _student(prepared, 0)
    card = measure_cost(first.model, prepared.input_shape)  # in this process: the numbers, not the timing, matter here
    reg, _ = _register(prepared, first, cost=card)
    tags = tracking.model_version(NAME, reg.version)["tags"]
    assert from_flat(tags)["macs"] == card["macs"] == 64 * 16 + 16 * 10 and tags["cost.parameters"] == "1210"
    assert "cost_vs_champion" not in tags  # no champion to compare with
    other = max((_student(prepared, s) for s in range(1, 8)), key=lambda o: o.evaluation.accuracy)
    assert other.evaluation.accuracy > first.evaluation.accuracy
    reg, decision = _register(prepared, other, TrackingConfig(promotion_alpha=1.0),
                              cost=measure_cost(other.model, prepared.input_shape), budget=BudgetConfig(params=1000))
    assert reg.alias == "challenger" and "beats champion v1" in decision.reason
    assert decision.reason.startswith("over budget: 1,210 parameters > student.budget.params=1,000; ")
    change = tracking.model_version(NAME, reg.version)["tags"]["cost_vs_champion"]
    assert change.startswith("+0% parameters, +0% MACs, ") and change.endswith("batch-1 latency")
    assert tracking.model_version(NAME, "1")["aliases"] == ["champion"]


def test_a_failed_promotion_leaves_no_version(home, monkeypatch):
    import pipelines.register.student as register

    prepared = prepare(DataConfig(name="digits"))

    def broken(*args, **kwargs):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(register, "promote", broken)
    with pytest.raises(RuntimeError, match="registry went away"):
        _register(prepared, _student(prepared, 0))
    assert tracking.client().search_model_versions(f"name='{NAME}'") == []


def test_a_champion_for_other_inputs_is_refused_naming_the_mend(home):
    prepared = prepare(DataConfig(name="digits"))
    _register(prepared, _student(prepared, 0))
    resized = prepare(DataConfig(name="digits", image_size=12))
    with pytest.raises(ValueError, match="use another experiment name"):
        _register(resized, _student(resized, 1))


def test_preflight_refuses_data_the_champion_cannot_take_before_any_work(home):
    """The registered version's tags say what it takes; a run whose data gives other inputs
    stops at the pre-flight check (in seconds, exit 2 from the CLI) naming
    tracking.experiment, instead of at registration after all the training."""
    import json
    import subprocess
    import sys
    import time

    from pipelines.config.errors import ConfigError
    from pipelines.config.loader import load_config
    from pipelines.orchestrate.preflight import check_champion
    from pipelines.register.student import champion_mismatch

    prepared = prepare(DataConfig(name="digits"))
    _register(prepared, _student(prepared, 0))
    tags = tracking.current_champion(NAME)
    assert json.loads(tags["input_shape"]) == [1, 8, 8] and tags["num_classes"] == "10"
    assert json.loads(tags["class_names"]) == prepared.class_names
    resized = load_config(overrides=["tracking.experiment=reg-test", "data.image_size=12"])
    with pytest.raises(ConfigError, match=r"reg-test-student v1 takes inputs \[1, 8, 8\] with 10 classes.*"
                                          r"gives \[1, 12, 12\] and 10.*tracking.experiment=NEW"):
        check_champion(resized)
    check_champion(load_config(overrides=["tracking.experiment=reg-test"]))  # the same inputs
    check_champion(load_config(overrides=["tracking.experiment=elsewhere", "data.image_size=12"]))  # no champion
    check_champion(resized.model_copy(update={"tracking": resized.tracking.model_copy(update={"register_best": False})}))
    takes = {"version": "3", "input_shape": [3, 32, 32], "num_classes": 2, "class_names": ["cat", "dog"]}
    assert champion_mismatch(takes, "pets-student", (3, 32, 32), 2, ["cat", "dog"]) is None
    assert "(cat, dog)" in champion_mismatch(takes, "pets-student", (3, 32, 32), 2, ["ant", "bee"])

    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--set", "tracking.experiment=reg-test",
                           "--set", "data.image_size=12"], capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "tracking.experiment=NEW" in lines[0], proc.stderr[-2000:]
    assert elapsed < 30, elapsed  # the pre-flight check, not the training: about 10 s on the 2-core machine
    assert not (home / "prefect").exists()


def test_the_int8_keep_rule_at_the_margin():
    from pipelines.register.int8 import keep_int8

    kept, reason = keep_int8(0.900, 0.895, 0.005, 100, 400)  # exactly the margin (0.9 - 0.895 > 0.005 in binary)
    assert kept and "loses 0.50 points, within the 0.50 allowed" in reason
    kept, reason = keep_int8(0.900, 0.8949, 0.005, 100, 400)
    assert not kept and "more than the 0.50 allowed" in reason and "tracking.int8_max_drop=0.005" in reason
    kept, reason = keep_int8(0.9, 0.91, 0.0, 100, 400)
    assert kept and "gains 1.00 points" in reason
    kept, reason = keep_int8(0.9, 0.9, 0.005, 400, 400)  # as accurate, but no smaller: nothing gained
    assert not kept and "400 bytes vs 400 float: no smaller" in reason


def test_the_int8_variant_is_tagged_and_rebuilt_from_the_float_weights(home, tmp_path):
    """What the pipeline's register task does: quantize the chosen student, evaluate it on
    the same test split, tag the version; serve/export then rebuild the int8 model."""
    import numpy as np

    from deploy.export import export
    from deploy.registry import VariantUnavailable, int8_refusal, load_registered
    from models.quantize import quantize_int8
    from pipelines.register.int8 import ARTIFACT, check_int8, log_int8

    prepared = prepare(DataConfig(name="digits"))
    student = _student(prepared, 0, hidden=64)
    check = check_int8(student, prepared, 0.005)
    assert check_int8(student, prepared, None) is None  # tracking.int8_max_drop: null
    assert check.summary()["size_bytes"] < check.summary()["float_size_bytes"]  # 4.8k weights: 23 KB against 33 KB
    _register(prepared, student, hidden=64, int8=check)
    tags = tracking.model_version(NAME, "1")["tags"]
    assert tags["int8.kept"] == str(check.kept).lower() and tags["int8.reason"] == check.reason
    assert float(tags["int8.test_acc"]) == pytest.approx(check.test_acc, abs=1e-6)
    if not check.kept:
        pytest.fail(f"a random 64-unit MLP should keep its int8 variant: {check.reason}")
    floats, int8 = load_registered(NAME), load_registered(NAME, variant="int8")
    assert int8.variant == "int8" and int8.metadata["variant"] == "int8" and floats.metadata["variants"] == ["float", "int8"]
    x = torch.rand(8, *prepared.input_shape)
    with torch.no_grad():
        assert torch.equal(int8.model(x), quantize_int8(floats.model)(x))  # deterministic from the float weights
    path = export(int8, "torchscript", tmp_path / "int8.pt")
    assert np.allclose(torch.jit.load(str(path))(x).detach().numpy(), int8.model(x).detach().numpy(), atol=1e-6)
    size = check.summary()["size_bytes"]
    assert size <= path.stat().st_size <= size + 4096  # the same archive plus the export's metadata file
    with tracking.pipeline_run("reg-test", "register", {}) as run:  # the register task logs a kept variant's file
        log_int8(run, check)
    assert [a.path for a in tracking.client().list_artifacts(run.run_id, "int8")] == [ARTIFACT]
    dropped = {"int8.kept": "false", "int8.reason": "int8 test acc 0.8 vs float 0.9: loses 10.00 points"}
    assert "loses 10.00 points" in int8_refusal(NAME, "1", dropped)
    with pytest.raises(VariantUnavailable, match="unknown variant"):
        load_registered(NAME, variant="fp16")
