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


def _register(prepared, outcome: StudentOutcome, gate: TrackingConfig = TrackingConfig(), hidden: int = 16):
    from pipelines.register.student import register_student

    spec = model_spec("mlp", {"hidden": [hidden]}, prepared)
    with tracking.pipeline_run("reg-test", "run", {}) as run:
        return register_student(run, run.run_id, NAME, Choice(outcome, "the only one"), prepared, spec, {},
                                tracking.current_champion(NAME), gate)


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
