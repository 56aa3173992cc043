"""CPU runtimes for the volume nets: torch, OpenVINO or ONNX Runtime behind one predictor.

:func:`compile_predictor` is the entry point; :mod:`medvit.runtimes.predictor` documents the
contract (static shapes, the check against torch, the fallback, ``auto``) and
:mod:`medvit.runtimes.cache` the cache layout. OpenVINO and ONNX Runtime come with the
``cpu-runtimes`` extra (``pip install 'medvit[cpu-runtimes]'``); without it only torch runs.
"""

from medvit.runtimes.backends import CONVERTED, RUNTIMES, missing_packages
from medvit.runtimes.cache import default_cache_dir
from medvit.runtimes.predictor import (
    RTOL,
    Predictor,
    check_input,
    compile_predictor,
    cpu_threads,
    state_sha256,
)

__all__ = ["CONVERTED", "RTOL", "RUNTIMES", "Predictor", "available_runtimes", "check_input", "compile_predictor",
           "cpu_threads", "default_cache_dir", "missing_packages", "state_sha256"]


def available_runtimes() -> list[str]:
    """The runtimes whose packages are installed: torch always, then OpenVINO and ONNX Runtime."""
    return ["torch", *(r for r in CONVERTED if not missing_packages(r))]
