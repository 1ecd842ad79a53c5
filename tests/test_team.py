"""A team's set-up against the real servers: PostgreSQL, `mlflow server --serve-artifacts` and
the Prefect server on it, started by `pipelines.orchestrate.services` (what `metadistill
services` runs); overlapping runs on one home; a server that dies mid-run or is not there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits

from benchmarks.team_auth import MLFLOW, PREFECT, add_user, fuzz, grant, markdown, prepare_probe, refusals
from pipelines.common.net import basic_auth, status_of
from pipelines.common.secrets import AuthRequired
from pipelines.orchestrate.services import Ports, Services, stop_group
from tests.helpers import free_port, wait_http
from tests.team_support import TINY, clean_env, cli, node_env, sets

REPO = Path(__file__).resolve().parents[1]


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

    # Roles: a reader (READ, the server's default) cannot move the champion, and changes
    # nothing trying; a release manager (EDIT on the registered model) can.
    add_user(team, "reader", "reader-password")
    add_user(team, "release", "release-password")
    grant(team, "release", "registered_model", "team-student", "EDIT")
    reader = node_env(team, tmp_path / "reader", ("reader", "reader-password"))
    release = node_env(team, tmp_path / "release", ("release", "release-password"))

    def refused(*args: str) -> None:
        before = {v: client.get_model_version("team-student", v).tags for v in ("1", "2")}
        held = client.get_model_version_by_alias("team-student", "champion").version
        done = cli(*args, "--model", "team-student", env=reader, check=False)
        assert done.returncode == 1 and "user 'reader' lacks the permission" in done.stderr, done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert client.get_model_version_by_alias("team-student", "champion").version == held
        assert {v: client.get_model_version("team-student", v).tags for v in ("1", "2")} == before  # not a tag moved

    refused("promote", other)
    wrong = cli("promote", other, "--model", "team-student", env={**reader, "MLFLOW_TRACKING_PASSWORD": "nope"},
                check=False)
    assert wrong.returncode == 1 and "credentials of 'reader' were refused" in wrong.stderr, wrong.stderr[-2000:]
    cli("promote", other, "--model", "team-student", "--reason", "release test", env=release)
    promoted = client.get_model_version_by_alias("team-student", "champion")
    assert promoted.version == other and promoted.tags["promoted_by"] == "release"
    refused("rollback")
    cli("rollback", "--model", "team-student", env=release)
    assert client.get_model_version_by_alias("team-student", "champion").version == champion

    # A second node that sees only the server (its own empty home) loads the champion as a reader.
    load = ("import mlflow, numpy as np; m = mlflow.pyfunc.load_model('models:/team-student@champion'); "
            "print(m.predict(np.random.rand(3, 1, 8, 8).astype(np.float32)).shape)")
    other_node = {**reader, "METADISTILL_HOME": str(tmp_path / "node-b")}
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


def test_an_absent_prefect_server_exits_2_before_any_work(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    env = clean_env(METADISTILL_HOME=str(tmp_path / "home"), PREFECT_API_URL=url)
    done = cli("run", *sets(*TINY), env=env, check=False, timeout=120)
    assert done.returncode == 2 and url in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "home" / "cache").exists()


def test_wrong_or_missing_credentials_exit_2_before_any_work(team, tmp_path):
    env = node_env(team, tmp_path / "home")
    for changed, named in (({"MLFLOW_TRACKING_PASSWORD": "wrong"}, "MLFLOW_TRACKING_USERNAME=admin"),
                           ({"MLFLOW_TRACKING_USERNAME": None}, "set MLFLOW_TRACKING_USERNAME"),
                           ({"PREFECT_API_AUTH_STRING": "metadistill:wrong"}, "PREFECT_API_AUTH_STRING"),
                           ({"PREFECT_API_AUTH_STRING": None}, "set PREFECT_API_AUTH_STRING")):
        node = {k: v for k, v in {**env, **changed}.items() if v is not None}
        done = cli("run", *sets(*TINY), env=node, check=False, timeout=120)
        assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert team.credentials()["MLFLOW_TRACKING_PASSWORD"] not in done.stderr
    assert not (tmp_path / "home" / "cache").exists()


def test_nodes_with_homes_of_their_own_register_in_turn(team, tmp_path):
    """Two nodes (homes of their own, no common flock) take their registration turns through
    the Prefect server's one-slot limit: the two turns never overlap."""
    turn = ("import json, pathlib, sys, time; from pipelines.orchestrate.registration import registration_turn\n"
            "folder = pathlib.Path(sys.argv[1]); (folder / f'ready-{sys.argv[2]}').touch()\n"
            "while not (folder / 'go').exists(): time.sleep(0.02)\n"
            "asked = time.time()\n"
            "with registration_turn('nodes-student'):\n"
            "    start = time.time(); time.sleep(3); end = time.time()\n"
            "print(json.dumps([asked, start, end]))")
    procs = [subprocess.Popen([sys.executable, "-c", turn, str(tmp_path), str(i)], env=node_env(team, tmp_path / f"node{i}"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2:  # both imported: they ask for the turn together
        assert time.time() < deadline and all(p.poll() is None for p in procs), "a node failed to start"
        time.sleep(0.05)
    (tmp_path / "go").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    (_, a0, a1), (b_asked, b0, b1) = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outs),
                                            key=lambda t: t[1])
    assert b_asked < a1, "the second node asked for its turn only after the first had finished: no contention"
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
    parents = sorted((r.info.start_time, r.info.end_time) for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert len(parents) == 4
    for (_, a_end), (b_start, _) in (parents[:2], parents[2:]):  # each wave's two runs overlapped
        assert b_start < a_end, f"a wave's runs ran one after the other: {parents}"
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
        torch.set_num_threads(3)  # chosen by hand (not the share of 4): left alone, now and at each refit
        assert threads.share_threads(None) == 3 and torch.get_num_threads() == 3
        assert threads.refit_threads() == 3 and torch.get_num_threads() == 3
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
                                env={**node_env(team, tmp_path / f"node-{i}"), "METADISTILL_PROGRESS": "0",
                                     "OMP_NUM_THREADS": "1"})
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


def test_every_server_refuses_callers_without_credentials(team):
    """The table of the docs (benchmarks/team_auth.py): reads, writes, registration, alias
    moves, deletions, user creation and flow-run creation, without credentials and with a
    wrong password, answer 401 on MLflow and Prefect; a READ user's writes to the team's
    experiment, model and users 403.
    Health routes stay open (probes)."""
    prepare_probe(team, ("prober", "prober-password"))
    rows = refusals(team, reader=("prober", "prober-password"))
    assert {r["server"] for r in rows} == {"mlflow", "prefect"} and len(rows) >= 40
    wrong = [r for r in rows if r["expected"] != r["observed"]]
    assert not wrong, markdown(wrong)
    assert status_of(team.local_tracking_uri + "/health", "GET", None) == 200
    assert status_of(team.local_url(team.ports.prefect) + "/api/health", "GET", None) == 200


def command_lines() -> str:
    """Every process's command line on this machine, as `ps` shows them to any user."""
    lines = []
    for path in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(path.read_bytes().replace(b"\0", b" ").decode("latin-1"))
        except OSError:  # it exited meanwhile
            pass
    return "\n".join(lines)


def test_no_secret_reaches_a_log_param_tag_or_artifact(team, tmp_path):
    """A pipeline run with credentials, then every place a secret could leak: the run's
    output, the servers' logs and command lines, every run's params and tags and the text of
    its artifacts."""
    env = node_env(team, tmp_path / "node")
    done = cli("run", *sets(*TINY, "tracking.experiment=secrets"), env=env)
    secrets = [team.password(), team.credentials()["MLFLOW_TRACKING_PASSWORD"],
               team.auth_string().split(":", 1)[1]]
    places = {"stdout": done.stdout, "stderr": done.stderr,  # and every command line on the machine
              "command lines": command_lines()}
    places.update({p.name: p.read_text(errors="replace") for p in team.root.glob("*.log")})
    client = MlflowClient(team.tracking_uri, registry_uri=team.tracking_uri)
    experiment = client.get_experiment_by_name("secrets").experiment_id
    runs = client.search_runs([experiment])
    assert len(runs) >= 3  # the parent and its stages
    for run in runs:
        places[f"{run.info.run_id} params"] = json.dumps(run.data.params)
        places[f"{run.info.run_id} tags"] = json.dumps(run.data.tags)
        folder = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id)))
        for path in folder.rglob("*"):
            if path.is_file():
                places[str(path)] = path.read_bytes().decode("latin-1")
    assert len(places) > 10
    leaks = [(where, i) for where, text in places.items() for i, secret in enumerate(secrets) if secret in text]
    assert not leaks, leaks


def test_listening_beyond_loopback_without_authentication_exits_2(tmp_path):
    """`services --host 0.0.0.0 --no-auth`, `server --host 0.0.0.0` without an auth string
    and `ui --host 0.0.0.0` are refused, naming the flag, before anything starts."""
    with pytest.raises(AuthRequired, match="--no-auth"):
        Services(tmp_path / "services", Ports("0.0.0.0"), auth=False)
    assert Services(tmp_path / "s", Ports("127.0.0.1")).auth is False  # loopback: off unless asked
    assert Services(tmp_path / "s", Ports("127.0.0.1"), auth=True).auth is True
    env = clean_env(METADISTILL_HOME=str(tmp_path / "home"))
    env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    for args, named in ((["services", "--host", "0.0.0.0", "--no-auth"], "--no-auth"),
                        (["server", "--host", "0.0.0.0"], "PREFECT_SERVER_API_AUTH_STRING"),
                        (["ui", "--host", "0.0.0.0"], "127.0.0.1")):
        done = cli(*args, env=env, check=False, timeout=120)
        assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    assert not (tmp_path / "home" / "services").exists()


def test_a_request_fuzzer_never_gets_in_and_the_servers_stay_healthy(team):
    """Malformed requests at MLflow and Prefect, with and without credentials: no request
    without them is ever answered 2xx on an API route, and both servers still answer their
    health checks and a real call.  Their 5xx are theirs, reported, not asserted away:
    MLflow 3.17.2 answers 500 to an ``Authorization`` header of another scheme than Basic
    (Bearer, Digest) and Prefect 3.9.1 to a binary body on a filter route, both where it
    then refuses or serves nothing (docs/team.md)."""
    admin = basic_auth("admin", team.credentials()["MLFLOW_TRACKING_PASSWORD"])
    prefect_auth = {"authorization": "Basic " + __import__("base64").b64encode(team.auth_string().encode()).decode()}
    for base, endpoints, credentials, health in (
            (team.local_tracking_uri, MLFLOW, admin, "/health"),
            (team.local_url(team.ports.prefect), PREFECT, prefect_auth, "/api/health")):
        paths = [e[2] for e in endpoints]
        rows = fuzz(base, paths, credentials, 80, seed=1)
        let_in = [r for r in rows if not (set(r["headers"]) & {"authorization"}) and 200 <= r["status"] < 300
                  and any(r["path"] == p[:60] for p in paths)]
        assert not let_in, let_in[:5]
        assert sum(r["status"] in (401, 403) for r in rows) >= 10  # it reached the auth checks
        assert status_of(base + health, "GET", None) == 200
    assert status_of(team.local_tracking_uri + "/api/2.0/mlflow/experiments/search?max_results=1", "GET", None, admin) == 200
    assert status_of(team.local_url(team.ports.prefect) + "/api/flows/filter", "POST", {}, prefect_auth) == 200


def test_proc_reads_a_process_start_and_tells_a_reused_pid_from_its_process(tmp_path):
    """A process whose name holds spaces and parentheses parses like any other (the fields
    after the name's last parenthesis); it is alive at its start and not under another start
    or once it has ended."""
    from pipelines.common.proc import alive, process_start, stat_fields

    odd = tmp_path / "a) b (c"
    odd.symlink_to(shutil.which("sleep"))
    proc = subprocess.Popen([str(odd), "30"])
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != odd.name and time.monotonic() < deadline:
            time.sleep(0.05)  # until the exec
        assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == odd.name
        start = process_start(proc.pid)
        assert len(stat_fields(proc.pid)[0]) == 1 and stat_fields(proc.pid)[1] == str(os.getpid())  # state, parent
        assert start and start.isdigit()
        assert start == stat_fields(proc.pid)[19] and int(start) >= int(process_start(os.getpid()))
        assert alive(proc.pid, start) and not alive(proc.pid, str(int(start) - 1))
    finally:
        proc.kill()
        proc.wait()
    assert process_start(proc.pid) is None and not alive(proc.pid, start)
