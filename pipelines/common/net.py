"""Loopback networking helpers shared by the launcher, the tests and the benchmarks."""

from __future__ import annotations

import socket
import time
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
