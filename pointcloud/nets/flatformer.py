"""FlatFormer blocks inside a sparse U-Net, for point-cloud semantic segmentation.

FlatFormer (Liu et al., 2023, "FlatFormer: Flattened Window Attention for Efficient Point
Cloud Transformer") attends within groups of *equal size* instead of within windows: the
voxels are sorted window by window (windows in snake order, voxels in snake order inside
each window), the sequence is cut into groups of ``group_size`` voxels (the last group of
each cloud filled by copying the previous group's voxels), and self-attention runs over all
groups as one ``(groups, heads, group_size, head_dim)`` batch with no masks
(:mod:`pointcloud.nets.serialize`). A block has four attention layers that cycle through the
orders x-major, x-major shifted by half a window, y-major, y-major shifted, so information
crosses group and window borders. Each layer is post-norm, as in the paper:
``x = LN(x + Attn(x + pe, x + pe, x))``, ``x = LN(x + FFN(x))``; the sin-cos encoding ``pe``
of the voxel coordinates goes into queries and keys, not values. The coordinates are the
level's world voxel indices (as the authors' code encodes its fixed-range grid indices), so
neither the windows nor the encoding depend on the batch's bounding box.

Where the blocks sit, and why. The paper's net is a detector backbone on one bird's-eye
voxel grid. Segmentation needs per-point outputs at full resolution, so here the blocks go
*inside* the sparse U-Net of :mod:`pointcloud.nets.sparse_unet`:

- level 0 (full resolution) keeps the conv stem and a residual conv block: it has the most
  voxels, and fine local geometry is what 3x3x3 convs capture cheaply;
- every downsampled encoder level (``flat_blocks`` per level, default 0 for level 0 and 1
  for the others, i.e. the bottleneck too) runs FlatFormer blocks after its strided conv.
  There the voxel count is 4-8x smaller per level, and a window of a fixed number of voxels
  covers ``2 ** level`` times more metres, so attention supplies the long-range context the
  3x3x3 convs lack;
- the decoder stays convolutional (inverse convs + skip concat + residual blocks), as in the
  baseline, so the two nets differ only in the encoder bodies.

Windows are given in voxels of the level they act on: ``(wx, wy)`` pillars spanning the
whole height (the paper's BEV windows, the default ``(12, 12)``) or ``(wx, wy, wz)``.
The four groupings and the position encoding of a level are computed once per forward pass
and kept in the level's ``SparseVoxels.cache`` (shared by all blocks of the level).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pointcloud.nets.layers import feed_forward, per_level
from pointcloud.nets.registry import POINT_NETS
from pointcloud.nets.serialize import FLAT_ORDERS, FlatGrouping, flat_grouping, grid_offset
from pointcloud.nets.sparse_unet import ResidualBlock, SparseUNetBase
from pointcloud.structure import SparseVoxels

__all__ = ["FlatBlock", "FlatFormerUNet", "FlatLayer", "GroupAttention", "sincos_position_encoding"]


def sincos_position_encoding(coords: torch.Tensor, channels: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed sin-cos encoding of ``(M, 3)`` coordinates -> ``(M, channels)``.

    Each axis gets ``ceil(channels / 6)`` frequencies ``temperature ** (-i / n)``, as
    ``[sin, cos]`` pairs; the ``(x, y, z)`` blocks are concatenated and cut to ``channels``.
    Angles are computed in float64, so world voxel indices in the millions (UTM scenes) keep
    their phase; the result is float32.
    """
    n = math.ceil(channels / 6)
    freqs = temperature ** (-torch.arange(n, dtype=torch.float64, device=coords.device) / n)
    angles = coords.double()[:, :, None] * freqs  # (M, 3, n)
    pe = torch.cat([angles.sin(), angles.cos()], 2).reshape(coords.shape[0], 6 * n)
    return pe[:, :channels].float()


class GroupAttention(nn.Module):
    """Multi-head self-attention within equal-size groups.

    ``forward(x, pe, grouping)``: ``x``, ``pe`` ``(M, C)`` -> ``(M, C)``. The tokens of each
    group are gathered into ``(G, heads, g, C / heads)`` and handed to
    ``scaled_dot_product_attention`` in one call; each voxel reads its output from its own
    (real) slot, the copies in padded slots only serve as keys and values.
    """

    def __init__(self, channels: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads ({heads}) must divide the width ({channels})")
        self.channels = channels
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, pe: torch.Tensor, grouping: FlatGrouping) -> torch.Tensor:
        g, h, c = grouping.group_size, self.heads, self.channels
        xs = x[grouping.gather]
        qk_in = xs + pe[grouping.gather]

        def split(t: torch.Tensor) -> torch.Tensor:  # (G*g, C) -> (G, h, g, C/h)
            return t.view(-1, g, h, c // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q(qk_in)), split(self.k(qk_in)), split(self.v(xs)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(-1, c)[grouping.scatter]
        return self.proj(out)


class FlatLayer(nn.Module):
    """One post-norm transformer layer over one grouping: ``(M, C) -> (M, C)``."""

    def __init__(self, channels: int, heads: int, ffn_ratio: float = 2.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = GroupAttention(channels, heads, dropout)
        self.norm1 = nn.LayerNorm(channels)
        self.ffn = feed_forward(channels, ffn_ratio, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor, pe: torch.Tensor, grouping: FlatGrouping) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, pe, grouping)))
        return self.norm2(x + self.drop(self.ffn(x)))


class FlatBlock(nn.Module):
    """Four :class:`FlatLayer` s, one per order of :data:`~pointcloud.nets.serialize.FLAT_ORDERS`.

    ``forward(x)``: SparseVoxels ``(M, C)`` -> same sites ``(M, C)``. ``cache_key`` names the
    level whose groupings and position encoding are cached in ``x.cache``.
    """

    def __init__(self, channels: int, heads: int, window_shape: Sequence[int], group_size: int,
                 ffn_ratio: float = 2.0, dropout: float = 0.0, cache_key: str = "flat") -> None:
        super().__init__()
        self.window_shape = tuple(int(w) for w in window_shape)
        if len(self.window_shape) not in (2, 3) or min(self.window_shape) < 1:
            raise ValueError(f"window_shape must be two or three positive ints (x, y[, z]), got {window_shape}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = int(group_size)
        self.cache_key = cache_key
        self.layers = nn.ModuleList(FlatLayer(channels, heads, ffn_ratio, dropout) for _ in FLAT_ORDERS)

    def groupings(self, x: SparseVoxels) -> list[FlatGrouping]:
        """The four groupings of ``x``'s sites (cached per level)."""
        return [flat_grouping(x, self.window_shape, self.group_size, major, shift, cache_key=self.cache_key)
                for major, shift in FLAT_ORDERS]

    def position_encoding(self, x: SparseVoxels) -> torch.Tensor:
        """``(M, C)`` sin-cos encoding of the sites' world ``(x, y, z)`` voxel indices at this level
        (``indices + grid_offset``, so it does not depend on the batch's bounding box); cached per level."""
        c = self.layers[0].attn.channels
        store = x.cache.setdefault("flat_pe", {})
        key = (self.cache_key, c)
        hit = store.get(key)
        if hit is not None and (hit[0] is x.indices or torch.equal(hit[0], x.indices)):
            return hit[1]
        world = x.indices[:, 1:].long().flip(1) + torch.tensor(grid_offset(x), device=x.indices.device)
        pe = sincos_position_encoding(world, c).to(x.features.dtype)
        store[key] = (x.indices, pe)
        return pe

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        pe = self.position_encoding(x)
        h = x.features
        for layer, grouping in zip(self.layers, self.groupings(x)):
            h = layer(h, pe, grouping)
        return x.replace_feature(h)


class _FlatStage(nn.Module):
    """Residual conv blocks, then FlatFormer blocks, on one level's sites."""

    def __init__(self, convs: Sequence[nn.Module], blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        for m in (*self.convs, *self.blocks):
            x = m(x)
        return x


@POINT_NETS.register("flatformer")
class FlatFormerUNet(SparseUNetBase):
    """Sparse U-Net whose downsampled encoder levels run FlatFormer blocks.

    Args:
        in_channels, out_channels, voxel_size, channels, decoder_layers, point_mlp,
            point_offsets: as :class:`~pointcloud.nets.sparse_unet.SparseUNetBase`.
        layers: residual conv blocks per encoder level, before its FlatFormer blocks
            (default: 1 at level 0, none elsewhere).
        flat_blocks: FlatFormer blocks (four attention layers each) per encoder level
            (default: none at level 0, 1 at every downsampled level).
        window_shape: ``(wx, wy)`` or ``(wx, wy, wz)`` voxels of the level.
        group_size: voxels per attention group.
        heads: attention heads, one int or one per level (must divide the level's width).
        ffn_ratio: FFN hidden width / width.
        dropout: dropout on attention weights and residual branches.

    ``forward(point)``: :class:`Point` ``(N, C)`` -> logits ``(N, out_channels)`` in input order.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        voxel_size: float | Sequence[float],
        channels: Sequence[int] = (16, 32, 64, 64),
        layers: int | Sequence[int] | None = None,
        decoder_layers: int | Sequence[int] = 1,
        flat_blocks: int | Sequence[int] | None = None,
        window_shape: Sequence[int] = (12, 12),
        group_size: int = 64,
        heads: int | Sequence[int] = 2,
        ffn_ratio: float = 2.0,
        dropout: float = 0.0,
        point_mlp: int = 16,
        point_offsets: bool = True,
    ) -> None:
        n = len(tuple(channels))
        if layers is None:
            layers = (1,) + (0,) * (n - 1)
        if flat_blocks is None:
            flat_blocks = (0,) + (1,) * (n - 1)
        self.flat_blocks = per_level(flat_blocks, n, "flat_blocks")
        self.heads = per_level(heads, n, "heads", minimum=1)
        self.window_shape = tuple(int(w) for w in window_shape)
        self.group_size = int(group_size)
        self.ffn_ratio = float(ffn_ratio)
        self.dropout = float(dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if self.ffn_ratio <= 0:
            raise ValueError(f"ffn_ratio must be > 0, got {ffn_ratio}")
        for level, c in enumerate(channels):
            if self.flat_blocks[level] and int(c) % self.heads[level]:
                raise ValueError(f"heads ({self.heads[level]}) must divide channels[{level}] ({c})")
        super().__init__(in_channels, out_channels, voxel_size, channels=channels, layers=layers,
                         decoder_layers=decoder_layers, point_mlp=point_mlp, point_offsets=point_offsets)

    def make_stage(self, level: int, channels: int) -> nn.Module:
        convs = [ResidualBlock(channels, channels, f"subm{level}") for _ in range(self.layers[level])]
        blocks = [
            FlatBlock(channels, self.heads[level], self.window_shape, self.group_size, self.ffn_ratio,
                      self.dropout, cache_key=f"level{level}")
            for _ in range(self.flat_blocks[level])
        ]
        return _FlatStage(convs, blocks)
