"""Registering the chosen student: plain functions, so the rules can be tested without
Prefect.  The flow's ``register`` task opens the child run and calls :func:`register_student`.

The gate compares the candidate with the current champion on the candidate's own test
split (:func:`champion_accuracy`); a version that fails to become champion is deleted, so
no half-registered model is left behind.
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING

import numpy as np

from models.cost import Cost, flat, from_flat
from models.normalize import Normalized
from models.weights import load_weights, save_weights
from pipelines import tracking
from pipelines.common.home import project_home
from pipelines.config.runtime import TrackingConfig
from pipelines.config.students import BudgetConfig
from pipelines.data.prepared import Normalization, Prepared
from pipelines.evaluate.compare import Choice, StudentOutcome
from pipelines.evaluate.metrics import Evaluation, evaluate
from pipelines.register.promotion import Decision, Paired, decide, promote
from pipelines.tracking.runs import RunLogger

if TYPE_CHECKING:  # int8 builds on deployable() below
    from pipelines.register.int8 import Int8Check


def champion_inputs(model_name: str) -> dict | None:
    """What the champion of ``model_name`` takes: ``{version, input_shape, num_classes,
    class_names}``, from its version's tags (read back from its weights' spec for a version
    registered before the tags were written); None when there is no champion."""
    champion = tracking.current_champion(model_name)
    if champion is None:
        return None
    if "input_shape" in champion and "num_classes" in champion:
        return {"version": champion["version"], "input_shape": json.loads(champion["input_shape"]),
                "num_classes": int(champion["num_classes"]),
                "class_names": json.loads(champion.get("class_names") or "null")}
    spec = json.loads((tracking.download_artifacts(champion["source_run_id"], "weights") / "spec.json").read_text())
    return _takes(champion["version"], spec)


def _takes(version: str, spec: dict) -> dict:
    """What a version takes, from its weights' spec (the shape :func:`champion_inputs` returns)."""
    return {"version": version, "input_shape": spec["input_shape"], "num_classes": spec["num_classes"],
            "class_names": spec.get("class_names")}


def champion_mismatch(champion: dict, model_name: str, shape, classes: int, class_names: list[str] | None) -> str | None:
    """Why the champion (:func:`champion_inputs`) cannot be compared with a student of this
    data, naming the fix; None when it can: the same input shape and classes (by name
    where both sides know them)."""
    same = (list(champion["input_shape"]) == list(shape) and champion["num_classes"] == classes
            and (class_names is None or champion["class_names"] is None or champion["class_names"] == class_names))
    if same:
        return None
    names = lambda n: f" ({', '.join(n[:5])}{', ...' if len(n) > 5 else ''})" if n else ""  # noqa: E731
    experiment = model_name.removesuffix("-student")
    return (f"the champion {model_name} v{champion['version']} takes inputs {list(champion['input_shape'])} with "
            f"{champion['num_classes']} classes{names(champion['class_names'])}; this run's data gives {list(shape)} "
            f"and {classes}{names(class_names)}, so the promotion gate could not compare them: use another experiment name, "
            f"--set tracking.experiment=NEW (not {experiment}; the student then registers as NEW-student, and the "
            f"default is named after the data), or --set tracking.register_best=false")


def champion_evaluation(champion: dict | None, prepared: Prepared, model_name: str) -> Evaluation | None:
    """The champion evaluated on *this* test split, image by image (its weights, read back
    from its run), so the gate compares exact numbers on the same images."""
    if champion is None:
        return None
    folder = tracking.download_artifacts(champion["source_run_id"], "weights")
    model, spec = load_weights(folder)
    if (why := champion_mismatch(_takes(champion["version"], spec), model_name, prepared.input_shape, prepared.num_classes,
                                 prepared.class_names)) is not None:
        raise ValueError(why)
    return evaluate(model, prepared.x("test"), prepared.y("test"), prepared.num_classes)


def lineage_tags(teacher_source: str, teacher_key: str, sources: list, champion: dict | None) -> dict[str, str]:
    """Which teacher (and which starting weights, ``sources``) made this student.  The gate
    compares test accuracies on one split whatever the teacher; the tags say when it changed."""
    tags = {"teacher_source": teacher_source, "teacher_key": teacher_key}
    for source in sources:
        if source is not None:
            tags.update({k.replace(".", "_"): v for k, v in source.lineage().items()})
    if champion is not None and champion.get("teacher_key"):
        tags["teacher_vs_champion"] = ("same teacher" if champion["teacher_key"] == teacher_key
                                       else f"teacher changed (champion's: {champion['teacher_key']})")
    return tags


def deployable(best: StudentOutcome, prepared: Prepared) -> tuple[Normalized, np.ndarray]:
    """The student as served (raw [0, 1] pixels in, normalisation inside, on the CPU
    whatever device trained it) and two raw test images as its input example."""
    example = Normalization(prepared.mean, prepared.std).to_pixels(prepared.x("test")[:2].cpu(), clamp=False).numpy()
    return Normalized(copy.deepcopy(best.model).cpu(), prepared.mean, prepared.std).eval(), example


def cost_tags(cost: Cost) -> dict[str, str]:
    """The card's flat keys as tag text: counts whole, times to 6 significant digits."""
    return {k: str(int(v)) if v.is_integer() else f"{v:.6g}" for k, v in flat(cost).items()}


def register_student(run: RunLogger, parent_run_id: str, model_name: str, choice: Choice, prepared: Prepared,
                     spec: dict, lineage: dict[str, str], champion: dict | None,
                     gate: TrackingConfig, cost: Cost | None = None, budget: BudgetConfig | None = None,
                     int8: Int8Check | None = None) -> tuple[tracking.Registration, Decision]:
    """Log the chosen student as an MLflow model in ``run``, register it as a new version of
    ``model_name`` and promote it when it beats ``champion`` (the version that held the alias
    when the run looked) within ``budget`` (its cost card ``cost``, kept in the version's
    tags); returns the new version and why.  ``int8``: its int8 variant's check
    (:func:`pipelines.register.int8.check_int8`), recorded in the version's tags."""
    best = choice.outcome
    weights = project_home() / "cache" / "staging" / run.run_id
    save_weights(best.model, weights, {**spec, "method": best.method, "seed": best.seed,
                                       "test_acc": best.evaluation.accuracy})
    model_uri = tracking.log_student_model(run, *deployable(best, prepared), weights)
    held = champion_evaluation(champion, prepared, model_name)
    decision = decide(best.evaluation.accuracy, held.accuracy if held else None,
                      champion["version"] if champion else None,
                      Paired.of(best.evaluation.correct, held.correct) if held else None, gate.promotion_alpha,
                      gate.promotion_min_delta, cost=cost, champion_cost=from_flat(champion) if champion else None,
                      budget=budget)
    tags = {"method": best.method, "seed": best.seed, "test_acc": f"{best.evaluation.accuracy:.6f}",
            "data_key": prepared.key, "source_run_id": run.run_id, "student_run_id": best.run_id,
            "pipeline_run_id": parent_run_id, "promotion_reason": decision.reason, "chosen_because": choice.reason,
            # what it takes, so the next run's pre-flight check compares its data without a download
            "input_shape": json.dumps(list(prepared.input_shape)), "num_classes": str(prepared.num_classes)}
    if len(names := json.dumps(list(prepared.class_names))) <= 5000:  # a tag's limit; the spec holds them all
        tags["class_names"] = names
    if decision.delta is not None:
        tags["delta_vs_champion"] = f"{decision.delta:+.6f}"
    if decision.p_value is not None:
        tags["promotion_p_value"] = f"{decision.p_value:.6g}"
    if cost is not None:
        tags.update(cost_tags(cost))
    if decision.cost_change is not None:
        tags["cost_vs_champion"] = decision.cost_change
    tags.update(lineage)
    tags.update(int8.tags() if int8 is not None else {})
    # The version belongs to the pipeline run, where people look for what a run registered (the
    # MLflow UI lists a run's registered models by the version's run); the logged model and its
    # weights stay in the register child run, named by the source_run_id tag.
    reg = tracking.register_model(model_uri, model_name, None, tags, run_id=parent_run_id)
    try:  # one alias per version: champion (the old one becomes challenger) or challenger
        if decision.alias == "champion":  # the same code path as `metadistill promote`
            promote(model_name, reg.version, decision.reason, actor="pipeline")
        else:
            tracking.set_alias(model_name, "challenger", reg.version, {})
    except BaseException:
        tracking.delete_version(model_name, reg.version)  # no half-registered model
        raise
    reg.alias = decision.alias
    return reg, decision
