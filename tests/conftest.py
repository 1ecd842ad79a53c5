from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("METADISTILL_PROGRESS", "0")


def _pin_worker() -> None:
    """Under `pytest -n N`, worker i and every process it starts (CLI runs, torchrun ranks,
    servers) get CPUs of their own, as on a CI runner.  Left to share, two workers' torch
    processes each take every core and wait on each other's OpenMP threads: a 32x32 resnet8
    step beside a busy process runs 3.6 times slower with two threads than with one
    (docs/benchmarks/busy_machine.json).  Runs at import, before torch sizes its thread pool."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if worker and 1 < count <= len(cpus):
        share = len(cpus) // count
        index = int(worker.removeprefix("gw"))
        os.sched_setaffinity(0, cpus[index * share:(index + 1) * share])


_pin_worker()

# The longest files first: `make test`'s workers take a file each, and a long file started
# last leaves one worker running it alone while the other idles.
LONGEST_FIRST = ("test_team_faults.py", "test_team.py", "test_distributed.py", "test_sources.py", "test_schedule.py",
                 "test_integration.py", "test_serving.py", "test_ui_browser.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: a file keeps its order


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh project home (data/teacher caches, MLflow store) per test."""
    path = tmp_path / "home"
    monkeypatch.setenv("METADISTILL_HOME", str(path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        raise RuntimeError(f"the shared data folder is missing: expected {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect test server (SQLite, own process) for every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def team():
    """The three servers of `metadistill services --host 0.0.0.0`, as a team runs them: on
    every interface, so with authentication (on by default there), under a folder
    PostgreSQL's own user can reach (it refuses to run as root; pytest's tmp folders are
    private to root).  Clients use the address the services advertise, not loopback; this
    process holds the admin's credentials while the module runs."""
    from pipelines.orchestrate.services import Ports, Services
    from tests.helpers import free_port

    root = Path(tempfile.mkdtemp(prefix="metadistill-team-", dir="/tmp"))
    root.chmod(0o711)
    services = Services(root / "services", Ports("0.0.0.0", free_port(), free_port(), free_port()))
    assert services.auth and not services.address.startswith("127.")
    saved = {k: os.environ.get(k) for k in services.credentials()}
    services.start()
    os.environ.update(services.credentials())
    try:
        yield services
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        services.stop()
        shutil.rmtree(root, ignore_errors=True)
