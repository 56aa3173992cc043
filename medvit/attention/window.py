"""Local window attention over a token grid, with Swin's optional half-window shift.

The grid ``(D, H, W)`` is cut into non-overlapping windows of ``window = (wd, wh, ww)`` tokens;
each token attends the tokens of its own window. An axis that does not divide by its window is
padded at its end (padded keys are masked out, padded queries cropped away), so the last window
along it holds fewer real tokens. A window of at least the axis length (and no shift) is one
window spanning the axis.

With ``shift = (sd, sh, sw)`` (Swin: half the window on odd blocks) the padded grid is rolled by
``-shift`` before it is cut, as Video Swin Transformer does (pad first, then roll), and rolled
back afterwards. Tokens that wrapped around in the roll share a window with tokens from the far
end of the grid; Swin's region mask keeps them apart: along every shifted axis a token may only
attend tokens on its own side of the wrap, so no token attends across it.

Cost: each token attends ``prod(window)`` keys (padded ones included in the work), so
``~2*prod(window)*head_dim`` multiply-adds per head per token for ``Q K^T`` and ``A V``; linear
in the number of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from medvit.attention._grid import AxisPlan, check_qkv, grouped_attention

__all__ = ["window_attention"]


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: Sequence[int],
    *,
    shift: Sequence[int] = (0, 0, 0),
    dropout_p: float = 0.0,
) -> Tensor:
    """Attention within non-overlapping (optionally shifted) windows of the grid.

    Args:
        q, k: ``(B, heads, D, H, W, head_dim)``, any strides; v: the same with its own last axis.
        window: tokens per window along ``(D, H, W)``, each >= 1 (larger than the grid is fine).
        shift: Swin's cyclic shift along ``(D, H, W)``, ``0 <= shift[a] < window[a]``; ``(0, 0, 0)``
            for plain windows.
        dropout_p: attention dropout probability (pass 0 in evaluation).

    Returns:
        ``(B, heads, D, H, W, v.shape[-1])``, contiguous, in ``q``'s dtype.

    Raises:
        ValueError: ``window`` or ``shift`` is not three integers in range; the tensors are not
            such grids or do not match.
    """
    check_qkv(q, k, v)
    window, shift = tuple(window), tuple(shift)
    if len(window) != 3 or len(shift) != 3:
        raise ValueError(f"window and shift must have 3 entries (D, H, W), got {window} and {shift}")
    plans = [AxisPlan(n, w, shift=s) for n, w, s in zip(q.shape[2:5], window, shift)]
    return grouped_attention(q, k, v, plans, dropout_p)
