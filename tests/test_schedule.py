"""Scheduled runs against a real `prefect server start` on a loopback port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import free_port, wait_http

TINY = ["tracking.cost_card=false",  # measured in test_cost and test_integration
        "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [32]}", "teacher.train.steps=40",
        "student.train.steps=30", "student.seeds=[0]", "student.methods=[scratch, kd]",
        "tracking.experiment=sched-digits"]


def group_gone(proc: subprocess.Popen, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=20)  # a clean stop takes a few seconds; a missed signal is not waited out
    except subprocess.TimeoutExpired:
        # A Prefect runner or flow-run process can miss its SIGTERM: the handler raises in the frame the
        # signal lands, and an exception raised inside a __del__ is only printed.  Kill the
        # group, and reap the runner so that it is not counted as a leftover (a zombie).
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def prefect_server(home, tmp_path):
    port = free_port()
    env = {**os.environ, "METADISTILL_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "server", "--port", str(port)], env=env,
                            stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    wait_http(f"{url}/health", 180, lambda: proc.poll() is None, lambda: (tmp_path / "server.log").read_text()[-3000:])
    yield url, env
    stop(proc)
    assert group_gone(proc), "prefect server left processes behind"


def test_ephemeral_api_refuses_schedules(home):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "schedule", "--interval", "60"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "ephemeral API" in proc.stderr and "metadistill server" in proc.stderr


def test_interval_schedule_runs_and_trigger(prefect_server, home, tmp_path):
    url, env = prefect_server
    # The runner asks the server for due runs every 2 s, not Prefect's 10: the scheduled run and
    # the triggered one start that much sooner.
    env = {**env, "PREFECT_API_URL": url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    args = [x for item in TINY for x in ("--set", item)]
    serve = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "schedule", "--interval", "30",
                              "--name", "it", *args], env=env, stdout=open(tmp_path / "serve.log", "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        deadline, finished = time.time() + 300, []
        while time.time() < deadline and not finished:
            time.sleep(2)
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            exp = client.get_experiment_by_name("sched-digits") if (home / "mlflow.db").exists() else None
            if exp is not None:
                runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
                finished = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert finished, "no scheduled run completed; serve log:\n" + (tmp_path / "serve.log").read_text()[-3000:]
        assert finished[0].data.tags["prefect.flow_run_id"]

        trig = subprocess.run([sys.executable, "-m", "pipelines.cli", "trigger", "--name", "it", "--set",
                               "student.seeds=[1]"], capture_output=True, text=True, env=env, timeout=300)
        assert trig.returncode == 0, trig.stderr[-3000:]
        mlflow_id = trig.stdout.split("mlflow run ")[1].split()[0]
        run = client.get_run(mlflow_id)
        assert run.info.status == "FINISHED" and run.data.params["student.seeds"] == "[1]"
        bad = subprocess.run([sys.executable, "-m", "pipelines.cli", "trigger", "--name", "it", "--set", "kd.tmp=1"],
                             capture_output=True, text=True, env=env, timeout=120)
        assert bad.returncode == 2 and "unknown key 'kd.tmp'" in bad.stderr
        missing = subprocess.run([sys.executable, "-m", "pipelines.cli", "trigger", "--name", "nope"],
                                 capture_output=True, text=True, env=env, timeout=120)
        assert missing.returncode == 1 and "no deployment metadistill/nope: create it with" in missing.stderr
        assert "Traceback" not in missing.stderr

    finally:
        stop(serve)
    assert group_gone(serve), "the serving process left children behind"
