"""Deployments of the pipeline flow: schedules, triggers and the local Prefect server.

Kept apart from the flow code.  Schedules need a real Prefect server (``metadistill
server`` or a team's server through ``PREFECT_API_URL``); the ephemeral API that
``metadistill run`` uses lives only as long as one run and cannot run them.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from pipelines.common import entrypoints
from pipelines.config.errors import ConfigError
from pipelines.config.loader import apply_override, validate_tree
from pipelines.config.pipeline import PipelineConfig

FLOW_NAME = "metadistill"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ScheduleError(RuntimeError):
    pass


def require_server() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise ScheduleError(
            "schedules need a running Prefect server; the ephemeral API of `metadistill run` cannot run them. "
            "Start one with `metadistill server` and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10) as resp:
            if resp.status == 200:
                return url
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise ScheduleError(f"no Prefect server answers at PREFECT_API_URL={url} ({exc}); "
                            f"start one with `metadistill server`") from None
    raise ScheduleError(f"the Prefect server at {url} is not healthy")


def server_command(host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """``prefect server start`` with its database under the project home (SQLite), unless
    PREFECT_SERVER_DATABASE_CONNECTION_URL points at PostgreSQL."""
    from pipelines.common.home import project_home

    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.setdefault("PREFECT_HOME", str(project_home() / "prefect"))
    return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env


def schedule(cfg: PipelineConfig, name: str, cron: str | None, interval: float | None,
             work_pool: str | None) -> None:
    """Create or update the deployment ``metadistill/<name>`` with this schedule and config.
    Without a work pool it is served from this process (blocks until stopped)."""
    if (cron is None) == (interval is None):
        raise ScheduleError("give exactly one of --cron or --interval")
    require_server()
    from pipelines.orchestrate.flow import metadistill_flow

    params = {"config": cfg.model_dump(mode="json")}
    if work_pool:
        metadistill_flow.from_source(source=str(REPO_ROOT), entrypoint=entrypoints.FLOW).deploy(
            name=name, work_pool_name=work_pool, cron=cron, interval=interval, parameters=params)
        print(f"deployment {FLOW_NAME}/{name} created in work pool {work_pool!r}; "
              f"run `prefect worker start --pool {work_pool}` where the flow should execute")
        return
    metadistill_flow.serve(name=name, cron=cron, interval=interval, parameters=params)


# Where the flow lived before pipelines/ became packages: a deployment made then would
# fail in its worker with a bare "file not found".
OLD_ENTRYPOINTS = ("pipelines/flow.py:metadistill_flow",)


def check_entrypoint(entrypoint: str | None, name: str) -> None:
    """Refuse a deployment whose entrypoint names the flow's old file, saying how to mend it."""
    if entrypoint and entrypoint.replace("\\", "/").endswith(OLD_ENTRYPOINTS):
        raise ScheduleError(f"deployment {FLOW_NAME}/{name} was made by an older metadistill (entrypoint "
                            f"{entrypoint}; the flow is now {entrypoints.FLOW}): re-create it with "
                            f"`metadistill schedule --name {name} ...` and restart its worker")


def trigger(name: str, overrides: list[str], timeout: float | None = None) -> dict:
    """Run the deployment now, with ``--set`` overrides on its stored config; waits for it."""
    require_server()
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(f"{FLOW_NAME}/{name}")
        except Exception as exc:  # noqa: BLE001 - Prefect raises ObjectNotFound
            raise ScheduleError(f"no deployment {FLOW_NAME}/{name}: create it with `metadistill schedule "
                                f"--name {name}` ({type(exc).__name__})") from None
    check_entrypoint(deployment.entrypoint, name)
    tree = dict(deployment.parameters.get("config") or {})
    for item in overrides:
        apply_override(tree, item)
    cfg = validate_tree(tree)
    flow_run = run_deployment(f"{FLOW_NAME}/{name}", parameters={"config": cfg.model_dump(mode="json")},
                              timeout=timeout)
    from pipelines import tracking

    run_id = tracking.find_run_by_tag(cfg.tracking.experiment, "prefect.flow_run_id", str(flow_run.id))
    return {"flow_run_id": str(flow_run.id), "state": flow_run.state.type.value if flow_run.state else None,
            "mlflow_run_id": run_id}


__all__ = ["ConfigError", "ScheduleError", "check_entrypoint", "require_server", "schedule", "server_command", "trigger"]
