"""OpenMP settings that keep two medvit jobs on one machine from stalling each other.

Torch's CPU kernels (and MKL's and oneDNN's) run on GNU OpenMP. By default a libgomp thread
that reaches a barrier spins for a while before it sleeps. With one job per machine that saves a
wake-up; with two jobs sharing the cores, a thread spins on a core while the thread it waits for
is descheduled behind the other job's spinning threads, and a net of many small ops (the point
nets most of all) stalls at every op. ``OMP_WAIT_POLICY=PASSIVE`` makes waiting threads sleep at
once. ``bench/two_jobs.py`` measures both policies alone and two at once.

The variables are read once, when torch loads libgomp, so :func:`apply_openmp_defaults` must run
before the first ``import torch``; the ``medvit`` command does that first thing. A variable the
user set (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``) is left as it is.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# either one states the user's own choice of how waiting threads behave
_USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def openmp_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """The variables medvit adds to ``env``: none where the user chose a wait policy."""
    if any(k in env for k in _USER_KNOBS):
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_openmp_defaults() -> bool:
    """Set :func:`openmp_defaults` in this process's environment; ``False`` where torch is already
    imported (its OpenMP runtime has read the environment, so a change would not take effect)."""
    if "torch" in sys.modules:
        return False
    os.environ.update(openmp_defaults(os.environ))
    return True
