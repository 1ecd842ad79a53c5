"""The team's servers with authentication: who is refused where, and what it costs.

1. **Refusals:** every endpoint of the table below, on MLflow (basic-auth), Prefect (auth
   string) and ``metadistill serve`` (bearer token), called with no credentials, with a wrong
   password, and (MLflow) as a user with READ only; the expected and observed status codes.
2. **Cost:** the default pipeline over the authenticated servers against the same servers
   without authentication (two sets started side by side, fresh homes, pairs in alternating
   order; target: at most 5% more wall time).

    python -m benchmarks.team_auth --json docs/benchmarks/team_auth.json
    python -m benchmarks.team_auth --smoke --json PATH  # the table, one tiny pair

Nothing else may run on the machine meanwhile (every run takes both cores).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import time
import uuid
from pathlib import Path

from benchmarks.team_runs import team_folder, timed
from pipelines.common.net import basic_auth, free_port, status_of
from pipelines.orchestrate.services import Ports, Services

SMOKE = ["--pairs", "1", *[x for item in (
    "teacher.model.arch=mlp", "teacher.model.kwargs={hidden: [16]}", "teacher.train.steps=5", "teacher.improve.method=none",
    "student.train.steps=4", "student.seeds=[0]", "student.methods=[scratch]") for x in ("--set", item)]]

PROBE_MODEL = "probe-student"  # a registered model the table's registry calls aim at

# (what it is, method, path, JSON body[, what a signed-in READ user gets]); every path asks
# for credentials.  A READ user may create a model or experiment of their own (MLflow makes
# them its manager), never write to the team's.
MLFLOW = [
    ("read", "GET", "/api/2.0/mlflow/experiments/search?max_results=5", None),
    ("read", "GET", "/api/2.0/mlflow/registered-models/search", None),
    ("read", "GET", f"/api/2.0/mlflow/model-versions/get-by-alias?name={PROBE_MODEL}&alias=champion", None),
    ("read", "GET", "/api/2.0/mlflow-artifacts/artifacts", None),
    ("write", "POST", "/api/2.0/mlflow/experiments/create", {"name": "probe-experiment"}),
    ("write", "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": "0"}, 403),
    ("write", "PUT", "/api/2.0/mlflow-artifacts/artifacts/probe/file.txt", None),
    ("delete", "POST", "/api/2.0/mlflow/experiments/delete", {"experiment_id": "0"}, 403),
    ("register", "POST", "/api/2.0/mlflow/registered-models/create", {"name": "probe-other"}, 200),
    ("register", "POST", "/api/2.0/mlflow/model-versions/create", {"name": PROBE_MODEL, "source": "runs:/x/weights"},
     403),
    ("alias", "POST", "/api/2.0/mlflow/registered-models/alias",
     {"name": PROBE_MODEL, "alias": "champion", "version": "1"}, 403),
    ("alias", "DELETE", "/api/2.0/mlflow/registered-models/alias", {"name": PROBE_MODEL, "alias": "champion"}, 403),
    ("delete", "DELETE", "/api/2.0/mlflow/registered-models/delete", {"name": PROBE_MODEL}, 403),
    ("admin", "POST", "/api/2.0/mlflow/users/create", {"username": "intruder", "password": "intruder-password"},
     403),
]
PREFECT = [
    ("read", "POST", "/api/flows/filter", {}),
    ("read", "POST", "/api/work_pools/filter", {}),
    ("read", "POST", "/api/flow_runs/filter", {}),
    ("write", "POST", "/api/flows/", {"name": "probe-flow"}),
    ("flow run", "POST", "/api/flow_runs/", {"flow_id": str(uuid.UUID(int=1))}),
    ("flow run", "POST", f"/api/deployments/{uuid.UUID(int=2)}/create_flow_run", {}),
    ("write", "POST", "/api/work_pools/", {"name": "probe-pool", "type": "process"}),
    ("delete", "DELETE", f"/api/flows/{uuid.UUID(int=3)}", None),
]
SERVE = [
    ("read", "GET", "/ready", None),
    ("read", "GET", "/metadata", None),
    ("predict", "POST", "/predict", {"instances": [[0.0] * 64]}),
    ("predict", "POST", "/invocations", {"inputs": [[0.0] * 64]}),
]


def add_user(services: Services, user: str, password: str) -> None:
    """An MLflow user (READ on everything by the server's default), made by the admin."""
    admin = basic_auth("admin", services.credentials()["MLFLOW_TRACKING_PASSWORD"])
    status = status_of(services.local_tracking_uri + "/api/2.0/mlflow/users/create", "POST",
                  {"username": user, "password": password}, admin)
    if status not in (200, 201):
        raise RuntimeError(f"creating MLflow user {user!r} answered {status}")


def grant(services: Services, user: str, resource_type: str, resource_id: str, permission: str) -> None:
    """The admin grants ``user`` ``permission`` (READ, USE, EDIT, MANAGE) on one resource
    (``registered_model`` by name, ``experiment`` by id): MLflow's v3 permissions API."""
    admin = basic_auth("admin", services.credentials()["MLFLOW_TRACKING_PASSWORD"])
    status = status_of(services.local_tracking_uri + "/api/3.0/mlflow/users/permissions/grant", "POST",
                  {"username": user, "resource_type": resource_type, "resource_id": resource_id,
                   "permission": permission}, admin)
    if status != 200:
        raise RuntimeError(f"granting {user!r} {permission} on {resource_type} {resource_id!r} answered {status}")


def prepare_probe(services: Services, reader: tuple[str, str]) -> None:
    """What the table's calls aim at: a READ user, and the registered model whose aliases
    they try to move (so a refusal is about the right, not a missing model)."""
    add_user(services, *reader)
    admin = basic_auth("admin", services.credentials()["MLFLOW_TRACKING_PASSWORD"])
    status = status_of(services.local_tracking_uri + "/api/2.0/mlflow/registered-models/create", "POST",
                  {"name": PROBE_MODEL}, admin)
    if status != 200:
        raise RuntimeError(f"creating {PROBE_MODEL} answered {status}")


def refusals(services: Services, serve_base: str | None = None, serve_token: str | None = None,
             reader: tuple[str, str] | None = None) -> list[dict]:
    """The table: each endpoint, called without credentials and with wrong ones (expected
    401), and on MLflow's writes to what the team owns as ``reader`` (expected 403; a model
    of the reader's own, 200).  ``observed`` is
    what each server answered."""
    mlflow, prefect = services.local_tracking_uri, services.local_url(services.ports.prefect)
    wrong_prefect = basic_auth("metadistill", "wrong")
    rows = []
    for server, base, endpoints, wrong in (("mlflow", mlflow, MLFLOW, basic_auth("admin", "wrong-password")),
                                           ("prefect", prefect, PREFECT, wrong_prefect),
                                           ("serve", serve_base, SERVE, {"authorization": "Bearer wrong-token"})):
        if base is None:
            continue
        for kind, method, path, body, *as_reader in endpoints:
            for caller, headers, expected in (("none", {}, 401), ("wrong", wrong, 401)):
                rows.append({"server": server, "kind": kind, "method": method, "path": path, "caller": caller,
                             "expected": expected, "observed": status_of(base + path, method, body, headers)})
            if as_reader and reader is not None:
                rows.append({"server": server, "kind": kind, "method": method, "path": path, "caller": "reader",
                             "expected": as_reader[0], "observed": status_of(base + path, method, body, basic_auth(*reader))})
    return rows


def fuzz(base: str, paths: list[str], credentials: dict[str, str], n: int, seed: int = 0) -> list[dict]:
    """``n`` malformed requests at ``base`` (wrong methods, broken or oversized headers,
    broken, binary or huge bodies, odd paths), half of them with ``credentials``; each
    row is the request and the status (0: the server closed the connection, as it may for a
    request it will not parse).  Bounded: a few seconds per server."""
    import http.client
    import random
    from urllib.parse import urlsplit

    rng = random.Random(seed)
    host, port = urlsplit(base).hostname, urlsplit(base).port
    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"]
    odd_paths = ["/", "/%00", "/../../etc/passwd", "/" + "a" * 4000, "/api/%ff%fe", "//", "/?" + "x=1&" * 500]
    auth_headers = ["Basic", "Basic ###", "Basic " + base64.b64encode(b"no-colon").decode(), "Bearer",
                    "Bearer " + "x" * 5000, "Digest x", "\u00e9t\u00e9"]
    bodies = [b"", b"{", b"[]", b"null", b'{"name": 1e999}', bytes(range(256)), b"{" * 10000,
              json.dumps({"x": "y" * (2 << 20)}).encode(), b'{"name": "\\ud800"}']
    rows = []
    for i in range(n):
        method, path = rng.choice(methods), rng.choice(paths + odd_paths)
        headers = dict(credentials) if i % 2 else {}
        if rng.random() < 0.5:
            headers["Authorization"] = rng.choice(auth_headers)
        if rng.random() < 0.3:
            headers["Content-Type"] = rng.choice(["application/json", "text/plain", "multipart/form-data", "\x00"])
        if rng.random() < 0.1:
            headers["X-Big"] = "b" * 9000
        body = rng.choice(bodies) if method not in ("GET", "HEAD") or rng.random() < 0.2 else None
        conn = http.client.HTTPConnection(host, port, timeout=30)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            for k, v in headers.items():
                conn.putheader(k, v.encode("latin-1", "replace"))
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            status = conn.getresponse().status
        except (http.client.HTTPException, OSError):
            status = 0
        finally:
            conn.close()
        rows.append({"method": method, "path": path[:60], "headers": sorted(headers), "body_bytes":
                     None if body is None else len(body), "status": status})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| server | what | call | caller | expected | observed |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r["expected"] == r["observed"] else " **(!)**"
        lines.append(f"| {r['server']} | {r['kind']} | `{r['method']} {r['path']}` | {r['caller']} | {r['expected']} | "
                     f"{r['observed']}{mark} |")
    return "\n".join(lines)


def node(services: Services) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": services.tracking_uri, "PREFECT_API_URL": services.prefect_api_url,
            **services.credentials()}


def cost(tmp: Path, pairs: int, extra: list[str], open_services: Services, guarded: Services) -> dict:
    plain, authed = [], []
    for i in range(pairs):  # alternate which goes first, so drift over time hits both alike
        order = [("open", open_services, plain), ("auth", guarded, authed)]
        for kind, services, out in order if i % 2 == 0 else order[::-1]:
            own = [*extra, "--set", f"tracking.experiment=auth-bench-{kind}{i}"]  # no champion to compare with
            out.append(timed(tmp / f"{kind}{i}", node(services), own, tmp / f"{kind}{i}.log"))
    return {"pairs": pairs, "open_s": plain, "auth_s": authed,
            "auth_over_open": statistics.mean(authed) / statistics.mean(plain),
            "paired_ratios": [a / o for a, o in zip(authed, plain)]}


def team(root: Path, auth: bool) -> Services:
    return Services(root, Ports(postgres=free_port(), mlflow=free_port(), prefect=free_port()), auth=auth)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_args, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--pairs", type=int, default=3, help="open/auth pipeline pairs (default 3)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="passed to metadistill run")
    args = parse_args(parser, argv, SMOKE)
    extra = [x for o in args.overrides for x in ("--set", o)]
    tmp = team_folder("md-auth-")
    open_services, guarded = team(tmp / "open", False), team(tmp / "auth", True)
    started = []
    try:
        for services in (open_services, guarded):
            services.start()
            started.append(services)
        prepare_probe(guarded, ("reader", "reader-password"))
        rows = refusals(guarded, reader=("reader", "reader-password"))
        start = time.perf_counter()
        result = {"refusals": rows, "all_as_expected": all(r["expected"] == r["observed"] for r in rows),
                  "cost": cost(tmp, args.pairs, extra, open_services, guarded), "settings": args.overrides,
                  "cpus": os.cpu_count()}
        result["cost"]["wall_s"] = time.perf_counter() - start
    finally:
        for services in started:
            services.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result["targets"] = {"auth_over_open_max": 1.05}
    result["met"] = {"refusals": result["all_as_expected"], "cost": result["cost"]["auth_over_open"] <= 1.05}
    write_json(Path(args.json), result)
    print(markdown(rows))
    print({k: result["cost"][k] for k in ("open_s", "auth_s", "auth_over_open")}, result["met"], file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
