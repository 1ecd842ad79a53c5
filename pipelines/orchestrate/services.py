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

With ``auth`` (on whenever the servers listen beyond loopback; ``metadistill services``
refuses ``--no-auth`` there) nobody who merely reaches a port can use them:

- MLflow runs its ``basic-auth`` app, users and permissions in the ``mlflow_auth``
  database; the ``admin`` user is created on first start with a generated password kept in
  ``<home>/services/mlflow_admin_password`` (mode 600).  Unauthenticated calls get 401;
  what an authenticated user may do is their permission (README: Team set-up, roles).
- Prefect asks every API call for its auth string (``PREFECT_SERVER_API_AUTH_STRING``),
  generated once into ``<home>/services/prefect_auth_string`` (mode 600).
- Secrets go to the servers through files and their environment, never a command line;
  :meth:`Services.env` names the files a node reads them from, never the secrets.

All three stop together when the command is interrupted.  Plain functions and
subprocesses: nothing here imports MLflow or Prefect.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pipelines.common.net import outward_address, wait_http
from pipelines.common.secrets import AuthRequired, is_loopback, made_secret


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
    auth: bool | None = None  # None: on exactly when the servers listen beyond loopback
    advertise: str | None = None  # the address other machines use (default: the bind address, or this host's name)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.processes: dict[str, subprocess.Popen] = {}
        beyond = not is_loopback(self.ports.host)
        if self.auth is None:
            self.auth = beyond
        elif beyond and not self.auth:
            raise AuthRequired(f"services --host {self.ports.host} listens beyond this machine: without "
                               f"authentication anyone who reaches the ports could log runs, move the champion "
                               f"or start flow runs; drop --no-auth, or bind 127.0.0.1")

    @property
    def cluster(self) -> Path:
        return self.root / "postgres"

    def password(self) -> str:
        """PostgreSQL's password for the ``metadistill`` role."""
        return made_secret(self.root / "password")

    @property
    def admin_password_file(self) -> Path:
        """MLflow's ``admin`` password (auth on): made once, mode 600."""
        return self.root / "mlflow_admin_password"

    @property
    def auth_string_file(self) -> Path:
        """The Prefect server's auth string (auth on), ``metadistill:<secret>``, mode 600."""
        return self.root / "prefect_auth_string"

    def auth_string(self) -> str:
        return made_secret(self.auth_string_file, prefix="metadistill:")  # Prefect's user:password form

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

    @functools.cached_property
    def address(self) -> str:  # cached: the host's name may take a DNS lookup
        """Where clients reach the servers: ``advertise``, else the bind address, else (bound
        to every interface, which no client can connect to by name) this host's name."""
        if self.advertise:
            return self.advertise
        return reachable_name() if self.ports.host in ("0.0.0.0", "::", "") else self.ports.host

    @property
    def tracking_uri(self) -> str:
        return f"http://{self.address}:{self.ports.mlflow}"

    @property
    def prefect_api_url(self) -> str:
        return f"http://{self.address}:{self.ports.prefect}/api"

    def local_url(self, port: int) -> str:
        """This machine's own way to a server, whatever the servers are called outside."""
        return f"http://{'127.0.0.1' if not is_loopback(self.address) else self.address}:{port}"

    @property
    def local_tracking_uri(self) -> str:
        return self.local_url(self.ports.mlflow)

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
        for database in ("mlflow", "prefect", "optuna", "mlflow_auth"):
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
    def mlflow_command(self) -> tuple[list[str], dict[str, str]]:
        artifacts = self.root / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        # the store's URL holds PostgreSQL's password: through the environment, not the
        # command line, which `ps` shows every user of the machine
        cmd = [sys.executable, "-m", "mlflow", "server",
               "--serve-artifacts", "--artifacts-destination", str(artifacts),
               "--default-artifact-root", "mlflow-artifacts:/",
               "--host", self.ports.host, "--port", str(self.ports.mlflow), "--workers", "2"]
        if not is_loopback(self.address):  # MLflow refuses Host headers it does not know: name ours
            names = dict.fromkeys(n for n in ["localhost", "127.0.0.1", self.address, _resolved(self.address)] if n)
            cmd += ["--allowed-hosts", ",".join(f"{n},{n}:*" for n in names)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_AUTH")}
        env["MLFLOW_BACKEND_STORE_URI"] = self.database_url("mlflow")
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
            env["MLFLOW_AUTH_CONFIG_PATH"] = str(self._auth_config())
            # signs the UI's CSRF tokens; one per home, the same across restarts and workers
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = made_secret(self.root / "mlflow_secret_key")
        return cmd, env

    def _auth_config(self) -> Path:
        """The basic-auth app's settings (mode 600: they hold the database's password):
        users and permissions in PostgreSQL; an authenticated user may read every
        experiment and model unless given more (README: Team set-up, roles)."""
        path = self.root / "mlflow_auth.ini"
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            # auth_cache_ttl_seconds: a password's hash (PBKDF2, tens of ms) is checked once a
            # minute per worker, not on every request: without it a pipeline run took 1.32x as
            # long (benchmarks/team_auth.py).  The price: a changed password or a deleted user
            # is refused by every worker only within that minute.
            fh.write("[mlflow]\ndefault_permission = READ\n"
                     f"database_uri = {self.database_url('mlflow_auth')}\nadmin_username = admin\n"
                     f"admin_password = {made_secret(self.admin_password_file)}\n"
                     "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                     "auth_cache_ttl_seconds = 60\n")
        return path

    def prefect_command(self) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_HOME": str(self.root / "prefect"),
               "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url("prefect", "postgresql+asyncpg")}
        env.pop("PREFECT_API_URL", None)
        env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
        if self.auth:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.auth_string()
        return ([sys.executable, "-m", "prefect", "server", "start", "--host", self.ports.host,
                 "--port", str(self.ports.prefect)], env)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.root / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def start_mlflow(self) -> None:
        self._spawn("mlflow", *self.mlflow_command())
        self._wait("mlflow")

    def start_prefect(self) -> None:
        self._spawn("prefect", *self.prefect_command())
        self._wait("prefect")

    def _wait(self, name: str, timeout: float = 180.0) -> None:
        """Until server ``name`` answers its health route (neither asks for credentials)."""
        url = {"mlflow": f"{self.local_tracking_uri}/health",
               "prefect": f"{self.local_url(self.ports.prefect)}/api/health"}[name]
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
            self._spawn("mlflow", *self.mlflow_command())
            self._spawn("prefect", *self.prefect_command())
            self._wait("mlflow")
            self._wait("prefect")
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
        """What a node sets to use these servers.  With auth, the credentials are read from
        their files by the shell (``$(cat FILE)``): the values printed hold no secret."""
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri, "PREFECT_API_URL": self.prefect_api_url,
               "METADISTILL_STUDY_STORAGE": self.study_storage, "PGPASSFILE": str(self.pgpass())}
        if self.auth:
            self.auth_string()
            made_secret(self.admin_password_file)
            env.update({"MLFLOW_TRACKING_USERNAME": "admin",
                        "MLFLOW_TRACKING_PASSWORD": f'"$(cat {self.admin_password_file})"',
                        "PREFECT_API_AUTH_STRING": f'"$(cat {self.auth_string_file})"'})
        return env

    def credentials(self) -> dict[str, str]:
        """The admin's credentials as variables, for a process started here (tests, the
        benchmark): what a node's shell gets from :meth:`env`'s ``$(cat ...)``."""
        if not self.auth:
            return {}
        return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": made_secret(self.admin_password_file),
                "PREFECT_API_AUTH_STRING": self.auth_string()}


def reachable_name() -> str:
    """A name or address other machines can reach this one by: its fully qualified name when
    that resolves beyond loopback, else the address of the interface that routes outwards."""
    name = socket.getfqdn()
    if not is_loopback(_resolved(name) or "127.0.0.1"):
        return name
    address = outward_address()
    if address is None:
        raise ServicesError(f"this machine's name ({name}) resolves to loopback and no interface routes outwards: "
                            f"give --advertise with the address other machines reach it by")
    return address


def _resolved(name: str) -> str | None:
    try:
        return socket.gethostbyname(name)
    except OSError:
        return None


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
