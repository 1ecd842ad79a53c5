"""Intra-op threads that fit the machine as it is, not as it was built.

A CPU-bound process beside ours (a laptop's browser, a shared box, a CI runner) holds a
core; torch's OpenMP threads then wait for it and a two-thread step collapses.  Measured
on the 2-core reference machine (resnet8 steps/s, ``docs/benchmarks/busy_machine.json``):
idle, 2 threads 158 and 1 thread 119 on digits, 21.0 and 11.7 on 32x32 images; beside one
busy process, 2 threads 43 and 3.2, 1 thread 122 and 11.7.  Passive OpenMP waits (threads
sleep instead of spinning) rescued only part of that (40 and 8.1) and cost a third to two
thirds when idle (50 and 14.9), so the waiting stays as it is and the count adapts: each
process gets its share of the usable CPUs that are free when it starts.
Runs that overlap on one project home (two schedules firing together) also split the
cores between them: each leaves its pid under ``runs/`` of the home, and every training
stage re-fits its count to the cores over the runs alive at that moment (one thread each
when there are more runs than cores, which time-share without OpenMP's waits).
``dist.threads`` sets the count by hand.
"""

from __future__ import annotations

import atexit
import os
import time

from pipelines.common.home import project_home
from pipelines.common.proc import pid_exists, stat_fields


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _cpu_times(cpus: list[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) clock ticks of each CPU in ``cpus``, from /proc/stat."""
    times = {}
    with open("/proc/stat") as fh:
        for line in fh:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(v) for v in fields[:8]]
                idle = values[3] + values[4]  # idle + iowait
                times[int(name[3:])] = (sum(values) - idle, sum(values))
    return times


def _own_ticks() -> int:
    """This process's user + system clock ticks so far (its threads included)."""
    fields = stat_fields()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


class CpuSample:
    """Busy time of the usable CPUs from now until :meth:`free` is called, less this
    process's own: started before slow start-up work (imports, config checks), it measures
    the machine over that work at no extra wait."""

    def __init__(self, cpus: list[int] | None = None):
        self.cpus = cpus or usable_cpus()
        self.start = time.monotonic()
        try:
            self.before, self.own_before = _cpu_times(self.cpus), _own_ticks()
        except (OSError, ValueError, IndexError):  # no /proc: assume the machine is ours
            self.before = None

    def free(self, min_s: float = 0.3) -> float:
        """How many of the CPUs other processes left idle since the start (at least
        ``min_s`` of it, waiting for the rest)."""
        if self.before is None:
            return float(len(self.cpus))
        time.sleep(max(0.0, min_s - (time.monotonic() - self.start)))
        after, own_after = _cpu_times(self.cpus), _own_ticks()
        cpus = [c for c in self.before if c in after]
        spans = [max(1, after[c][1] - self.before[c][1]) for c in cpus]
        busy = sum((after[c][0] - self.before[c][0]) / span for c, span in zip(cpus, spans))
        busy -= (own_after - self.own_before) / (sum(spans) / max(1, len(spans)))
        return min(float(len(self.cpus)), max(0.0, len(self.cpus) - busy))


def free_cpus(cpus: list[int] | None = None, sample_s: float = 0.3) -> float:
    """How many of ``cpus`` other processes leave idle, measured over ``sample_s``."""
    return CpuSample(cpus).free(sample_s)


def auto_threads(processes: int = 1, free: float | None = None) -> int:
    """Intra-op threads for each of ``processes`` local processes: their share of the usable
    CPUs that are free (one at least half idle counts as free), at least one."""
    cpus = usable_cpus()
    free = free_cpus(cpus) if free is None else free
    return max(1, min(len(cpus), int(free + 0.5)) // processes)


_budget: int | None = None  # this run's automatic thread count at start; None: chosen by hand


def fit_threads(chosen: int | None, sample: CpuSample | None = None) -> tuple[int, str]:
    """This run's intra-op threads, and why: ``chosen`` (``dist.threads``), else the CPUs
    other processes left free since ``sample`` started, capped by this run's share over the
    runs on the home.  Counts this process among those runs (once)."""
    import torch

    join_home_runs()
    if chosen:
        torch.set_num_threads(chosen)
        share_threads(None)
        return chosen, "dist.threads"
    free = (sample or CpuSample()).free()
    threads, runs = share_threads(auto_threads(1, free)), home_runs()
    return threads, f"{free:.1f} of {len(usable_cpus())} usable CPUs free" + (f", {runs} runs on this home" if runs > 1 else "")


_joined = False  # whether this process counts itself among the home's runs


def join_home_runs() -> None:
    """Count this process among the runs on the project home until it exits."""
    global _joined
    if _joined:
        return
    _joined = True
    folder = project_home() / "runs"
    folder.mkdir(exist_ok=True)
    mine = folder / str(os.getpid())
    mine.touch()
    atexit.register(mine.unlink, missing_ok=True)


def home_runs() -> int:
    """Runs alive on the project home now, this one included (a killed run's file is removed)."""
    folder = project_home() / "runs"
    alive = 0
    for entry in folder.glob("*") if folder.is_dir() else []:
        if not entry.name.isdigit():  # not a pid: not ours
            continue
        if pid_exists(int(entry.name)):
            alive += 1
        else:
            entry.unlink(missing_ok=True)
    return max(1, alive)


def share_threads(auto: int | None) -> int:
    """This run's intra-op threads: ``auto`` (the free CPUs at start) capped by its share of
    the usable CPUs over the runs alive on the home; ``auto=None`` keeps a count chosen by
    hand.  Remembers ``auto`` for :func:`refit_threads`."""
    import torch  # here: the CPU sample above starts before torch's import

    global _budget
    _budget = auto
    if auto is None:
        return torch.get_num_threads()
    threads = max(1, min(auto, len(usable_cpus()) // home_runs()))
    torch.set_num_threads(threads)
    return threads


def refit_threads() -> int:
    """At the start of a training stage: the share again, as runs came or went."""
    return share_threads(_budget)


def joined() -> bool:
    """Whether this process already fitted its threads (the CLI does before the flow starts)."""
    return _joined
