"""``metadistill ui``: the MLflow UI over the project's store, and links into it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable

from pipelines.common.net import wait_http
from pipelines.tracking.runs import artifact_root, client, tracking_uri


def experiment_links(base: str) -> dict[str, str]:
    """Each experiment's link on the training-runs table.  MLflow 3.17's UI picks its first
    view from a global GenAI / model-training switch (default GenAI: the traces overview)
    and reads the experiment's ``mlflow.experimentKind`` tag only where that switch is
    off; ``workflowType=machine_learning`` in the link selects the runs table either way."""
    return {e.name: f"{base}/#/experiments/{e.experiment_id}?workflowType=machine_learning"
            for e in client().search_experiments(max_results=50)}


def serve_ui(host: str, port: int, on_ready: Callable[[], None] = lambda: None, timeout: float = 180.0) -> int:
    """Run ``mlflow ui`` over the project's store until it exits or this process is told to
    stop; returns its exit code.  The server runs in a process group of its own, and
    SIGTERM or SIGINT to this process is passed to the whole group (its gunicorn or uvicorn
    workers too), so ``kill``, ``timeout`` and supervisors leave no server behind.
    ``on_ready`` runs once the UI answers."""
    uri = tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        client()  # create or upgrade the store before the server reads it
        cmd += ["--default-artifact-root", artifact_root().as_uri()]
    proc = subprocess.Popen(cmd, start_new_session=True)
    stopping = []

    def stop(signum, frame) -> None:
        stopping.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        wait_http(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health", timeout,
                  alive=lambda: proc.poll() is None and not stopping)
        on_ready()
        code = proc.wait()
    except RuntimeError as exc:  # it exited, or never answered
        if not stopping:
            print(f"metadistill ui: {exc}", file=sys.stderr)
        code = proc.poll() if proc.poll() is not None else 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + stopping[0] if stopping else code
