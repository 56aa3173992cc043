"""Cross-shaped stripe attention in 3D (CSWin Transformer's pattern, extended to volumes).

:func:`stripe_attention` cuts the grid along one axis into slabs of ``width`` consecutive tokens
that span the other two axes; each token attends the tokens of its slab. An axis that does not
divide by ``width`` is padded at its end (padded keys masked out, padded queries cropped), so the
last slab holds fewer real tokens; a width of at least the axis length is one slab, i.e. full
attention.

:class:`CrossStripeAttention` splits the channels and heads into three equal sets; set ``a``
attends within slabs along axis ``a`` (0 = D, 1 = H, 2 = W), so the three sets together cover a
cross-shaped region. Its optional LePE (locally-enhanced positional encoding) is a depthwise
3x3x3 ``Conv3d`` on V added to the attention output. As in the official 2D CSWin code, which
convolves V inside each stripe window, the conv runs inside each slab: it sees zeros beyond the
slab's two faces along axis ``a`` (and beyond the grid's faces), never the neighbouring slab.

Cost: a token of set ``a`` attends ``width[a] * (product of the other two axis lengths)`` keys,
so ``~2 * that * head_dim`` multiply-adds per head per token for ``Q K^T`` and ``A V``; LePE adds
27 multiply-adds per channel per token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medvit.attention._grid import AxisPlan, check_qkv, grouped_attention
from medvit.attention.multihead import GridAttention

__all__ = ["CrossStripeAttention", "stripe_attention"]


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0 (D), 1 (H) or 2 (W), got {axis}")


def stripe_attention(q: Tensor, k: Tensor, v: Tensor, axis: int, width: int, *, dropout_p: float = 0.0) -> Tensor:
    """Attention within slabs of ``width`` tokens along ``axis`` that span the other two axes.

    Args:
        q, k: ``(B, heads, D, H, W, head_dim)``, any strides; v: the same with its own last axis.
        axis: the axis the slabs are cut along, 0 = D, 1 = H, 2 = W.
        width: tokens per slab along ``axis``, >= 1 (larger than the grid is fine).
        dropout_p: attention dropout probability (pass 0 in evaluation).

    Returns:
        ``(B, heads, D, H, W, v.shape[-1])``, contiguous, in ``q``'s dtype.

    Raises:
        ValueError: ``axis`` is not 0, 1 or 2, ``width < 1``; the tensors are not such grids or
            do not match.
    """
    check_qkv(q, k, v)
    _check_axis(axis)
    plans = [AxisPlan(n, width if a == axis else n) for a, n in enumerate(q.shape[2:5])]
    return grouped_attention(q, k, v, plans, dropout_p)


def slab_conv(x: Tensor, conv: nn.Conv3d, axis: int, width: int) -> Tensor:
    """Apply ``conv`` (3x3x3, padding 1) inside each slab of ``width`` voxels along ``axis``.

    Each slab is convolved on its own, so the conv sees zeros beyond the slab's faces along
    ``axis`` (and beyond the grid's other faces).

    Args:
        x: ``(B, C, D, H, W)``.
        conv: a conv that keeps the spatial size.
        axis: 0 = D, 1 = H, 2 = W.
        width: voxels per slab along ``axis``, >= 1.

    Returns:
        ``(B, C_out, D, H, W)``.

    Raises:
        ValueError: ``axis`` or ``width`` out of range.
    """
    _check_axis(axis)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    b, c = x.shape[:2]
    spatial = list(x.shape[2:])
    n = spatial[axis]
    width = min(width, n)
    slabs = math.ceil(n / width)
    padded = slabs * width
    if padded != n:
        pad = [0, 0] * 3
        pad[2 * (2 - axis) + 1] = padded - n
        x = F.pad(x, pad)  # zeros, as beyond the grid's face
    split = spatial.copy()
    split[axis : axis + 1] = [slabs, width]
    slab_shape = spatial.copy()
    slab_shape[axis] = width
    xs = x.reshape(b, c, *split).movedim(2 + axis, 1).reshape(b * slabs, c, *slab_shape)
    ys = conv(xs)
    c_out = ys.shape[1]
    full = spatial.copy()
    full[axis] = padded
    y = ys.reshape(b, slabs, c_out, *slab_shape).movedim(1, 2 + axis).reshape(b, c_out, *full)
    return y.narrow(2 + axis, 0, n)


class CrossStripeAttention(GridAttention):
    """CSWin's cross-shaped window self-attention on a 3D token grid.

    ``x -> qkv (Linear dim -> 3*dim) -> channels (and heads) split in three sets -> set a:
    stripe_attention along axis a (+ LePE_a(V_a)) -> concatenated -> proj (Linear dim -> dim)``.
    Channel ``a * dim/3 + head * head_dim + i`` of q, k and v belongs to set ``a``.

    Cost per token: see the module docstring.

    Args:
        dim: channels ``C`` of the tokens; a multiple of ``num_heads``.
        num_heads: attention heads, a multiple of 3 (``num_heads / 3`` per set).
        width: slab width in tokens, one for all axes or one per axis ``(D, H, W)``, each >= 1.
        lepe: add LePE, a depthwise 3x3x3 ``Conv3d`` (with bias) per set on its V, computed
            inside each slab (zero padding at the slab faces, as official CSWin does per stripe).
        qkv_bias: bias in the qkv projection.
        attn_drop: attention dropout probability, applied in training only.
        proj_drop: dropout after the output projection.

    Raises:
        ValueError: ``num_heads`` or ``dim`` not divisible by 3, ``dim`` not divisible by
            ``num_heads``, a size < 1, or ``width`` not one or three integers.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        width: int | tuple[int, int, int],
        *,
        lepe: bool = True,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        widths = (width,) * 3 if isinstance(width, int) else tuple(width)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"width must be one or three values >= 1, got {width}")
        if num_heads % 3 or dim % 3:
            raise ValueError(f"dim and num_heads must divide by 3 (one set per axis), got dim={dim}, num_heads={num_heads}")
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.width = widths
        c3 = dim // 3
        self.lepe = (
            nn.ModuleList(nn.Conv3d(c3, c3, 3, padding=1, groups=c3) for _ in range(3)) if lepe else None
        )

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]  (the pattern is fixed)
        """Args:
            x: tokens ``(B, D, H, W, dim)``.

        Returns:
            ``(B, D, H, W, dim)``.

        Raises:
            ValueError: ``x`` is not 5D or its last axis is not ``dim``.
        """
        self.check_tokens(x)
        b, d, h, w, _ = x.shape
        h3 = self.num_heads // 3
        hd = self.dim // self.num_heads
        # (q/k/v, set, B, heads per set, D, H, W, head_dim)
        qkv = self.qkv(x).reshape(b, d, h, w, 3, 3, h3, hd).permute(4, 5, 0, 6, 1, 2, 3, 7)
        dropout_p = self.dropout_p
        outs = []
        for a in range(3):
            q, k, v = qkv[0, a], qkv[1, a], qkv[2, a]
            out = stripe_attention(q, k, v, a, self.width[a], dropout_p=dropout_p)
            if self.lepe is not None:
                v_img = v.permute(0, 1, 5, 2, 3, 4).reshape(b, h3 * hd, d, h, w)
                pe = slab_conv(v_img, self.lepe[a], a, self.width[a])
                out = out + pe.reshape(b, h3, hd, d, h, w).permute(0, 1, 3, 4, 5, 2)
            outs.append(out.permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, h3 * hd))
        return self.proj_drop(self.proj(torch.cat(outs, dim=-1)))
