"""Full attention over a token grid: every token attends every token of its own volume.

Cost: each of the ``N = D*H*W`` tokens attends ``N`` keys, so ``~2*N*head_dim`` multiply-adds
per head per token (``N*head_dim`` for ``Q K^T``, as many for the weighted sum of ``V``);
quadratic in ``N`` over the grid. Used where the grid is smaller than a pattern's group.
"""

from __future__ import annotations

from torch import Tensor

from medvit.attention._grid import check_qkv, sdpa

__all__ = ["full_attention"]


def full_attention(q: Tensor, k: Tensor, v: Tensor, *, dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product attention of every token to every token of the same volume.

    No mask is built, so :func:`torch.nn.functional.scaled_dot_product_attention` may run a
    fused kernel.

    Args:
        q, k: ``(B, heads, D, H, W, head_dim)``, any strides; v: the same with its own last axis.
        dropout_p: attention dropout probability (pass 0 in evaluation).

    Returns:
        ``(B, heads, D, H, W, v.shape[-1])``, contiguous, in ``q``'s dtype.

    Raises:
        ValueError: the tensors are not such grids or do not match.
    """
    check_qkv(q, k, v)
    b, h, d, hh, w, c = q.shape
    flat = [x.reshape(b, h, d * hh * w, x.shape[-1]) for x in (q, k, v)]
    out = sdpa(*flat, None, dropout_p)
    return out.reshape(b, h, d, hh, w, v.shape[-1]).contiguous()
