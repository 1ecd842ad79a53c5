"""A team's set-up against the real servers: PostgreSQL, `mlflow server --serve-artifacts` and
the Prefect server on it, started by `pipelines.orchestrate.services` (what `metadistill
services` runs); overlapping runs on one home; a server that dies mid-run or is not there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from pipelines.orchestrate.services import Ports, Services, stop_group
from tests.helpers import free_port, wait_http

REPO = Path(__file__).resolve().parents[1]

# One small student method: these tests are about processes, servers and the registry.
TINY = ["tracking.cost_card=false",  # measured in test_cost and test_integration
        "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [32]}", "teacher.train.steps=40",
        "teacher.improve.method=none", "student.train.steps=30", "student.seeds=[0]", "student.methods=[scratch]"]


def cli(*args: str, env: dict, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def sets(*items: str) -> list[str]:
    return [x for item in items for x in ("--set", item)]


@pytest.fixture(scope="module")
def team():
    """The three servers of `metadistill services`, under a folder PostgreSQL's own user can
    reach (it refuses to run as root; pytest's tmp folders are private to root)."""
    root = Path(tempfile.mkdtemp(prefix="metadistill-team-", dir="/tmp"))
    root.chmod(0o711)
    services = Services(root / "services", Ports(postgres=free_port(), mlflow=free_port(), prefect=free_port()))
    services.start()
    try:
        yield services
    finally:
        services.stop()
        shutil.rmtree(root, ignore_errors=True)


def clean_env(**extra: str) -> dict:
    """This process's environment less what earlier tests left: the tracking and Prefect
    URLs, and the registry URI that ``mlflow.set_registry_uri`` exports."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_HOME")}
    return {**env, **extra}


def node_env(team: Services, home: Path) -> dict:
    env = clean_env(**team.env(), METADISTILL_HOME=str(home))
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"  # the fault test waits seconds, not MLflow's back-off
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    return env


def test_pipeline_registry_and_serving_over_the_tracking_server(team, tmp_path):
    env = node_env(team, tmp_path / "node-a")
    cli("run", *sets(*TINY, "tracking.experiment=team"), env=env)
    cli("run", *sets(*TINY, "tracking.experiment=team", "student.seeds=[1]"), env=env)
    client = MlflowClient(team.tracking_uri, registry_uri=team.tracking_uri)
    versions = sorted(int(v.version) for v in client.search_model_versions("name='team-student'"))
    assert versions == [1, 2]
    champion = client.get_model_version_by_alias("team-student", "champion").version
    # Artifacts went through the server, to its disk; the node's home holds none.
    assert any((team.root / "artifacts").rglob("model.safetensors"))
    assert not (tmp_path / "node-a" / "mlartifacts").exists()
    other = "2" if champion == "1" else "1"
    cli("promote", other, "--model", "team-student", "--reason", "team test", env=env)
    assert client.get_model_version_by_alias("team-student", "champion").version == other
    cli("rollback", "--model", "team-student", env=env)
    assert client.get_model_version_by_alias("team-student", "champion").version == champion
    links = cli("ui", env=env).stdout
    assert f"{team.tracking_uri}/#/experiments/" in links

    # A second node that sees only the server (its own empty home) loads the champion.
    load = ("import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/team-student@champion'); "
            "print(m.predict(np.random.rand(3, 1, 8, 8).astype(np.float32)).shape)")
    other_node = {**env, "METADISTILL_HOME": str(tmp_path / "node-b")}
    done = subprocess.run([sys.executable, "-c", load], env=other_node, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "(3, 10)"
    # ... and `metadistill serve` serves it over HTTP, fetched from the server.
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model", "team-student", "--port",
                              str(port)], env=other_node, stdout=open(tmp_path / "serve.log", "w"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 120, lambda: serve.poll() is None,
                  lambda: (tmp_path / "serve.log").read_text()[-2000:])
        body = json.dumps({"instances": (load_digits().images[:4] / 16).tolist()}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=body,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            out = json.loads(resp.read())
        assert len(out["predictions"]) == 4 and out["model"]["version"] == str(champion)
    finally:
        stop_group(serve)


def test_an_absent_tracking_server_exits_2_before_any_work(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    env = clean_env(METADISTILL_HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI=uri)
    done = cli("run", *sets(*TINY), env=env, check=False, timeout=120)
    assert done.returncode == 2 and uri in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home" / "cache").exists()


def test_the_tracking_server_killed_mid_run_then_a_rerun_reuses_the_caches(team, tmp_path):
    env = node_env(team, tmp_path / "node")
    args = ["run", *sets(*TINY, "tracking.experiment=fault", "teacher.train.steps=4000")]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    client, deadline = MlflowClient(team.tracking_uri, registry_uri=team.tracking_uri), time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # kill it while the teacher trains
        found = client.get_experiment_by_name("fault")
        if found and client.search_runs([found.experiment_id], "attributes.run_name = 'teacher'"):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run ended before the teacher started: " + proc.stderr.read()[-2000:]
    stop_group(team.processes.pop("mlflow"))
    try:
        stderr = proc.communicate(timeout=240)[1]
        assert proc.returncode == 1, stderr[-3000:]
        assert team.tracking_uri in stderr and "run again" in stderr
    finally:
        team.start_mlflow()
    cli(*args, env=env)
    runs = client.search_runs([client.get_experiment_by_name("fault").experiment_id],
                              "attributes.run_name = 'teacher' and attributes.status = 'FINISHED'")
    assert [r.data.tags["teacher.cached"] for r in runs] == ["True"]  # trained before the kill, reused after


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


def test_nodes_with_homes_of_their_own_register_in_turn(team, tmp_path):
    """Two nodes (homes of their own, no common flock) take their registration turns through
    the Prefect server's one-slot limit: the two turns never overlap."""
    turn = ("import json, time; from pipelines.orchestrate.registration import registration_turn\n"
            "with registration_turn('nodes-student'):\n"
            "    start = time.time(); time.sleep(3); end = time.time()\n"
            "print(json.dumps([start, end]))")
    procs = [subprocess.Popen([sys.executable, "-c", turn], env=node_env(team, tmp_path / f"node{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    (a0, a1), (b0, b1) = sorted(json.loads(out.strip().splitlines()[-1]) for out, _ in outs)
    assert a1 <= b0, f"the turns overlapped: {a0:.2f}-{a1:.2f} and {b0:.2f}-{b1:.2f}"


def overlapping_runs(home: Path, n: int, experiment: str) -> list[subprocess.CompletedProcess]:
    env = clean_env(METADISTILL_HOME=str(home))
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run",
                               *sets(*TINY, f"tracking.experiment={experiment}", f"student.seeds=[{i}]")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=400), *p.communicate()) for p in procs]


def test_overlapping_runs_on_one_home_all_finish_and_register_in_turn(tmp_path):
    home = tmp_path / "home"
    for wave, versions in ((1, [1, 2]), (2, [1, 2, 3, 4])):  # a fresh home (schema made at once), then a warm one
        for done in overlapping_runs(home, 2, "overlap"):
            assert done.returncode == 0, done.stderr[-3000:]
            assert "Traceback" not in done.stderr and "already exists" not in done.stderr
        uri = f"sqlite:///{home / 'mlflow.db'}"
        client = MlflowClient(uri, registry_uri=uri)  # the registry too: an earlier test may have set its default
        found = client.search_model_versions("name='overlap-student'")
        assert sorted(int(v.version) for v in found) == versions, wave
        assert int(client.get_model_version_by_alias("overlap-student", "champion").version) in versions
        # Each decided against the champion it found: only the very first found none.
        assert [v.tags["promotion_reason"] for v in found].count("no champion yet") == 1
    exp = client.get_experiment_by_name("overlap")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    assert len([r for r in runs if "mlflow.parentRunId" not in r.data.tags]) == 4
    teachers = [r.data.tags["teacher.cached"] for r in runs if r.info.run_name == "teacher"]
    assert sorted(teachers) == ["False", "True", "True", "True"]  # trained once, read by the others
    assert len(list((home / "cache" / "teacher").iterdir())) == 1


def test_made_once_makes_once_across_threads_and_is_reentrant(home):
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.common.home import home_lock, made_once

    made, path = [], home / "artifact.txt"

    def make() -> str:
        with home_lock("artifact"):  # re-entrant: the maker may take the lock again
            made.append(1)
            time.sleep(0.2)
            path.write_text("made")
            return "made"

    def load() -> str | None:
        return path.read_text() if path.exists() else None

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: made_once("artifact", load, make), range(4)))
    assert results == ["made"] * 4 and made == [1]


def test_threads_are_shared_by_the_runs_alive_on_the_home(home, monkeypatch):
    import torch

    from pipelines.common import threads

    monkeypatch.setattr(threads, "usable_cpus", lambda: [0, 1, 2, 3])
    before = torch.get_num_threads()
    try:
        (home / "runs").mkdir(parents=True)
        (home / "runs" / str(os.getpid())).touch()  # what join_home_runs leaves
        (home / "runs" / "999999999").touch()  # a run that died without removing its file
        assert threads.home_runs() == 1 and not (home / "runs" / "999999999").exists()
        assert threads.share_threads(4) == 4
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            (home / "runs" / str(sleeper.pid)).touch()
            assert threads.home_runs() == 2 and threads.refit_threads() == 2 == torch.get_num_threads()
        finally:
            sleeper.kill()
            sleeper.wait()
        assert threads.refit_threads() == 4
        assert threads.share_threads(None) == torch.get_num_threads()  # chosen by hand: left alone
    finally:
        (home / "runs" / str(os.getpid())).unlink(missing_ok=True)
        threads._budget = None
        torch.set_num_threads(before)


def test_two_workers_run_trials_of_one_architecture_study_on_the_team_database(team, tmp_path):
    """`metadistill services` exports the study database; two processes with homes of their own
    join one study there, train at the same time, and stop once it holds its trials."""
    import optuna

    from tests.arch_worker import SETTING

    env = {**os.environ, **team.env()}
    assert team.password() not in env["METADISTILL_STUDY_STORAGE"]  # printed by `metadistill services`
    workers = [subprocess.Popen([sys.executable, "-m", "tests.arch_worker", str(tmp_path)], cwd=REPO,
                                env=clean_env(**team.env(), METADISTILL_HOME=str(tmp_path / f"node-{i}"),
                                              METADISTILL_PROGRESS="0", OMP_NUM_THREADS="1"))
               for i in range(2)]
    deadline = time.monotonic() + 240
    while len(list(tmp_path.glob("ready-*"))) < 2:  # both have their data and teacher: start together
        assert time.monotonic() < deadline and all(w.poll() is None for w in workers), "a worker failed to start"
        time.sleep(0.1)
    (tmp_path / "go").touch()
    assert [w.wait(timeout=300) for w in workers] == [0, 0]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    assert len(results) == 2 and results[0]["study"] == results[1]["study"]
    os.environ["PGPASSFILE"] = team.env()["PGPASSFILE"]
    study = optuna.load_study(study_name=results[0]["study"], storage=team.env()["METADISTILL_STUDY_STORAGE"])
    trained = [t for t in study.get_trials() if "worker" in t.user_attrs]
    trials = int(next(s.split("=")[1] for s in SETTING if s.startswith("arch_search.trials=")))
    assert trials <= len(trained) <= trials + 1  # each worker stops once the study holds its trials
    spans = {}
    for t in trained:
        start, end = spans.get(t.user_attrs["worker"], (float("inf"), 0.0))
        spans[t.user_attrs["worker"]] = (min(start, t.user_attrs["started"]), max(end, t.user_attrs["finished"]))
    assert len(spans) == 2, f"one worker trained everything: {spans}"
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, f"the workers' trials did not overlap in time: {spans}"
    # Both read the same choice from the one study.
    assert results[0]["chosen"] == results[1]["chosen"]
