"""What /proc says about a process (Linux): its stat fields, its start, whether it lives."""

from __future__ import annotations

import os
from pathlib import Path


def stat_fields(pid: int | str = "self") -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (field 3 first): the name
    sits in parentheses and may hold spaces and parentheses itself.  OSError when it is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_start(pid: int) -> str | None:
    """The process's start in clock ticks since boot, or None when it is gone (or no /proc)."""
    try:
        return stat_fields(pid)[19]  # field 22
    except OSError:
        return None


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (any user's): signal 0 checks without sending."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def alive(pid: int, start: str) -> bool:
    """Whether process ``pid`` that started at ``start`` lives: the same pid with the same start
    (Linux: a reused pid is not taken for it); elsewhere, whether the pid exists."""
    if Path("/proc/self/stat").exists():
        return process_start(pid) == start
    return pid_exists(pid)
