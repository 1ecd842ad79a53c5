"""Intra-op threads that fit the machine as it is, not as it was built.

A CPU-bound process beside ours (a laptop's browser, a shared box, a CI runner) holds a
core; torch's OpenMP threads then wait for it and a two-thread step collapses.  Measured
on the 2-core reference machine (resnet8 steps/s, ``docs/benchmarks/busy_machine.json``):
idle, 2 threads 158 and 1 thread 119 on digits, 21.0 and 11.7 on 32x32 images; beside one
busy process, 2 threads 43 and 3.2, 1 thread 122 and 11.7.  Passive OpenMP waits (threads
sleep instead of spinning) rescued only part of that (40 and 8.1) and cost a third to two
thirds when idle (50 and 14.9), so the waiting stays as it is and the count adapts: each
process gets its share of the usable CPUs that are free when it starts.
``dist.threads`` sets the count by hand.
"""

from __future__ import annotations

import os
import time


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
    with open("/proc/self/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


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
