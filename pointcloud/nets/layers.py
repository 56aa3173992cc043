"""Layers and option helpers the point nets share.

Everything here works on voxel rows ``(M, C)`` (one row a voxel, as the sparse nets hold their
features) and imports only torch, so building a point net loads no volume-side library.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["DropPath", "feed_forward", "per_level"]


class DropPath(nn.Module):
    """Stochastic depth on a residual branch: in training, each row of ``(M, ...)`` is zeroed with
    probability ``drop_prob`` and the kept rows are divided by ``1 - drop_prob``; in eval (or with
    ``drop_prob`` 0) the input is returned as is. No parameters, so checkpoints are unaffected.

    Raises ValueError unless ``0 <= drop_prob <= 1``.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def feed_forward(channels: int, ratio: float, dropout: float | None = None) -> nn.Sequential:
    """A transformer block's feed-forward ``(M, C) -> (M, C)``: Linear to ``max(1, round(C * ratio))``
    hidden units -> GELU -> [Dropout(``dropout``)] -> Linear back to C.

    ``dropout=None`` builds no dropout layer, so the second Linear is ``[2]`` (ConDaFormer's
    ``mlp``); a rate, even 0, puts it at ``[3]`` (FlatFormer's ``ffn``). The indices are the
    parameter names saved checkpoints hold.
    """
    hidden = max(1, int(round(channels * ratio)))
    drop = [] if dropout is None else [nn.Dropout(dropout)]
    return nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), *drop, nn.Linear(hidden, channels))


def per_level(value: int | Sequence[int], n: int, name: str, minimum: int = 0) -> tuple[int, ...]:
    """A per-level count for ``n`` levels: one int for every level, or ``n`` of them (finest first).

    Raises ValueError naming ``name`` for another length or a value below ``minimum``.
    """
    t = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(t) != n or any(v < minimum for v in t):
        raise ValueError(f"{name} must be an int >= {minimum} or {n} of them (one per level), got {value}")
    return t
