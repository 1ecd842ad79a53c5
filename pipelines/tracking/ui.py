"""``metadistill ui``: the MLflow UI over the project's store, and links into it."""

from __future__ import annotations

from pipelines.tracking.runs import artifact_root, client, tracking_uri


def experiment_links(base: str) -> dict[str, str]:
    """Each experiment's link on the training-runs table.  MLflow 3.17's UI picks its first
    view from a global GenAI / model-training switch (default GenAI: the traces overview)
    and reads the experiment's ``mlflow.experimentKind`` tag only where that switch is
    off; ``workflowType=machine_learning`` in the link selects the runs table either way."""
    return {e.name: f"{base}/#/experiments/{e.experiment_id}?workflowType=machine_learning"
            for e in client().search_experiments(max_results=50)}


def serve_ui(host: str, port: int) -> int:
    """Run ``mlflow ui`` over the project's store (blocking); returns its exit code."""
    import subprocess
    import sys

    uri = tracking_uri()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        client()
        cmd += ["--default-artifact-root", artifact_root().as_uri()]
    return subprocess.call(cmd)
