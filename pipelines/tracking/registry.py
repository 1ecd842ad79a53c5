"""The MLflow model registry: versions, aliases, and registering weights or a logged model."""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipelines.common.home import home_lock
from pipelines.tracking.runs import RunLogger, client, tracking_uri


@dataclass
class Registration:
    name: str
    version: str
    alias: str
    reason: str


def registry_lock(model_name: str):
    """Held while a version of ``model_name`` is registered or its aliases move (the
    pipeline's registration, ``promote``, ``rollback``), so that overlapping runs on one
    home register one at a time, each against the champion it finds."""
    uri = hashlib.sha256(tracking_uri().encode()).hexdigest()[:12]
    return home_lock(f"registry-{uri}-{model_name}")


def current_champion(model_name: str) -> dict | None:
    """The champion version's tags (with its version), or None when there is none."""
    c = client()
    try:
        version = c.get_model_version_by_alias(model_name, "champion")
    except MlflowException as exc:
        _raise_refusal(exc, f"reading {model_name}@champion")
        return None
    return {"version": str(version.version), **version.tags}


def model_version_by_alias(model_name: str, alias: str) -> dict | None:
    """``{"version", "run_id", "tags", "aliases"}`` of the version holding ``alias``, or None."""
    try:
        v = client().get_model_version_by_alias(model_name, alias)
    except MlflowException as exc:
        _raise_refusal(exc, f"reading {model_name}@{alias}")
        return None
    return {"version": str(v.version), "run_id": v.run_id, "tags": dict(v.tags), "aliases": list(v.aliases)}


def model_version(model_name: str, version: str) -> dict:
    v = client().get_model_version(model_name, version)
    return {"version": str(v.version), "run_id": v.run_id, "tags": dict(v.tags), "aliases": list(v.aliases)}


class NotAllowed(RuntimeError):
    """The tracking server refused the caller: no or wrong credentials (401), or a user
    whose permission on the model does not cover the call (403)."""


def refusal(exc: MlflowException, what: str) -> NotAllowed | None:
    """``exc`` as :class:`NotAllowed` when it is the server's 401 or 403, else None.  A
    refusal must never read as "no such version": a reader who may not see the champion
    would otherwise register a second one."""
    import os

    status = exc.get_http_status_code()
    if status not in (401, 403) and exc.error_code not in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 or exc.error_code == "UNAUTHENTICATED":
        who = (f"the credentials of {user!r} were refused" if user else
               "the tracking server asks who is calling: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")
        return NotAllowed(f"{what}: {who} (README: Team set-up)")
    return NotAllowed(f"{what}: user {user!r} lacks the permission; a user with EDIT on the registered model (a "
                      f"release manager) can, and an admin grants it (README: Team set-up, roles)")


def _raise_refusal(exc: MlflowException, what: str) -> None:
    """Raise ``exc`` as :class:`NotAllowed` when it is a refusal; otherwise return, for the
    caller to handle it (a lookup's "not found") or re-raise it."""
    refused = refusal(exc, what)
    if refused is not None:
        raise refused from None


class VersionNotFound(LookupError):
    """A registry reference that does not resolve; the message says what exists."""


def resolve_version(model_name: str, alias: str | None = None, version: str | None = None) -> dict:
    """The version ``model_name@alias``, ``model_name/version`` or (``version="latest"``) the
    newest one, as :func:`model_version` returns it; :class:`VersionNotFound` otherwise."""
    c = client()
    try:
        c.get_registered_model(model_name)
    except MlflowException as exc:
        _raise_refusal(exc, f"reading {model_name}")
        names = [m.name for m in c.search_registered_models(max_results=50)]
        raise VersionNotFound(f"no registered model {model_name!r}; registered: {', '.join(names) or 'none'}") from None
    if alias is not None:
        found = model_version_by_alias(model_name, alias)
        if found is None:
            aliases = sorted(c.get_registered_model(model_name).aliases)
            raise VersionNotFound(f"registered model {model_name!r} has no alias {alias!r}; "
                                  f"its aliases: {', '.join(aliases) or 'none'}")
        return found
    versions = sorted(int(v.version) for v in c.search_model_versions(f"name='{model_name}'"))
    if version == "latest":
        if not versions:
            raise VersionNotFound(f"registered model {model_name!r} has no versions")
        version = str(versions[-1])
    if int(version) not in versions:
        raise VersionNotFound(f"registered model {model_name!r} has no version {version}; "
                              f"its versions: {', '.join(map(str, versions)) or 'none'}")
    return model_version(model_name, version)


def register_weights(run: RunLogger, weights_dir: Path, model_name: str, tags: dict[str, str],
                     description: str) -> Registration:
    """Log ``weights_dir`` (spec.json + model.safetensors) under the run's ``weights`` and
    register it as a new version of ``model_name`` (no MLflow model flavour: the
    pipeline reads these two files back, nothing else)."""
    client().log_artifacts(run.run_id, str(weights_dir), "weights")
    return register_model(f"runs:/{run.run_id}/weights", model_name, None, {**tags, "source_run_id": run.run_id},
                    description=description, run_id=run.run_id)


def set_alias(model_name: str, alias: str, version: str, tags: dict[str, str]) -> None:
    """Tag ``version``, then move ``alias`` to it; a caller without the right changes nothing
    (the first tag is refused) and gets :class:`NotAllowed`."""
    c = client()
    try:
        for k, v in tags.items():
            c.set_model_version_tag(model_name, version, k, str(v))
        c.set_registered_model_alias(model_name, alias, version)
    except MlflowException as exc:
        _raise_refusal(exc, f"moving {model_name}@{alias} to v{version}")
        raise


def register_model(model_uri: str, model_name: str, alias: str | None, tags: dict[str, str],
             description: str = "Students trained by metadistill", run_id: str | None = None) -> Registration:
    """Create a version, tag it and set its alias (if any); on any failure the version is
    deleted, so no half-registered model is left behind."""
    c = client()
    with contextlib.suppress(MlflowException):
        c.create_registered_model(model_name, description=description)
    # A logged model's URI (models:/m-<id>) must come with its id: a tracking server checks
    # that the id holds the source (the local store does not).
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    try:
        version = c.create_model_version(model_name, model_uri, run_id=run_id,
                                         tags={k: str(v) for k, v in tags.items()}, model_id=model_id)
    except MlflowException as exc:  # nothing was created: a refusal says whose right is missing
        _raise_refusal(exc, f"registering a version of {model_name}")
        raise
    try:
        _wait_ready(c, model_name, version.version)
        if alias is not None:
            c.set_registered_model_alias(model_name, alias, version.version)
    except BaseException:
        with contextlib.suppress(Exception):
            c.delete_model_version(model_name, version.version)
        raise
    return Registration(model_name, str(version.version), alias or "", tags.get("promotion_reason", ""))


def delete_version(model_name: str, version: str) -> None:
    client().delete_model_version(model_name, version)


def _wait_ready(c: MlflowClient, name: str, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while c.get_model_version(name, version).status == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise TimeoutError(f"model version {name}/{version} still pending after {timeout:.0f}s")
        time.sleep(0.2)
