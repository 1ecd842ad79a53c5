"""A local Prefect API for one CLI invocation, started before Prefect is imported.

This is what Prefect's own ephemeral mode does (uvicorn serving
``prefect.server.api.server:create_app`` on a free loopback port, database under
``PREFECT_HOME``), with two differences that matter for start-up time: the server boots in
parallel with our torch/MLflow imports, and this process never imports the server code
(about 4 s) because it talks to it through ``PREFECT_API_URL``.  When the user already set
``PREFECT_API_URL``, nothing is started.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from pipelines.common.home import home_lock


class PrefectAPIError(RuntimeError):
    pass


class LocalPrefectAPI:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        # The API creates and migrates its database (under PREFECT_HOME, shared by the runs
        # of one home) as it boots: overlapping runs boot one at a time, the next once the
        # schema is in place.  Released when this one answers (or fails).
        self._booting = contextlib.ExitStack()
        self._booting.enter_context(home_lock("prefect-api-boot"))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
             "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.environ["PREFECT_API_URL"] = self.url
        # This API has no UI and stops with the command: a "View at" link to it would be dead.
        os.environ.setdefault("PREFECT_UI_URL", "")
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = 120.0) -> None:
        try:
            self._wait_ready(timeout)
        finally:
            self._booting.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace")[-2000:] if self.process.stderr else ""
                raise PrefectAPIError(f"the local Prefect API exited with code {self.process.returncode}: {err}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise PrefectAPIError(f"the local Prefect API on {self.url} did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """Send Prefect's queued logs and events first (else ``logging.shutdown`` waits on a
        dead server), then stop the server; every flow state was written before this."""
        self._booting.close()
        if self.process.poll() is not None:
            return
        if "prefect" in sys.modules:
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            for service in (APILogWorker, EventsWorker):
                service.drain_all(timeout=5)
        self.process.terminate()
        try:
            self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
