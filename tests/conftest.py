from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("METADISTILL_PROGRESS", "0")


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
