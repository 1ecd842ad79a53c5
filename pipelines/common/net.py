"""Networking helpers shared by the launcher, the team servers, the tests and the benchmarks."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, alive: Callable[[], bool] = lambda: True,
              why: Callable[[], str] = str) -> None:
    """Poll ``url`` until it answers; fail early with ``why()`` if ``alive()`` turns false."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if not alive():
                raise RuntimeError(f"{url}: the server exited before answering\n{why()}") from None
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:  # refused, unreachable, timed out, or an HTTP error status
        return False


def outward_address() -> str | None:
    """The address of the interface this machine's default route leaves by (None: no
    route).  A UDP socket's connect only looks the route up: no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.254", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def status_of(url: str, method: str = "GET", body: dict | None = None, headers: dict[str, str] | None = None,
              raw: bytes | None = None, timeout: float = 30) -> int:
    """The HTTP status ``method url`` answers with (a JSON ``body``, or ``raw`` bytes)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    sent = {**({"content-type": "application/json"} if data is not None else {}), **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=sent)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def basic_auth(user: str, password: str) -> dict[str, str]:
    """The ``authorization`` header of HTTP basic authentication."""
    import base64

    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
