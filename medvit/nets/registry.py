"""The volume net registry: :data:`NETS`, a :class:`~medvit.core.registry.Registry`.

A builder has the signature ``(in_channels, out_channels, roi_size, **options) -> nn.Module``
and turns ``model.options`` into constructor keyword arguments through :func:`construct`, which
checks each option against the constructor's signature so a typo or a wrong type names its key.
:func:`build_net` builds the net a :class:`~medvit.config.ModelConfig` names. The window checks
(:func:`check_roi`, :func:`check_bottleneck`) are the volume nets' own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from medvit.config import ModelConfig
from medvit.core import registry as core_registry
from medvit.core.errors import ConfigError
from medvit.core.registry import Registry, conforms

NETS = Registry("net", {"in_channels": "model.in_channels", "out_channels": "model.out_channels",
                        "roi_size": "model.roi_size"}, refused=())
"""The volume nets by ``model.name``; builders register with ``@NETS.register(name)``. Builders
convert their constructors' refusals themselves (:func:`construct`), so the registry converts none."""


def build_net(cfg: ModelConfig) -> nn.Module:
    """Build the net ``cfg`` names, in training mode with fresh weights.

    The net maps ``(B, cfg.in_channels, *cfg.roi_size)`` to logits ``(B, cfg.out_channels, *cfg.roi_size)``.
    Raises :class:`ConfigError` naming ``model.name``, ``model.roi_size`` or ``model.options.<key>``.
    """
    NETS.get(cfg.name)
    if cfg.out_channels is None:
        raise ConfigError("model.out_channels: not set (a full config sets it to the number of label ids)")
    roi = tuple(int(r) for r in cfg.roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ConfigError(f"model.roi_size: expected three positive sizes, got {list(roi)}")
    return NETS.build(cfg.name, cfg.options, in_channels=cfg.in_channels, out_channels=cfg.out_channels, roi_size=roi)


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
    """``cls(**fixed, **options)`` through :func:`medvit.core.registry.construct`, with the volume nets' rules.

    ``fixed`` holds the arguments that come from elsewhere in the config (channels, roi); an option
    naming one of them is refused, pointing at ``fixed_from[key]`` (e.g. ``model.roi_size``). An int
    option below 1 is refused (every int option of these nets is a size or a count). A
    ``ValueError``/``AssertionError`` the constructor raises about a value becomes a ConfigError
    naming the option; a ``ZeroDivisionError``/``RuntimeError`` one saying the options cannot
    build the net.
    """
    return core_registry.construct(cls, net_name, options, fixed=fixed, fixed_from=fixed_from, check_value=_check_size,
                                   refused=(ValueError, AssertionError), failed=(ZeroDivisionError, RuntimeError))


def _check_size(net_name: str, key: str, value: Any, hint: Any) -> None:
    # a zero or negative size reached arithmetic or torch.empty as a traceback, or built a net with
    # empty layers (MONAI reads mlp_dim 0 as "hidden_size"); a float option (a rate, a ratio) may be 0
    if _below_one(value) and not (key == "mlp_dim" and value == 0) and conforms(0.5, hint) is not True:
        raise ConfigError(f"model.options.{key}: {net_name} needs sizes of at least 1, got {value!r}")


def _below_one(value: Any) -> bool:
    """An int (or ints in a sequence) below 1; bools are not sizes."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in values)
