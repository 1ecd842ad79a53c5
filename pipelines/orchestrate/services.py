"""The team's servers, started together: PostgreSQL, the MLflow tracking server on it and
the Prefect server on it (``metadistill services``).

- PostgreSQL: a cluster of Debian's package under ``<home>/services/postgres``, listening on
  127.0.0.1 only, password authentication (the password is made once and kept, readable by
  its owner only, in ``<home>/services/password``).  PostgreSQL refuses to run as root; run
  as root, the cluster belongs to and runs as ``--pg-user`` (Debian's ``postgres``).
- ``mlflow server``: backend store on the ``mlflow`` database, ``--serve-artifacts`` into
  ``<home>/services/artifacts``: clients send and fetch artifacts over HTTP, so a node
  that sees only the server can log runs and load the champion.
- ``prefect server start`` on the ``prefect`` database (``postgresql+asyncpg``).

All three stop together when the command is interrupted.  Plain functions and
subprocesses: nothing here imports MLflow or Prefect.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.common.net import wait_http


class ServicesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Ports:
    host: str = "127.0.0.1"  # the MLflow and Prefect servers'; PostgreSQL listens on loopback only
    postgres: int = 5433  # not 5432: a system cluster may hold it
    mlflow: int = 5000
    prefect: int = 4200


def pg_bin(tool: str) -> str:
    """A PostgreSQL server program (``initdb``, ``pg_ctl``): on PATH, else Debian's newest."""
    found = shutil.which(tool)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=lambda p: int(p.parts[-3]))
    if not versions:
        raise ServicesError(f"PostgreSQL's {tool} is not installed: `apt-get install postgresql` (Debian) or put "
                            f"its bin folder on PATH")
    return str(versions[-1])


@dataclass
class Services:
    """The servers of one project home; :meth:`start` brings them up, :meth:`stop` down."""

    root: Path  # <home>/services
    ports: Ports = Ports()
    pg_user: str = "postgres"  # who runs PostgreSQL when this process is root

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.processes: dict[str, subprocess.Popen] = {}

    @property
    def cluster(self) -> Path:
        return self.root / "postgres"

    def password(self) -> str:
        path = self.root / "password"
        if not path.is_file():
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(24))
        return path.read_text().strip()

    def database_url(self, database: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://metadistill:{self.password()}@127.0.0.1:{self.ports.postgres}/{database}"

    @property
    def study_storage(self) -> str:
        """The architecture search's study database (Optuna's relational storage), with no
        password in it: libpq reads that from :meth:`pgpass`, so the URL can be printed."""
        return f"postgresql+psycopg2://metadistill@127.0.0.1:{self.ports.postgres}/optuna"

    def pgpass(self) -> Path:
        """A libpq password file (mode 600) for the study database: PGPASSFILE names it."""
        path = self.root / "pgpass"
        if not path.is_file():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"127.0.0.1:{self.ports.postgres}:optuna:metadistill:{self.password()}\n")
        return path

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.ports.host}:{self.ports.mlflow}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.prefect}/api"

    # ------------------------------------------------------------------ PostgreSQL
    def _as_pg(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", self.pg_user, "--", *cmd] if os.geteuid() == 0 else cmd

    def _pg(self, cmd: list[str], what: str) -> None:
        done = subprocess.run(self._as_pg(cmd), capture_output=True, text=True)
        if done.returncode != 0:
            raise ServicesError(f"{what} failed (exit {done.returncode}): {(done.stderr or done.stdout).strip()[-1500:]}")

    def init_postgres(self) -> None:
        """Create the cluster once: loopback only, scram passwords, its own socket folder."""
        if (self.cluster / "PG_VERSION").is_file():
            return
        self.cluster.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password())
        if os.geteuid() == 0:
            import pwd

            entry = pwd.getpwnam(self.pg_user)
            for path in (self.cluster, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            self._check_reachable(entry.pw_uid)
        try:
            self._pg([pg_bin("initdb"), "-D", str(self.cluster), "-U", "metadistill", "--auth=scram-sha-256",
                      f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions"], "initdb")
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.cluster / "postgresql.conf", "a") as fh:  # the port is given at each start
            fh.write(f"\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.cluster}'\n")

    def _check_reachable(self, uid: int) -> None:
        """As root, the cluster's owner must be able to walk down to it."""
        for folder in [*reversed(self.cluster.parents), self.cluster]:
            stat = folder.stat()
            if stat.st_uid != uid and not stat.st_mode & 0o001:
                raise ServicesError(f"PostgreSQL runs as {self.pg_user!r} (it refuses root), who cannot enter {folder}: "
                                    f"put the project home (METADISTILL_HOME) where {self.pg_user!r} can reach it, "
                                    f"or `chmod o+x {folder}`")

    def start_postgres(self) -> None:
        self.init_postgres()
        self._pg([pg_bin("pg_ctl"), "-D", str(self.cluster), "-l", str(self.cluster / "server.log"), "-w", "-t", "60",
                  "-o", f"-p {self.ports.postgres}", "start"], f"starting PostgreSQL (log: {self.cluster / 'server.log'})")
        for database in ("mlflow", "prefect", "optuna"):
            self._create_database(database)

    def _create_database(self, name: str) -> None:
        import psycopg2

        dsn = self.database_url("postgres").replace("+psycopg2", "")
        with contextlib.closing(psycopg2.connect(dsn)) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')

    def stop_postgres(self) -> None:
        if (self.cluster / "postmaster.pid").is_file():
            subprocess.run(self._as_pg([pg_bin("pg_ctl"), "-D", str(self.cluster), "-m", "fast", "-w", "stop"]),
                           capture_output=True)

    # ------------------------------------------------------------------ MLflow and Prefect
    def mlflow_command(self) -> list[str]:
        artifacts = self.root / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.database_url("mlflow"),
                "--serve-artifacts", "--artifacts-destination", str(artifacts),
                "--default-artifact-root", "mlflow-artifacts:/",
                "--host", self.ports.host, "--port", str(self.ports.mlflow), "--workers", "2"]

    def prefect_command(self) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(self.root / "prefect"),
               "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url("prefect", "postgresql+asyncpg")}
        env.pop("PREFECT_API_URL", None)
        return ([sys.executable, "-m", "prefect", "server", "start", "--host", self.ports.host,
                 "--port", str(self.ports.prefect)], env)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start_mlflow(self) -> None:
        self._spawn("mlflow", self.mlflow_command())
        self._wait(f"{self.tracking_uri}/health", "mlflow")

    def _wait(self, url: str, name: str, timeout: float = 180.0) -> None:
        log = self.root / f"{name}.log"
        try:
            wait_http(url, timeout, lambda: self.processes[name].poll() is None, lambda: log_tail(log))
        except RuntimeError as exc:  # it exited, or never answered
            raise ServicesError(f"the {name} server did not come up (log: {log}): {exc}") from None

    def start(self) -> None:
        """PostgreSQL, then the two servers on it, booting side by side; on any failure what
        started is stopped."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self.start_postgres()
            self._spawn("mlflow", self.mlflow_command())
            self._spawn("prefect", *self.prefect_command())
            self._wait(f"{self.tracking_uri}/health", "mlflow")
            self._wait(f"{self.prefect_api_url}/health", "prefect")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for name in ("prefect", "mlflow"):
            proc = self.processes.pop(name, None)
            if proc is not None:
                stop_group(proc)
        self.stop_postgres()

    def env(self) -> dict[str, str]:
        """What a node sets to use these servers."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "PREFECT_API_URL": self.prefect_api_url,
                "METADISTILL_STUDY_STORAGE": self.study_storage, "PGPASSFILE": str(self.pgpass())}


def log_tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM to the server's process group (its workers too), SIGKILL if it lingers."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
