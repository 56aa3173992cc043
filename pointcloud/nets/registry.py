"""The point-cloud net registry: a name in ``model.name`` -> a builder of a point net.

A builder has the signature ``(in_channels, num_classes, voxel_size, **options) -> nn.Module``.
Every net it builds maps a :class:`pointcloud.structure.Point` to per-point logits
``(N, num_classes)`` in the input point order (voxelising and devoxelising inside).

``model.options`` are checked against the builder's signature before it is called, so a
typo names its key (``model.options.<key>``) instead of surfacing as a ``TypeError``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from medvit.core.errors import ConfigError
from medvit.option_types import check_option, type_hints

__all__ = ["available_point_nets", "build_point_net", "register"]

PointNetBuilder = Callable[..., nn.Module]

_REGISTRY: dict[str, PointNetBuilder] = {}
_FIXED = ("in_channels", "num_classes", "voxel_size")


def register(name: str) -> Callable[[PointNetBuilder], PointNetBuilder]:
    """Decorator registering a point-net builder under ``name``.

    Example::

        @register("sparse_unet")
        def sparse_unet(in_channels: int, num_classes: int, voxel_size: float | tuple, **options) -> nn.Module:
            return SparseUNet(in_channels=in_channels, num_classes=num_classes, voxel_size=voxel_size, **options)
    """

    def deco(builder: PointNetBuilder) -> PointNetBuilder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            # two modules claiming one name is a programming error, not a user's
            raise ValueError(f"a point net named {name!r} is already registered ({_REGISTRY[name].__module__})")
        _REGISTRY[name] = builder
        return builder

    return deco


def available_point_nets() -> list[str]:
    """The registered point-net names, sorted."""
    return sorted(_REGISTRY)


def _accepted_options(fn: Callable) -> tuple[list[str], bool, dict[str, Any]]:
    """Keywords ``fn`` accepts besides the fixed three, whether it takes ``**kwargs``, and its type hints.

    A class registered directly is checked against its ``__init__``.
    """
    sig_fn = fn.__init__ if inspect.isclass(fn) else fn
    params = inspect.signature(sig_fn).parameters
    names = [
        n
        for n, p in params.items()
        if n != "self" and n not in _FIXED and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    return names, var_kw, type_hints(sig_fn)


def build_point_net(
    name: str,
    *,
    in_channels: int,
    num_classes: int,
    voxel_size: float | tuple[float, float, float],
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build the point net ``name`` (training mode, fresh weights).

    Raises :class:`ConfigError` naming ``model.name`` for an unknown net and
    ``model.options.<key>`` for an option the net does not take (or one that repeats
    ``in_channels``/``num_classes``/``voxel_size``), a value of the wrong type (checked against
    simple annotations: int, float, bool, str, sequences and unions of them), and a value the
    net's constructor refuses with ``ValueError``.
    """
    builder = _REGISTRY.get(name)
    if builder is None:
        names = ", ".join(available_point_nets())
        raise ConfigError(f"model.name: unknown point-cloud net {name!r}; available: {names}")
    options = dict(options or {})
    takes, var_kw, hints = _accepted_options(builder)
    for key, value in options.items():
        if key in _FIXED:
            raise ConfigError(f"model.options.{key}: {name} sets {key} from model.{key}; remove it from the options")
        if key not in takes and not var_kw:
            raise ConfigError(
                f"model.options.{key}: point net {name} takes no option {key!r}; it takes: {', '.join(takes) or 'none'}"
            )
        check_option(key, value, hints)
    try:
        return builder(in_channels, num_classes, voxel_size, **options)
    except ValueError as e:
        # constructors check values (widths, window shapes); name the option the message is about
        msg = str(e)
        # the option the message names first (messages lead with the offending option)
        hits = [(m.start(), k) for k in options if (m := re.search(rf"\b{re.escape(k)}\b", msg))]
        key = f"model.options.{min(hits)[1]}" if hits else "model.options"
        raise ConfigError(f"{key}: {name}: {msg}") from None
