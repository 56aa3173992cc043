"""Attention patterns over a dense token grid ``(B, D, H, W, C)``.

Pattern functions take per-head grids ``q, k, v`` of shape ``(B, heads, D, H, W, head_dim)`` and
call :func:`torch.nn.functional.scaled_dot_product_attention` on grouped tokens:
:func:`full_attention`, :func:`window_attention` (local windows, optional Swin shift),
:func:`dilated_attention` (D-Former's global groups), :func:`stripe_attention` (slabs along one
axis). Grids that do not divide by the group are padded at the end of each axis and the padded
keys are masked out of the softmax; with no padding and no shift no mask is passed, so fused
kernels run. :class:`GridAttention` wraps a pattern in the qkv and output projections;
:class:`CrossStripeAttention` is CSWin's cross-shaped module in 3D.
"""

from medvit.attention.dilated import dilated_attention
from medvit.attention.full import full_attention
from medvit.attention.multihead import GridAttention
from medvit.attention.stripes import CrossStripeAttention, stripe_attention
from medvit.attention.window import window_attention

__all__ = [
    "CrossStripeAttention",
    "GridAttention",
    "dilated_attention",
    "full_attention",
    "stripe_attention",
    "window_attention",
]
