"""The net registry: a name in ``model.name`` -> a builder that configures one of MONAI's nets.

A builder has the signature ``(in_channels, out_channels, roi_size, **options) -> nn.Module`` and
turns ``model.options`` into constructor keyword arguments through :func:`construct`, which checks
each option against the constructor's signature so a typo or a wrong type names its key.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from medvit.config import ModelConfig
from medvit.core.errors import ConfigError
from medvit.option_types import check_option, conforms, type_hints

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
    hints = type_hints(cls.__init__)
    fixed_from = dict(fixed_from or {})
    for key, value in options.items():
        if key in fixed:
            where = fixed_from.get(key, "the net builder")
            raise ConfigError(f"model.options.{key}: {net_name} sets {key} from {where}; remove it from the options")
        if key not in takes:
            opts = ", ".join(n for n in takes if n not in fixed)
            raise ConfigError(f"model.options.{key}: {net_name} ({cls.__name__}) takes no option {key!r}; it takes: {opts}")
        check_option(key, value, hints)
        # every int option of these nets is a size or a count; a zero or negative one reached
        # arithmetic or torch.empty as a traceback, or built a net with empty layers
        # (MONAI reads mlp_dim 0 as "hidden_size"); a float option (a rate, a ratio) may be 0
        if _below_one(value) and not (key == "mlp_dim" and value == 0) and conforms(0.5, hints.get(key)) is not True:
            raise ConfigError(f"model.options.{key}: {net_name} needs sizes of at least 1, got {value!r}")
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
    except (ZeroDivisionError, RuntimeError) as e:
        raise ConfigError(f"model.options: {net_name} could not be built from these options: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _below_one(value: Any) -> bool:
    """An int (or ints in a sequence) below 1; bools are not sizes."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values)
