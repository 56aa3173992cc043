"""Torch threads that make room for other jobs on the same CPUs.

Torch's CPU kernels (and MKL's and oneDNN's) run on GNU OpenMP, whose threads spin at every
barrier before they sleep. Alone, that spinning is what makes small ops fast; with a second job
on the same cores, a thread spins while the partner it waits for is descheduled behind the other
job's threads, and a net of many small ops (the point nets most of all) stalls at every op. Making
threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``) or sooner (``GOMP_SPINCOUNT``) does not help
on these machines: waking a sleeping thread costs more than the spin it saves, alone and two at
once (``bench/two_jobs.py`` compares them). What helps is fewer threads than there are busy
cores: :class:`AdaptiveThreads` watches how much of the CPUs this process may use other processes
keep busy, and lowers torch's intra-op threads to the cores left (at least one), raising them
again when the others are gone. The training loop and the engine call :meth:`AdaptiveThreads.tick`
once a step or batch; a look at ``/proc/stat`` every :data:`INTERVAL_S` seconds is all it costs.

``MEDVIT_ADAPT_THREADS=0`` turns it off. It never goes above the thread count it started with,
so ``torch.set_num_threads`` or ``OMP_NUM_THREADS`` stay the ceiling, and on leaving the ``with``
block torch's thread count is put back. Outside Linux (no ``/proc/stat``) it does nothing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

INTERVAL_S = 2.0
"""How often the other processes' CPU use is measured."""
_PROC_STAT = Path("/proc/stat")
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
_BUSY_FIELDS = (0, 1, 2, 5, 6)  # user, nice, system, irq, softirq (not idle, iowait or a VM's steal)


def busy_seconds(cpus: set[int], stat: Path = _PROC_STAT) -> float | None:
    """CPU seconds the ``cpus`` have spent busy since boot (every process's), or None without ``/proc/stat``."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            total += sum(int(fields[i]) for i in _BUSY_FIELDS)
    return total * _TICK_S


def own_seconds() -> float:
    """CPU seconds this process's threads have used."""
    t = os.times()
    return t.user + t.system


def threads_left(ceiling: int, others_busy: float) -> int:
    """Torch threads for a process allowed ``ceiling`` of them when other processes keep
    ``others_busy`` cores busy: the cores left, at least one (half a busy core counts as one)."""
    return max(1, min(ceiling, ceiling - int(others_busy + 0.5)))


class AdaptiveThreads:
    """A context manager that fits torch's intra-op threads to the cores other processes leave.

    ``interval_s``: seconds between measurements. ``ceiling``: the most threads it sets (default:
    torch's count on entry). Use ``with AdaptiveThreads() as t:`` around a loop of heavy steps and
    call ``t.tick()`` once a step. ``changes`` lists ``(others_busy, threads)`` at each change.
    """

    def __init__(self, interval_s: float = INTERVAL_S, ceiling: int | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.ceiling = ceiling
        self.changes: list[tuple[float, int]] = []
        self._entered = 0
        self._last: tuple[float, float, float] | None = None

    def __enter__(self) -> AdaptiveThreads:
        self._entered = torch.get_num_threads()
        if self.ceiling is None:
            self.ceiling = self._entered
        try:
            self.cpus = set(os.sched_getaffinity(0))
        except AttributeError:
            self.cpus = set(range(os.cpu_count() or 1))
        on = os.environ.get("MEDVIT_ADAPT_THREADS", "1") != "0" and self.ceiling > 1
        busy = busy_seconds(self.cpus) if on else None
        self._last = None if busy is None else (time.monotonic(), busy, own_seconds())
        return self

    def tick(self) -> int:
        """Measure (at most every ``interval_s``) and set torch's threads; returns the count in force."""
        if self._last is None:
            return torch.get_num_threads()
        now = time.monotonic()
        t0, busy0, own0 = self._last
        if now - t0 < self.interval_s:
            return torch.get_num_threads()
        busy, own = busy_seconds(self.cpus), own_seconds()
        self._last = (now, busy, own)
        others = max(0.0, (busy - busy0) - (own - own0)) / (now - t0)
        want = threads_left(self.ceiling, others)
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
            self.changes.append((round(others, 2), want))
        return want

    def __exit__(self, *exc) -> None:
        if torch.get_num_threads() != self._entered:
            torch.set_num_threads(self._entered)
