"""The whole flow on a tiny config, under a real Prefect test server and a real
(temporary) MLflow SQLite store and registry."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipelines.config.loader import load_config

TINY = ["teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [64]}", "teacher.train.steps=150",
        "teacher.train.log_every=25", "student.train.steps=60", "student.train.log_every=20",
        "student.seeds=[0, 1]", "tracking.experiment=it-digits", "maml.meta_steps=20", "maml.log_every=5",
        "data.label_budget=1000", "student.methods=[scratch, kd, kd_tuned, maml_init, meta_distill]",
        "kd.grid_alpha=[0.5, 1.0]", "kd.grid_temperature=[2]", "teacher.improve.steps=30",
        "teacher.improve.batch_size=32",
        "meta_distill.reference=kd"]  # the sweep's kd, reused; the standard-practice reference has its own test
METHODS = {"scratch", "kd", "kd_tuned", "maml_init", "meta_distill"}


def _client(home) -> MlflowClient:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _children(client, parent_run_id, experiment_id):
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.info.run_name: r for r in runs}


def test_pipeline_end_to_end(home, prefect_server):
    from pipelines.orchestrate.flow import metadistill_flow

    summary = metadistill_flow(config=load_config(overrides=TINY))
    assert set(summary["methods"]) == METHODS
    for m in summary["methods"].values():
        assert 0.3 < m["test_acc"] <= 1.0 and m["seeds"] == 2 and m["train_seconds"] > 0
    registered = summary["registered_model"]
    assert (registered["name"], registered["version"], registered["alias"]) == ("it-digits-student", "1", "champion")
    assert registered["reason"] == "no champion yet"
    # The chosen student is the best method's (mean validation accuracy over seeds), then its best seed;
    # ties go to the lower validation loss, then to the listed order.
    by_method = {}
    for s in summary["students"]:
        by_method.setdefault(s["method"], []).append(s)
    method = min(by_method, key=lambda m: (-np.mean([s["val_acc"] for s in by_method[m]]),
                                           np.mean([s["val_loss"] for s in by_method[m]])))
    seed = min(by_method[method], key=lambda s: (-s["val_acc"], s["val_loss"]))["seed"]
    assert (summary["chosen"]["method"], summary["chosen"]["seed"]) == (method, seed)
    assert summary["chosen"]["reason"].startswith(f"{method} has the best mean validation accuracy")
    # What was used: the teachers, the students' architecture, the held-out sizes, kd as the baseline.
    assert summary["teacher"]["arch"] == summary["teacher_arch"] == "mlp" and summary["teacher"]["cached"] is False
    assert summary["teacher"]["train_seconds"] > 0
    improved_acc = summary["teacher_improved"]["test_acc"]
    assert 0.3 < improved_acc <= 1 and summary["teacher_improved"]["cached"] is False
    assert summary["student_model"]["arch"] == summary["student_arch"] == "mlp"
    assert summary["student_model"]["parameters"] > 0 and "hidden" in summary["student_model"]["kwargs"]
    # the cost cards: one thread, a process of their own; on the parent run and the registered version
    student_cost, teacher_cost = summary["student_model"]["cost"], summary["teacher"]["cost"]
    assert student_cost["parameters"] == summary["student_model"]["parameters"] and student_cost["threads"] == 1
    assert teacher_cost["macs"] == 64 * 64 + 64 * 10 and student_cost["latency_b64"]["median_ms"] > 0
    assert summary["held_out"]["train"] == 1000 - summary["held_out"]["quiz"] - summary["held_out"]["val"]
    assert summary["held_out"]["val"] >= 100 and summary["warnings"] == []
    assert set(summary["methods"]["kd_tuned"]["vs_kd"]) == {"diff", "seeds"}  # 2 seeds: no interval
    assert "vs_kd" not in summary["methods"]["scratch"] and "vs_kd" not in summary["methods"]["kd"]

    client = _client(home)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.params["kd.temperature"] == "4.0"
    assert {"config.yaml", "comparison.md", "comparison.csv", "comparison.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "| kd |" in (home / "mlartifacts").joinpath(
        "it-digits", parent.info.run_id, "artifacts", "comparison.md").read_text()
    assert parent.inputs.dataset_inputs and parent.inputs.dataset_inputs[0].dataset.name == "digits"
    # The transfer split's lineage: inputs only, counted, with its own context.
    contexts = {d.dataset.name: [t.value for t in d.tags if t.key == "mlflow.data.context"]
                for d in parent.inputs.dataset_inputs}
    assert contexts == {"digits": ["training"], "digits-transfer": ["transfer"]}
    # The run page answers the question: a description and a headline metric.
    note = parent.data.tags["mlflow.note.content"]
    assert "| kd |" in note and f"**Chosen:** {method} seed {seed}" in note
    assert "**Registered:** it-digits-student v1 as champion" in note and "improved on the transfer data" in note
    assert parent.data.metrics["chosen_test_acc"] == next(
        s["test_acc"] for s in summary["students"] if (s["method"], s["seed"]) == (method, seed))
    assert parent.data.metrics["teacher_improved_test_acc"] == improved_acc
    assert parent.data.metrics["student_cost.macs"] == student_cost["macs"]
    assert parent.data.metrics["teacher_cost.latency_b1_ms"] == teacher_cost["latency_b1"]["median_ms"]
    assert "**Cost:** student mlp" in note
    version = client.get_model_version("it-digits-student", "1")
    assert version.tags["cost.macs"] == str(student_cost["macs"]) and "cost.latency_b1_ms" in version.tags

    children = _children(client, parent.info.run_id, parent.info.experiment_id)
    assert {"data", "augmentation", "teacher", "teacher-improve", "evaluate", "register"} | {
        f"student/{m}/seed{s}" for m in METHODS for s in (0, 1)} == set(children)
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert all(r.data.tags["prefect.flow_run_id"] == parent.data.tags["prefect.flow_run_id"] for r in children.values())
    improved = children["teacher-improve"]  # consistency training on the transfer split, its own run
    assert 0 <= improved.data.metrics["teacher_improve_mask_rate"] <= 1 and "test_acc" in improved.data.metrics
    assert improved.data.tags["teacher.improve.cached"] == "False"
    assert "learned_teacher_test_acc" in children["student/meta_distill/seed0"].data.metrics  # the co-trained head
    data_metrics = children["data"].data.metrics
    assert data_metrics["n_transfer"] == 1797 - data_metrics["n_test"] - 1000  # pool minus test minus labels
    tuned = children["student/kd_tuned/seed1"].data.metrics
    assert tuned["kd_tuned_alpha"] in (0.5, 1.0) and tuned["kd_tuned_temperature"] == 2.0
    assert {"kd_grid_val_acc_a0.5_t2.0_r1.0", "kd_grid_val_acc_a1.0_t2.0_r1.0"} <= set(tuned)
    kd = children["student/kd/seed0"]
    history = client.get_metric_history(kd.info.run_id, "train_loss")
    assert [m.step for m in history] == [20, 40, 60]
    assert 0 <= kd.data.metrics["test_ece"] <= 1 and "test_acc_class_9" in kd.data.metrics
    assert "learning_curve.png" in {a.path for a in client.list_artifacts(kd.info.run_id)}
    assert {f"confusion_matrix_{m}.png" for m in METHODS} | {"comparison.png"} <= {
        a.path for a in client.list_artifacts(children["evaluate"].info.run_id)}
    assert len(client.get_metric_history(children["teacher"].info.run_id, "train_loss")) == 6
    maml = children["student/maml_init/seed0"].info.run_id
    assert [m.step for m in client.get_metric_history(maml, "meta_query_acc")] == [5, 10, 15, 20]
    md = children["student/meta_distill/seed1"]
    assert client.get_metric_history(md.info.run_id, "teacher_drift")  # the default co-trains the head
    assert md.data.metrics["teacher_head_updates"] == 6 and "guard_reverts" in md.data.metrics

    version = client.get_model_version_by_alias("it-digits-student", "champion")
    assert version.tags["promotion_reason"] == "no champion yet"
    assert (version.tags["method"], version.tags["seed"]) == (method, str(seed))
    assert version.tags["chosen_because"] == summary["chosen"]["reason"]
    assert version.aliases == ["champion"]  # one alias per version
    assert version.run_id == parent.info.run_id  # listed under the pipeline run's registered models
    assert version.tags["source_run_id"] == children["register"].info.run_id  # the weights' run

    # The registered model loads without unpickling (torch.export) and predicts.
    import mlflow.pytorch

    model = mlflow.pytorch.load_model("models:/it-digits-student@champion")
    out = model(__import__("torch").zeros(3, 1, 8, 8))
    assert tuple(out.shape) == (3, 10)

    # A second run with a crippled student does not dethrone the champion; its network is searched first
    # (the architecture stage: a child run per trained trial, the Pareto figure), so the gate compares two
    # architectures.
    worse = metadistill_flow(config=load_config(overrides=TINY + [
        "student.train.steps=1", "student.seeds=[0]", "arch_search.enabled=true", "arch_search.trials=2",
        "arch_search.proxy_steps=30", "arch_search.default_budget=params", "arch_search.searcher=random",
        "arch_search.space={mlp: {depth: [1], width: [4, 8, 12]}}"]))
    arch = worse["architecture"]
    assert arch["trials"] >= 2 and arch["searcher"] == "random" and arch["budget"].startswith("params <= ")
    assert worse["student_model"]["arch"] == arch["chosen"]["arch"] == "mlp"
    assert worse["student_model"]["kwargs"] == arch["chosen"]["kwargs"]
    searched = client.search_runs([parent.info.experiment_id], "attributes.run_name = 'architecture'")[0]
    assert "pareto_front.png" in {a.path for a in client.list_artifacts(searched.info.run_id)}
    trials = _children(client, searched.info.run_id, parent.info.experiment_id)
    assert len(trials) >= 2 and all(name.startswith("trial/") for name in trials)
    assert all(0 <= t.data.metrics["held_out_acc"] <= 1 and t.data.metrics["cost.params"] > 0 for t in trials.values())
    assert worse["registered_model"]["alias"] == "challenger"
    assert str(client.get_model_version_by_alias("it-digits-student", "champion").version) == "1"
    challenger = client.get_model_version("it-digits-student", worse["registered_model"]["version"])
    assert "does not beat champion v1" in challenger.tags["promotion_reason"]
    assert challenger.aliases == ["challenger"] and "McNemar exact p" in challenger.tags["promotion_reason"]
    assert float(challenger.tags["delta_vs_champion"]) < 0
    # Cached data and teacher were reused, and said so with what they cost when trained.
    assert worse["teacher"]["cached"] is True and worse["teacher_improved"]["cached"] is True
    assert worse["teacher"]["train_seconds"] == pytest.approx(summary["teacher"]["train_seconds"])
    teacher_runs = client.search_runs([parent.info.experiment_id], "attributes.run_name = 'teacher'")
    assert {r.data.tags["teacher.cached"] for r in teacher_runs} == {"True", "False"}
    improve_runs = client.search_runs([parent.info.experiment_id], "attributes.run_name = 'teacher-improve'")
    assert {r.data.tags["teacher.improve.cached"] for r in improve_runs} == {"True", "False"}


def test_failed_run_is_marked_failed_and_registers_nothing(home, prefect_server, monkeypatch):
    from pipelines.data.errors import DataError
    from pipelines.orchestrate.flow import metadistill_flow

    monkeypatch.delenv("METADISTILL_DATA", raising=False)
    cfg = load_config("mnist", overrides=["tracking.experiment=it-fail", f"data.root={home / 'nothing'}"])
    with pytest.raises(DataError, match="is not a folder"):
        metadistill_flow(config=cfg)
    client = _client(home)
    experiment = client.get_experiment_by_name("it-fail")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    assert all(r.info.status == "FAILED" for r in runs)
    assert client.search_registered_models("name = 'it-fail-student'") == []


def test_diverging_stage_fails_the_run_and_registers_nothing(home, prefect_server):
    from pipelines.engine.metrics import TrainingDiverged
    from pipelines.orchestrate.flow import metadistill_flow

    cfg = load_config(overrides=TINY + ["tracking.experiment=it-nan", "student.methods=[scratch, kd]",
                                        "kd.temperature=8", "student.train.optimizer.lr=1e12",
                                        "student.train.grad_clip=null"])
    with pytest.raises(TrainingDiverged, match=r"student scratch seed 0: the training loss is (nan|inf) at step"):
        metadistill_flow(config=cfg)
    client = _client(home)
    runs = client.search_runs([client.get_experiment_by_name("it-nan").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"
    assert {r.info.run_name for r in runs if r.info.status == "FAILED"} >= {"student/scratch/seed0"}
    assert client.search_registered_models("name = 'it-nan-student'") == []


def test_concurrent_students_equal_the_sequential_sweep(home, prefect_server):
    """student.concurrency=2: two students at a time through Prefect's thread-pool task
    runner (on the CPU, a core each), and every (method, seed) ends where it ends alone."""
    import torch

    from pipelines.orchestrate.flow import metadistill_flow

    sweep = TINY + ["tracking.experiment=it-conc", "tracking.register_best=false", "tracking.cost_card=false",
                    "student.seeds=[0, 1]",
                    "student.methods=[scratch, kd, kd_tuned, maml_init, meta_distill]"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each of the two concurrent students gets on two cores
    try:
        alone = metadistill_flow(config=load_config(overrides=sweep + ["student.concurrency=1"]))
    finally:
        torch.set_num_threads(threads)
    together = metadistill_flow(config=load_config(overrides=sweep + ["student.concurrency=2"]))
    assert torch.get_num_threads() == threads  # the sweep gave the cores back
    assert together["student_concurrency"] == 2
    key = lambda s: (s["method"], s["seed"])  # noqa: E731
    assert sorted(map(key, alone["students"])) == sorted(map(key, together["students"]))
    first = {key(s): (s["test_acc"], s["test_loss"]) for s in alone["students"]}
    for s in together["students"]:
        assert (s["test_acc"], s["test_loss"]) == first[key(s)], key(s)
    client = _client(home)
    runs = [r for r in client.search_runs([client.get_experiment_by_name("it-conc").experiment_id],
                                          f"tags.mlflow.parentRunId = '{together['mlflow_run_id']}'")
            if r.info.run_name.startswith("student/")]
    assert len(runs) == 10 and all(r.info.status == "FINISHED" for r in runs)
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))  # two ran at once


def test_cli_run_writes_summary(home, tmp_path):
    """`metadistill run` in a subprocess: ephemeral Prefect API, embedded MLflow store."""
    out = tmp_path / "summary.json"
    args = [x for item in TINY + ["student.seeds=[0]"] for x in ("--set", item)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", *args, "--summary", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary) >= {"mlflow_run_id", "experiment", "methods", "registered_model"}
    assert set(summary["methods"]["kd"]) >= {"test_acc", "test_acc_std", "test_loss", "train_seconds", "seeds"}
    assert summary["registered_model"]["alias"] == "champion"
    assert set(summary) >= {"students", "chosen", "teacher_arch", "teacher", "teacher_improved", "student_model",
                            "held_out", "warnings"}
    assert "test acc % (mean ± std)" in proc.stdout and "teacher (mlp)" in proc.stdout  # the teacher's row
    assert "teacher improved (mlp)" in proc.stdout and "students: mlp" in proc.stdout and "…" not in proc.stdout
    assert f"student mlp {{\"hidden\": [16]}}: {summary['student_model']['cost']['parameters']:,} params · " in proc.stdout
    assert "teacher mlp: " in proc.stdout and " at batch 64" in proc.stdout
    last = proc.stdout.rstrip().splitlines()[-1]
    assert last.startswith("next: metadistill ui") and "serve --model it-digits-student" in last
    assert f"chosen: {summary['chosen']['method']} seed {summary['chosen']['seed']}" in proc.stdout
    assert "registered it-digits-student v1 as champion: no champion yet" in proc.stdout
    assert " ± " not in proc.stdout.split("teacher (mlp)")[1].split("\n")[0]  # one seed: no spread
    assert np.isfinite(summary["methods"]["scratch"]["test_acc"])
    int8 = summary["int8"]  # the chosen student's int8 variant, on the same test split
    assert set(int8) >= {"test_acc", "kept", "reason", "size_bytes", "float_size_bytes"} and int8["size_bytes"] > 0
    assert not int8["kept"] and "no smaller" in int8["reason"]  # 1,210 weights: the int8 file's code outweighs them
    assert f"int8 variant {'kept' if int8['kept'] else 'not kept'}" in proc.stdout
    tags = _client(home).get_model_version("it-digits-student", "1").tags
    assert tags["int8.kept"] == str(int8["kept"]).lower() and tags["int8.reason"] == int8["reason"]


def test_an_identical_rerun_never_promotes(home, prefect_server):
    """The same config twice trains the same student: it ties the champion image for image,
    so McNemar's test has nothing to go on and the champion stays."""
    from pipelines.orchestrate.flow import metadistill_flow

    same = TINY[:5] + ["student.train.steps=40", "student.seeds=[0]", "student.methods=[scratch]",
                       "tracking.experiment=it-rerun", "tracking.cost_card=false"]
    first = metadistill_flow(config=load_config(overrides=same))
    again = metadistill_flow(config=load_config(overrides=same))
    assert first["registered_model"]["alias"] == "champion"
    assert again["registered_model"]["alias"] == "challenger"
    assert first["students"][0]["test_acc"] == again["students"][0]["test_acc"]
    # No label_budget: every labelled image trains, so the improvement has nothing to learn from, and says so.
    assert first["teacher_improved"]["skipped"] == "no transfer data" and "data.label_budget" in first["teacher_improved"]["why"]
    client = _client(home)
    version = client.get_model_version("it-rerun-student", again["registered_model"]["version"])
    assert float(version.tags["delta_vs_champion"]) == 0.0 and version.tags["promotion_p_value"] == "1"
    assert "right only for the candidate: 0, only for the champion: 0" in version.tags["promotion_reason"]
    assert str(client.get_model_version_by_alias("it-rerun-student", "champion").version) == "1"


def test_every_student_at_chance_is_one_line_and_exit_1(home):
    """NoStudentLearned reaches the user as one line and a hint, not as a traceback (twice)."""
    sets = TINY[:5] + ["student.train.steps=1", "student.train.optimizer.lr=1e-9", "student.seeds=[0, 1]",
                       "student.methods=[scratch]", "tracking.experiment=it-chance"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", *[x for s in sets for x in ("--set", s)]],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("metadistill: ") and "thread" not in line]
    assert len(ours) == 1 and "every student is at chance on the test split (scratch seed 0" in ours[0], ours
    assert "hint: no student learned" in proc.stderr
    assert _client(home).search_registered_models("name = 'it-chance-student'") == []
