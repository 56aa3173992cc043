"""Type checks for net options from a YAML config, shared by the volume and point-cloud registries.

A net's constructor annotations say what each option takes; these helpers check a config value
against the simple ones (int, float, bool, str, sequences and unions of them) and leave the rest
alone. Kept apart from ``medvit.nets`` so that the point-cloud side can use them without
importing MONAI's nets.
"""

from __future__ import annotations

import collections.abc
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from medvit.core.errors import ConfigError


def check_option(key: str, value: Any, hints: Mapping[str, Any]) -> None:
    """Raise a ConfigError naming ``model.options.<key>`` when ``value`` does not fit its hint."""
    hint = hints.get(key)
    if hint is not None and conforms(value, hint) is False:
        raise ConfigError(f"model.options.{key}: expected {describe_hint(hint)}, got {value!r}")


def type_hints(fn: Callable) -> dict[str, Any]:
    # MONAI writes its annotations as strings (``from __future__ import annotations``); resolve them
    # in the constructor's module. One that does not resolve is simply not checked.
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError, AttributeError):
        return {}


_SEQUENCES = (tuple, list, collections.abc.Sequence)


def conforms(value: Any, hint: Any) -> bool | None:
    """True/False when ``hint`` is simple enough to check; None when it is not (the value passes)."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [conforms(value, h) for h in typing.get_args(hint)]
        if any(v is None for v in verdicts):
            return None
        return any(verdicts)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        # YAML gives lists where MONAI writes tuple or Sequence
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) != 1:
            return None if args else True
        verdicts = [conforms(v, args[0]) for v in value]
        return None if any(v is None for v in verdicts) else all(verdicts)
    return None


def describe_hint(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe_hint(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {describe_hint(args[0])}" if len(args) == 1 else "a list"
    return getattr(hint, "__name__", str(hint))
