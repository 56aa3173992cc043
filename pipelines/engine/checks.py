"""Checks of the inference options, each in one place (numpy and torch free, so the tile
planner uses them too).

A ``check_*`` function is for values code passes: it returns the value normalised or raises
``ValueError``/``TypeError`` naming the argument. :func:`check_options` is for the user's
values: the same checks, raised as the one-line :class:`~medvit.core.errors.MedvitError` naming the
command-line option.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from medvit.core.errors import MedvitError


def check_overlap(overlap: Any, name: str = "overlap") -> float:
    """``overlap`` as a float in [0, 1); ValueError (TypeError for a non-number) naming ``name``."""
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(overlap).__name__}")
    if not 0 <= overlap < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {overlap}")
    return float(overlap)


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    """``batch_size`` as an int of at least 1; ValueError (TypeError for a non-integer) naming ``name``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"{name} must be at least 1, got {batch_size}")
    return int(batch_size)


def check_skip_below_hu(value: Any, name: str = "skip_below_hu") -> float | None:
    """None, or ``value`` as a finite float (NaN would skip every window, silently)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite HU value such as -500, got {value}")
    return float(value)


def check_mirror_axes(axes: Any) -> tuple[int, ...]:
    """``axes`` as a tuple of distinct spatial axes among 0, 1, 2 (a negative axis would flip the
    class channel: labels wrong with no error)."""
    try:
        got = tuple(axes)
    except TypeError:
        raise TypeError(f"mirror axes must be a sequence of spatial axes, got {type(axes).__name__}") from None
    if any(isinstance(a, bool) or not isinstance(a, numbers.Integral) or not 0 <= a <= 2 for a in got) \
            or len(set(got)) != len(got):
        raise ValueError(f"mirror axes must be distinct spatial axes among 0, 1, 2, got {got}")
    return tuple(int(a) for a in got)


def check_tile_size(value: Any, name: str = "tile_size") -> float:
    """``value`` as a positive finite float (a tile edge in metres)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of metres, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of metres, got {value}")
    return float(value)


def check_points_budget(value: Any, name: str = "max_points") -> int:
    """``value`` (points a tile and a net call) as an int of at least 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            (isinstance(value, float) and not value.is_integer()):
        raise TypeError(f"{name} must be a whole number of points, got {value!r}")
    if not value >= 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


RUNTIMES = ("torch", "openvino", "onnxruntime", "auto")
"""What runs the volume net (:mod:`medvit.runtimes`): torch itself, an ONNX export on OpenVINO or
ONNX Runtime, or ``auto``, the fastest of them that matches torch."""
CPU_ONLY_RUNTIMES = ("openvino", "onnxruntime")
"""The runtimes that run on the CPU only."""


def check_runtime(value: Any, name: str = "runtime") -> str:
    """``value`` as one of :data:`RUNTIMES`; ValueError (TypeError for a non-string) naming ``name``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if value not in RUNTIMES:
        raise ValueError(f"{name} must be one of {', '.join(RUNTIMES)}, got {value!r}")
    return value


def check_runtime_device(runtime: str, device: str, names: tuple[str, str] = ("runtime", "device")) -> None:
    """ValueError naming both when ``runtime`` runs on the CPU only and ``device`` (``cpu``,
    ``cuda``, ``cuda:N``) is not the CPU."""
    if runtime in CPU_ONLY_RUNTIMES and str(device).split(":")[0] != "cpu":
        raise ValueError(f"{names[0]} {runtime} runs on the CPU only, but {names[1]} is {device}; "
                         f"use {names[1]} cpu or {names[0]} torch")


_OPTION_CHECKS = {"overlap": check_overlap, "batch_size": check_batch_size, "skip_below_hu": check_skip_below_hu,
                  "tile_size": check_tile_size, "max_points": check_points_budget, "runtime": check_runtime}


def check_options(**options: Any) -> None:
    """The user's values of ``--overlap``, ``--batch-size``, ``--skip-below-hu``, ``--tile-size``,
    ``--max-points``, ``--runtime`` (keyword names
    ``overlap``, ``batch_size``, ``skip_below_hu``, ``tile_size``, ``max_points``, ``runtime``; None: not
    given): MedvitError naming the option,
    such as ``--overlap must lie in [0, 1), got 1.5``. With ``runtime`` and ``device`` (``--device``'s
    value) both given, a CPU-only runtime on a GPU is refused naming both options. The commands call
    it before a slow load, and :meth:`InferenceSettings.from_sources` again with the same checks."""
    device = options.pop("device", None)
    for key, value in options.items():
        if value is None:
            continue
        try:
            _OPTION_CHECKS[key](value, "--" + key.replace("_", "-"))
        except (TypeError, ValueError) as e:
            raise MedvitError(str(e)) from None
    if options.get("runtime") is not None and device is not None:
        try:
            check_runtime_device(options["runtime"], device, ("--runtime", "--device"))
        except ValueError as e:
            raise MedvitError(str(e)) from None


def per_axis(value: float | Sequence[float], n: int = 3) -> tuple[float, ...]:
    """``value`` (one overlap, or one per axis) as ``n`` checked overlaps; ValueError otherwise."""
    vals = tuple(value) if isinstance(value, Sequence) else (value,)
    if len(vals) == 1:
        vals *= n
    if len(vals) != n:  # zip would silently plan windows on fewer axes and leave voxels unscored
        raise ValueError(f"overlap must be one value or one per spatial axis ({n}), got {value}")
    return tuple(check_overlap(v) for v in vals)
