"""The net registry: a name in ``model.name`` -> a builder that configures one of MONAI's nets.

A builder has the signature ``(in_channels, out_channels, roi_size, **options) -> nn.Module`` and
turns ``model.options`` into constructor keyword arguments through :func:`construct`, which checks
each option against the constructor's signature so a typo or a wrong type names its key.
"""

from __future__ import annotations

import collections.abc
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from medvit.config import ModelConfig
from medvit.errors import ConfigError

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder`` under ``name`` (the value of ``model.name``).

    Example::

        @register("unetr")
        def unetr(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options) -> nn.Module:
            ...
    """

    def deco(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            # two modules claiming one name is a programming error, not a user's
            raise ValueError(f"a net named {name!r} is already registered ({_REGISTRY[name].__module__})")
        _REGISTRY[name] = builder
        return builder

    return deco


def available() -> list[str]:
    """The registered net names, sorted."""
    return sorted(_REGISTRY)


def build_net(cfg: ModelConfig) -> nn.Module:
    """Build the net ``cfg`` names, in training mode with fresh weights.

    The net maps ``(B, cfg.in_channels, *cfg.roi_size)`` to logits ``(B, cfg.out_channels, *cfg.roi_size)``.
    Raises :class:`ConfigError` naming ``model.name``, ``model.roi_size`` or ``model.options.<key>``.
    """
    builder = _REGISTRY.get(cfg.name)
    if builder is None:
        raise ConfigError(f"model.name: unknown net {cfg.name!r}; available: {', '.join(available())}")
    if cfg.out_channels is None:
        raise ConfigError("model.out_channels: not set (a full config sets it to the number of label ids)")
    roi = tuple(int(r) for r in cfg.roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ConfigError(f"model.roi_size: expected three positive sizes, got {list(roi)}")
    for key in ("in_channels", "out_channels", "roi_size"):
        # the builder takes these positionally; as options they would collide
        if key in cfg.options:
            raise ConfigError(f"model.options.{key}: {cfg.name} sets {key} from model.{key}; remove it from the options")
    return builder(cfg.in_channels, cfg.out_channels, roi, **cfg.options)


def check_roi(net_name: str, roi_size: Sequence[int], *, multiple: int = 1, minimum: int = 1) -> None:
    """ConfigError naming ``model.roi_size`` unless every size is a multiple of ``multiple`` and at least ``minimum``."""
    bad = [r for r in roi_size if r % multiple or r < minimum]
    if bad:
        need = [f"a multiple of {multiple}"] if multiple > 1 else []
        need += [f"at least {minimum}"] if minimum > 1 else []
        raise ConfigError(f"model.roi_size: {net_name} needs each size {' and '.join(need)}, got {list(roi_size)}")


def check_bottleneck(net_name: str, roi_size: Sequence[int], *, factor: int, norm: Any) -> None:
    """ConfigError naming ``model.roi_size`` when instance norm would meet a one-voxel bottleneck.

    A net that shrinks the window by ``factor`` per axis reaches a ``prod(roi // factor)``-voxel bottleneck;
    instance norm needs more than one voxel to normalise (torch raises at every forward pass otherwise).
    ``norm`` is the net's norm option: a name or a ``(name, args)`` pair.
    """
    name = norm[0] if isinstance(norm, (list, tuple)) and norm else norm
    if not (isinstance(name, str) and name.lower().startswith("instance")):
        return
    cells = 1
    for r in roi_size:
        cells *= r // factor
    if cells <= 1:
        raise ConfigError(
            f"model.roi_size: {net_name} with instance norm needs at least {2 * factor} on one axis "
            f"(got {list(roi_size)}, which leaves a one-voxel bottleneck)"
        )


def construct(
    cls: type[nn.Module],
    net_name: str,
    options: Mapping[str, Any],
    *,
    fixed: Mapping[str, Any],
    fixed_from: Mapping[str, str] | None = None,
) -> nn.Module:
    """``cls(**fixed, **options)`` after checking each option against ``cls.__init__``'s signature.

    ``fixed`` holds the arguments that come from elsewhere in the config (channels, roi); an option
    naming one of them is refused, pointing at ``fixed_from[key]`` (e.g. ``model.roi_size``). Values are
    checked against simple annotations (int, float, bool, str, sequences and unions of them); a
    ``ValueError``/``AssertionError`` MONAI's constructor raises about a value becomes a ConfigError.
    """
    params = inspect.signature(cls.__init__).parameters
    takes = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    hints = _hints(cls.__init__)
    fixed_from = dict(fixed_from or {})
    for key, value in options.items():
        if key in fixed:
            where = fixed_from.get(key, "the net builder")
            raise ConfigError(f"model.options.{key}: {net_name} sets {key} from {where}; remove it from the options")
        if key not in takes:
            opts = ", ".join(n for n in takes if n not in fixed)
            raise ConfigError(f"model.options.{key}: {net_name} ({cls.__name__}) takes no option {key!r}; it takes: {opts}")
        hint = hints.get(key)
        if hint is not None and _conforms(value, hint) is False:
            raise ConfigError(f"model.options.{key}: expected {_describe_hint(hint)}, got {value!r}")
    try:
        return cls(**fixed, **options)
    except (ValueError, AssertionError) as e:
        # MONAI checks values (divisibility, ranges) in its constructors; name the option the message
        # is about: by its name, else by a string value it quotes
        msg = str(e)
        named = [k for k in options if re.search(rf"\b{re.escape(k)}\b", msg)]
        named += [k for k, v in options.items() if isinstance(v, str) and len(v) > 1 and repr(v) in msg]
        key = f"model.options.{named[0]}" if named else "model.options"
        raise ConfigError(f"{key}: {net_name}: {e}") from None


def _hints(fn: Callable) -> dict[str, Any]:
    # MONAI writes its annotations as strings (``from __future__ import annotations``); resolve them
    # in the constructor's module. One that does not resolve is simply not checked.
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError, AttributeError):
        return {}


_SEQUENCES = (tuple, list, collections.abc.Sequence)


def _conforms(value: Any, hint: Any) -> bool | None:
    """True/False when ``hint`` is simple enough to check; None when it is not (the value passes)."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_conforms(value, h) for h in typing.get_args(hint)]
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
        verdicts = [_conforms(v, args[0]) for v in value]
        return None if any(v is None for v in verdicts) else all(verdicts)
    return None


def _describe_hint(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe_hint(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if hint in _SEQUENCES or origin in _SEQUENCES:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_describe_hint(args[0])}" if len(args) == 1 else "a list"
    return getattr(hint, "__name__", str(hint))
