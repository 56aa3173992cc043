"""Argument helpers shared by nets and sparse layers on both sides."""

from __future__ import annotations

import numbers
from typing import Any


def triple(value: Any, name: str, *, kind: type = int, minimum: int = 1, scalar: bool = True,
           axes: str = "x, y, z") -> tuple:
    """``value`` as a tuple of three numbers, one per axis, each checked.

    ``kind=int``: integers (bools refused) of at least ``minimum``; ``kind=float``: real numbers
    above 0, returned as floats. With ``scalar`` one number stands for all three axes; without,
    exactly three are needed. ``name`` and ``axes`` (the axis order, e.g. ``"D, H, W"``) go into
    the ``ValueError`` raised for anything else, which names what was expected and what came.
    """
    if kind not in (int, float):
        raise TypeError(f"kind must be int or float, got {kind!r}")
    if kind is int:
        each, many = ("a positive integer", "positive integers") if minimum == 1 else \
            (f"an int >= {minimum}", f"ints >= {minimum}")
    else:
        each, many = "a positive number", "positive numbers"
    shown = list(value) if isinstance(value, (list, tuple)) else value
    if scalar:
        message = f"{name} must be {each} or three {many} ({axes}), got {shown}"
    else:
        message = f"{name} needs three {many} ({axes}), got {shown}"
    if scalar and _is_number(value, kind):
        values = (value,) * 3
    elif isinstance(value, (list, tuple)) or _is_array(value):
        values = tuple(value)
    else:
        raise ValueError(message)
    if len(values) != 3 or not all(_is_number(v, kind) for v in values):
        raise ValueError(message)
    if kind is int:
        out = tuple(int(v) for v in values)
        if min(out) < minimum:
            raise ValueError(message)
        return out
    out = tuple(float(v) for v in values)
    if not min(out) > 0:  # NaN fails too
        raise ValueError(message)
    return out


def _is_number(v: Any, kind: type) -> bool:
    """An integer (``kind=int``) or real number: Python's, numpy's or a 0-d tensor; never a bool."""
    if isinstance(v, bool) or "bool" in str(getattr(v, "dtype", "")) or getattr(v, "ndim", 0) != 0:
        return False
    if kind is int:
        return hasattr(type(v), "__index__")
    return isinstance(v, numbers.Real) or (hasattr(type(v), "__float__") and not isinstance(v, (str, bytes)))


def _is_array(v: Any) -> bool:
    # a numpy array or torch tensor of three values, without importing either
    return getattr(v, "ndim", None) == 1
