"""Dilated global attention over a token grid: D-Former's global scope (GS-MSA).

Along each axis of ``N`` tokens and group size ``g``, the axis is padded to
``Np = ceil(N / g) * g`` and the interval is ``I = Np / g``; group ``r`` (``0 <= r < I``) holds
tokens ``r, r + I, .., r + (g - 1) * I``. A 3D group is the product of one such group per axis,
so every group has ``prod(group)`` tokens spread over the whole volume. Padded keys (index
``>= N``) are masked out of the softmax; each group keeps its first token ``r < I <= N``, which
is real. A group of at least the axis length is one group spanning the axis. (D-Former's
official code pads without masking.)

Cost: each token attends ``prod(group)`` keys (padded ones included in the work), so
``~2*prod(group)*head_dim`` multiply-adds per head per token for ``Q K^T`` and ``A V``; linear in
the number of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from medvit.attention._grid import AxisPlan, check_qkv, grouped_attention

__all__ = ["dilated_attention"]


def dilated_attention(
    q: Tensor, k: Tensor, v: Tensor, group: Sequence[int], *, dropout_p: float = 0.0
) -> Tensor:
    """Attention within dilated groups that each span the whole grid.

    Args:
        q, k: ``(B, heads, D, H, W, head_dim)``, any strides; v: the same with its own last axis.
        group: tokens per group along ``(D, H, W)``, each >= 1 (larger than the grid is fine).
        dropout_p: attention dropout probability (pass 0 in evaluation).

    Returns:
        ``(B, heads, D, H, W, v.shape[-1])``, contiguous, in ``q``'s dtype.

    Raises:
        ValueError: ``group`` is not three integers >= 1; the tensors are not such grids or do
            not match.
    """
    check_qkv(q, k, v)
    group = tuple(group)
    if len(group) != 3:
        raise ValueError(f"group must have 3 entries (D, H, W), got {group}")
    plans = [AxisPlan(n, g, dilated=True) for n, g in zip(q.shape[2:5], group)]
    return grouped_attention(q, k, v, plans, dropout_p)
