"""The encoder of a registered net, for self-supervised pretraining (``medvit pretrain``) and for
loading pretrained encoder weights (``model.pretrained``).

The protocol: a net class of ours exposes ``encoder_prefixes`` (the state-dict key prefixes of its
encoder) and ``encode(x)``, mapping ``(B, in_channels, D, H, W)`` to the bottleneck features
``(B, C, d, h, w)``. MONAI's nets are adapted here without subclassing them: ``swin_unetr``'s
``swinViT`` and its last (deepest) hidden state, ``unetr``'s ``vit`` and its last token sequence
folded back into a grid, both exactly as their own ``forward`` computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from medvit.core.errors import ConfigError


@dataclass(frozen=True)
class Encoder:
    """``encode``: ``(B, in_channels, D, H, W)`` → ``(B, C, d, h, w)``; ``prefixes``: its state-dict keys' prefixes."""

    encode: Callable[[Tensor], Tensor]
    prefixes: tuple[str, ...]


def _swin_unetr(net: nn.Module) -> Encoder:
    # SwinUNETR.forward feeds hidden_states_out[4], the deepest stage, to its bottleneck block
    return Encoder(lambda x: net.swinViT(x, net.normalize)[4], ("swinViT.",))


def _unetr(net: nn.Module) -> Encoder:
    # UNETR.forward folds the ViT's last tokens into a grid with proj_feat before its decoder
    return Encoder(lambda x: net.proj_feat(net.vit(x)[0]), ("vit.",))


def _adapters() -> dict[type, Callable[[nn.Module], Encoder]]:
    from monai.networks.nets import UNETR, SwinUNETR

    return {SwinUNETR: _swin_unetr, UNETR: _unetr}


def has_encoder(net: nn.Module) -> bool:
    """Whether :func:`encoder_of` can serve ``net``."""
    return (hasattr(type(net), "encoder_prefixes") and callable(getattr(net, "encode", None))) or \
        type(net) in _adapters()


def encoder_of(net: nn.Module, name: str | None = None) -> Encoder:
    """The encoder of ``net``: its own ``encode``/``encoder_prefixes``, or an adapter for MONAI's class.

    Raises :class:`ConfigError` naming ``model.name`` (``name``, else the class) for a net without one.
    """
    if hasattr(type(net), "encoder_prefixes") and callable(getattr(net, "encode", None)):
        return Encoder(net.encode, tuple(type(net).encoder_prefixes))
    adapter = _adapters().get(type(net))
    if adapter is not None:
        return adapter(net)
    raise ConfigError(f"model.name: {name or type(net).__name__} has no transformer encoder to pretrain "
                      "(nets with one: dformer, swin_unetr, unetr, and any net exposing encode() and encoder_prefixes)")
