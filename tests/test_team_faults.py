"""A team's servers failing under its runs: the tracking server or the Prefect server killed
mid-run, a work pool's worker stopped, a run killed while it holds the registration turn.
Apart from tests/test_team.py so that the two files run side by side (`make test`'s workers
take a file each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from pipelines.orchestrate.services import stop_group
from tests.team_support import TINY, cli, node_env, sets


def started_until_the_teacher_trains(team, env: dict, args: list[str], experiment: str):
    """``metadistill run`` started, returned once its teacher's MLflow run exists (the
    teacher is training), with a client of the team's tracking server and that run."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    client, deadline = MlflowClient(team.tracking_uri, registry_uri=team.tracking_uri), time.time() + 180
    teacher = []
    while time.time() < deadline and proc.poll() is None and not teacher:
        found = client.get_experiment_by_name(experiment)
        teacher = found and client.search_runs([found.experiment_id], "attributes.run_name = 'teacher'")
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the teacher started: " + proc.stderr.read()[-2000:]
    return proc, client, teacher


def test_the_tracking_server_killed_mid_run_then_a_rerun_reuses_the_caches(team, tmp_path):
    env = node_env(team, tmp_path / "node")
    args = ["run", *sets(*TINY, "tracking.experiment=fault", "teacher.train.steps=4000")]
    proc, client, teacher = started_until_the_teacher_trains(team, env, args, "fault")  # killed while it trains
    stop_group(team.processes.pop("mlflow"))
    # aimed at the teacher's stage, and it hit it: the teacher was still training at the kill
    assert teacher and teacher[0].info.status == "RUNNING"
    try:
        stderr = proc.communicate(timeout=240)[1]
        assert proc.returncode == 1, stderr[-3000:]
        assert team.tracking_uri in stderr and "run again" in stderr
    finally:
        team.start_mlflow()
    experiment = client.get_experiment_by_name("fault").experiment_id
    orphans = client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert len(orphans) >= 2  # the parent and its teacher: their process died with the server away
    cli(*args, env=env)
    runs = client.search_runs([experiment], "attributes.run_name = 'teacher' and attributes.status = 'FINISHED'")
    assert [r.data.tags["teacher.cached"] for r in runs] == ["True"]  # trained before the kill, reused after
    # the rerun marked the dead process's runs FAILED, saying why
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    for orphan in orphans:
        run = client.get_run(orphan.info.run_id)
        assert run.info.status == "FAILED" and "tracking server was away" in run.data.tags["metadistill.failed_reason"]


def test_the_prefect_server_killed_mid_run_fails_the_run_cleanly_and_a_rerun_works(team, tmp_path):
    """The Prefect server dies while the teacher trains: the run exits 1 naming the Prefect
    URL (not a traceback), its MLflow runs are FAILED rather than left RUNNING (the tracking
    server is up to hear it), nothing is registered, and with the server back a rerun
    finishes, reusing the teacher trained before the kill."""
    env = {**node_env(team, tmp_path / "node"), "PREFECT_CLIENT_MAX_RETRIES": "1"}  # seconds, not its back-off
    args = ["run", *sets(*TINY, "tracking.experiment=prefect-fault", "teacher.train.steps=4000")]
    proc, client, _ = started_until_the_teacher_trains(team, env, args, "prefect-fault")
    stop_group(team.processes.pop("prefect"))
    try:
        stderr = proc.communicate(timeout=300)[1]
        assert proc.returncode == 1, stderr[-3000:]
        said = stderr[stderr.rindex("metadistill: "):]  # Prefect's own loggers speak before it, at length
        assert f"the Prefect server at {team.prefect_api_url} stopped answering" in said, stderr[-3000:]
        assert "run again" in said and "Traceback" not in said
    finally:
        team.start_prefect()
    experiment = client.get_experiment_by_name("prefect-fault").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert client.search_runs([experiment], "attributes.status = 'FAILED'")
    assert not client.search_registered_models("name='prefect-fault-student'")
    cli(*args, env=env)
    runs = client.search_runs([experiment], "attributes.run_name = 'teacher' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    # the teacher trained and finished (the tracking server heard it) before the kill; the rerun reused it
    assert [r.data.tags["teacher.cached"] for r in runs] == ["False", "True"]
    assert client.get_model_version_by_alias("prefect-fault-student", "champion").version == "1"


def test_a_work_pool_runs_two_overlapping_scheduled_runs(team, tmp_path):
    env = node_env(team, tmp_path / "worker-node")
    made = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "team-pool", "--type", "process"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    made = cli("schedule", "--cron", "0 3 * * *", "--name", "nightly", "--work-pool", "team-pool",
               *sets(*TINY, "tracking.experiment=pool"), env=env, timeout=180)
    assert "deployment metadistill/nightly created in work pool 'team-pool'" in made.stdout
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "team-pool",
                               "--limit", "2"], env=env, stdout=open(tmp_path / "worker.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        triggers = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "trigger", "--name", "nightly", "--set",
                                      f"student.seeds=[{seed}]"], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
        outs = [t.communicate(timeout=400) for t in triggers]
        for t, (out, err) in zip(triggers, outs):
            assert t.returncode == 0, out[-1500:] + err[-1500:] + (tmp_path / "worker.log").read_text()[-3000:]
        # The worker stops on SIGTERM by itself (Prefect forwards it as SIGINT), as a service
        # manager stops it: not by the SIGKILL that stop_group falls back on.
        os.kill(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("prefect worker did not stop within 60 s of SIGTERM: "
                        + (tmp_path / "worker.log").read_text()[-2000:])
    finally:
        stop_group(worker)
    client = MlflowClient(team.tracking_uri, registry_uri=team.tracking_uri)
    exp = client.get_experiment_by_name("pool")
    parents = [r for r in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
               if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2
    starts = sorted((r.info.start_time, r.info.end_time) for r in parents)
    assert starts[1][0] < starts[0][1], "the two flow runs did not overlap"
    versions = client.search_model_versions("name='pool-student'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    # (a server's version search leaves the aliases out: ask for the champion itself)
    assert int(client.get_model_version_by_alias("pool-student", "champion").version) in (1, 2)
    assert [v.tags["promotion_reason"] for v in versions].count("no champion yet") == 1


def test_a_holder_killed_in_its_turn_frees_it_promptly_and_promote_waits_for_its_turn(team, tmp_path):
    """A node killed while it holds the registration turn frees it within its lease (60 s,
    plus the server's 15-second sweep), not Prefect's default 5 minutes; a `metadistill promote` started
    meanwhile waits for the turn instead of moving the champion under the holder."""
    from pipelines.orchestrate.registration import LEASE_SECONDS

    hold = ("import pathlib, sys, time; from pipelines.orchestrate.registration import registration_turn\n"
            "with registration_turn('turn-student'):\n"
            "    pathlib.Path(sys.argv[1]).touch(); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "in")], env=node_env(team, tmp_path / "a"),
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "in").exists():
            assert time.time() < deadline and holder.poll() is None, holder.stderr.read()[-2000:]
            time.sleep(0.2)
        promote = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "promote", "1", "--model", "turn-student"],
                                   env=node_env(team, tmp_path / "b"), stderr=subprocess.PIPE, text=True)
        time.sleep(8)
        assert promote.poll() is None, "promote did not wait for the turn: " + promote.stderr.read()[-2000:]
    finally:
        killed = time.time()
        stop_group(holder, timeout=0.1)  # SIGTERM, then SIGKILL: no clean release of the slot
    assert promote.wait(timeout=120) == 1  # it got the turn, then found no such model
    waited = time.time() - killed
    assert "no registered model 'turn-student'" in promote.stderr.read()
    assert waited < LEASE_SECONDS + 15 + 30, f"the slot stayed held {waited:.0f} s after its holder died"
