"""Secrets kept in files (a password, an auth string, a bearer token) and the rule that
nothing listens beyond this machine without one.

A secret is made once (``secrets.token_urlsafe``), written with mode 600 by an exclusive
create (never over an existing file), and read back only from a file no one else can read:
never from a command line, where ``ps`` shows it to every user of the machine.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path


class AuthRequired(ValueError):
    """A server asked to listen beyond loopback without authentication, or a secret file
    that cannot be used: the message names the flag or the file."""


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server to this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it resolves to whatever DNS says, so not loopback
        return False


def made_secret(path: Path, prefix: str = "") -> str:
    """The secret in ``path``, made now (mode 600, ``prefix`` + random) if the file does not
    exist yet."""
    path = Path(path)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: read theirs
            return read_secret(path, "the secret")
        with os.fdopen(fd, "w") as fh:
            fh.write(prefix + secrets.token_urlsafe(32))
    return read_secret(path, "the secret")


def read_secret(path: Path, what: str) -> str:
    """The secret in ``path``: it must exist, be readable by its owner only and not be empty."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AuthRequired(f"{what} file {path} does not exist")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise AuthRequired(f"{what} file {path} is readable by others (mode {mode:03o}): `chmod 600 {path}`")
    text = path.read_text().strip()
    if not text:
        raise AuthRequired(f"{what} file {path} is empty")
    return text
