"""What the team tests share (tests/test_team.py, tests/test_team_faults.py): a small
pipeline, the CLI as a subprocess, a node's environment.  The team's servers are the
``team`` fixture of conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipelines.orchestrate.services import Services

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


def clean_env(**extra: str) -> dict:
    """This process's environment less what earlier tests left: the tracking and Prefect
    URLs, and the registry URI that ``mlflow.set_registry_uri`` exports."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_URL", "PREFECT_HOME",
                        "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING")}
    return {**env, **extra}


def node_env(team: Services, home: Path, user: tuple[str, str] | None = None) -> dict:
    """A node's environment: what `metadistill services` prints, with the admin's
    credentials (or ``user``'s) as the shell's ``$(cat FILE)`` gives them."""
    credentials = team.credentials()
    if user is not None:
        credentials.update(MLFLOW_TRACKING_USERNAME=user[0], MLFLOW_TRACKING_PASSWORD=user[1])
    env = clean_env(**{**team.env(), **credentials}, METADISTILL_HOME=str(home))
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "1"  # the fault test waits seconds, not MLflow's back-off
    env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
    return env
