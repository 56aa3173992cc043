"""Sparse-convolution U-Net for point-cloud semantic segmentation (MinkUNet style).

The baseline the point transformers are measured against, and the frame they are built
into: :class:`SparseUNetBase` owns point -> voxel -> point handling, the conv stem, the
strided encoder, the inverse-conv decoder and the head; a subclass decides what each encoder
stage runs after its downsampling (:meth:`SparseUNetBase.make_stage`). Convs come only from
:mod:`pointcloud.sparse` factories (spconv on CUDA, ours elsewhere).

Per forward pass:

1. voxelise with no range (every finite point gets a voxel) at ``voxel_size``, on a grid
   aligned to multiples of ``2 ** (levels - 1)`` voxels in world coordinates (so every
   level's cells, and the results for one cloud, do not depend on the rest of the batch); the voxel
   features are the mean over its points of ``[feat, offset]``, where ``offset`` ``(3,)``
   is the point's position relative to its voxel centre in voxel units (in
   ``[-0.5, 0.5)``), so the net sees sub-voxel geometry (``point_offsets=True``);
2. level 0: stem ``subm_conv 3`` -> BN -> ReLU, then ``layers[0]`` residual blocks;
3. level ``l = 1..L-1``: ``sparse_conv k2 s2`` -> BN -> ReLU, then the stage body
   (``layers[l]`` residual blocks here);
4. decoder ``l = L-1..1``: ``inverse_conv k2`` back to level ``l-1``'s sites -> BN -> ReLU,
   concatenated with the encoder's level ``l-1`` features, then ``decoder_layers[l-1]``
   residual blocks;
5. devoxelise: each point takes its voxel's level-0 features, concatenated with a per-point
   MLP of ``[feat, offset]`` (``point_mlp``), and a linear head gives the logits.

Points with non-finite coordinates get no voxel; their logits come from the head on zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medvit.core.values import triple
from pointcloud.nets.layers import per_level
from pointcloud.nets.registry import POINT_NETS
from pointcloud.sparse import devoxelize, inverse_conv, sparse_conv, subm_conv, voxelize
from pointcloud.structure import Point, SparseVoxels

__all__ = ["DownBlock", "ResidualBlock", "SparseUNet", "SparseUNetBase", "UpBlock", "voxelize_for_net"]


def _bn(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=1e-3, momentum=0.01)


class ResidualBlock(nn.Module):
    """``subm3 -> BN -> ReLU -> subm3 -> BN`` plus a shortcut, then ReLU; ``(M, C_in) -> (M, C_out)``.

    The shortcut is the identity, or a bias-free linear map + BN when the width changes.
    ``indice_key`` names the level's submanifold map so all its blocks share it.
    """

    def __init__(self, in_channels: int, out_channels: int, indice_key: str) -> None:
        super().__init__()
        self.conv1 = subm_conv(in_channels, out_channels, 3, bias=False, indice_key=indice_key)
        self.norm1 = _bn(out_channels)
        self.conv2 = subm_conv(out_channels, out_channels, 3, bias=False, indice_key=indice_key)
        self.norm2 = _bn(out_channels)
        self.act = nn.ReLU(inplace=True)
        if in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Linear(in_channels, out_channels, bias=False), _bn(out_channels))

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        h = self.act(self.norm1(self.conv1(x).features))
        h = self.norm2(self.conv2(x.replace_feature(h)).features)
        return x.replace_feature(self.act(h + self.shortcut(x.features)))


class DownBlock(nn.Module):
    """``sparse_conv k2 s2 -> BN -> ReLU``: ``(M, C_in)`` -> ``(M', C_out)`` on the coarser grid.

    ``indice_key`` keeps the strided map for the :class:`UpBlock` that comes back.
    """

    def __init__(self, in_channels: int, out_channels: int, indice_key: str) -> None:
        super().__init__()
        self.conv = sparse_conv(in_channels, out_channels, 2, stride=2, bias=False, indice_key=indice_key)
        self.norm = _bn(out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        y = self.conv(x)
        return y.replace_feature(self.act(self.norm(y.features)))


class UpBlock(nn.Module):
    """``inverse_conv k2 -> BN -> ReLU``, concat the skip, residual blocks.

    ``forward(x, skip)``: ``x`` ``(M', C_in)`` coarse, ``skip`` ``(M, C_skip)`` on the sites the
    strided conv under ``indice_key`` started from -> ``(M, C_out)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, layers: int,
                 indice_key: str, subm_key: str) -> None:
        super().__init__()
        self.conv = inverse_conv(in_channels, out_channels, 2, indice_key=indice_key, bias=False)
        self.norm = _bn(out_channels)
        self.act = nn.ReLU(inplace=True)
        widths = [out_channels + skip_channels] + [out_channels] * max(layers, 1)
        self.blocks = nn.ModuleList(ResidualBlock(widths[i], widths[i + 1], subm_key) for i in range(max(layers, 1)))

    def forward(self, x: SparseVoxels, skip: SparseVoxels) -> SparseVoxels:
        y = self.conv(x)
        h = self.act(self.norm(y.features))
        y = skip.replace_feature(torch.cat([h, skip.features], 1))
        for block in self.blocks:
            y = block(y)
        return y


def voxelize_for_net(
    point: Point, voxel_size: tuple[float, float, float], levels: int, point_offsets: bool = True
) -> tuple[SparseVoxels, torch.Tensor, torch.Tensor]:
    """Voxelise ``point`` for a net with ``levels`` resolutions.

    Returns:
        ``(voxels, inverse, point_in)``: voxels with mean ``[feat, offset]`` features ``(M, C + 3)``
        (``(M, C)`` without offsets) on a grid whose origin and size are multiples of
        ``2 ** (levels - 1)`` voxels (world-aligned levels; no stride-2 conv loses its last row);
        ``inverse`` ``(N,)`` (-1 for non-finite points); ``point_in`` ``(N, C + 3)`` the per-point
        inputs (zero rows for non-finite points).
    """
    coord = point.coord
    finite = torch.isfinite(coord).all(1) & torch.isfinite(point.feat).all(1)
    all_finite = bool(finite.all())
    feat = point.feat
    if point_offsets:
        # offset from the voxel centre in voxel units, on the world-aligned grid voxelize uses
        size = torch.tensor(voxel_size, dtype=torch.float64, device=coord.device)
        scaled = torch.where(finite[:, None], coord, torch.zeros_like(coord)).double() / size
        feat = torch.cat([feat, (scaled - torch.floor(scaled) - 0.5).to(feat.dtype)], 1)
    if all_finite:
        voxels, inverse = voxelize(Point(coord=coord, feat=feat, offset=point.offset, batch=point.batch), voxel_size)
    else:
        feat = torch.where(finite[:, None], feat, torch.zeros_like(feat))
        counts = torch.bincount(point.batch[finite], minlength=point.batch_size)
        sub = Point(coord=coord[finite], feat=feat[finite], offset=torch.cumsum(counts, 0))
        voxels, inv = voxelize(sub, voxel_size)
        inverse = torch.full((point.num_points,), -1, dtype=torch.long, device=coord.device)
        inverse[finite] = inv
    # align the grid to multiples of 2 ** (levels - 1) voxels in world coordinates: every level's
    # cells (and FlatFormer's windows) then sit on a lattice that does not depend on where this
    # batch's bounding box starts, and no stride-2 conv drops an odd grid's last row
    m = 2 ** (levels - 1)
    base = [int(round(o / v)) for o, v in zip(voxels.origin, voxels.voxel_size)]  # (x, y, z)
    shift_xyz = [b % m for b in base]
    if any(shift_xyz):
        voxels.indices = voxels.indices + torch.tensor([0, *shift_xyz[::-1]], dtype=torch.int32, device=coord.device)
        voxels.origin = tuple((b - r) * v for b, r, v in zip(base, shift_xyz, voxels.voxel_size))
    grown = [n + r for n, r in zip(voxels.spatial_shape, shift_xyz[::-1])]
    voxels.spatial_shape = tuple(-(-n // m) * m for n in grown)
    return voxels, inverse, feat




class SparseUNetBase(nn.Module):
    """Point in, per-point logits out, around a sparse U-Net whose encoder stages a subclass fills.

    Args:
        in_channels: point feature width C.
        out_channels: K.
        voxel_size: voxel edge in metres, one number or ``(x, y, z)``.
        channels: width of each level, finest first; ``len(channels)`` levels.
        layers: residual blocks per encoder level (an int for all).
        decoder_layers: residual blocks after each decoder concat (per level ``0..L-2``).
        point_mlp: width of the per-point MLP branch concatenated before the head (0: none).
        point_offsets: append each point's offset from its voxel centre to its features.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        voxel_size: float | Sequence[float],
        channels: Sequence[int] = (16, 32, 64, 64),
        layers: int | Sequence[int] = 1,
        decoder_layers: int | Sequence[int] = 1,
        point_mlp: int = 16,
        point_offsets: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        self.channels = tuple(int(c) for c in channels)
        if len(self.channels) < 1 or min(self.channels) < 1:
            raise ValueError(f"channels must be one or more positive widths, got {channels}")
        n = len(self.channels)
        self.layers = per_level(layers, n, "layers")
        self.decoder_layers = per_level(decoder_layers, max(n - 1, 1), "decoder_layers")
        if point_mlp < 0:
            raise ValueError(f"point_mlp must be >= 0, got {point_mlp}")
        self.voxel_size = triple(voxel_size, "voxel_size", kind=float)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.point_offsets = point_offsets
        c_in = in_channels + (3 if point_offsets else 0)
        c0 = self.channels[0]
        self.stem_conv = subm_conv(c_in, c0, 3, bias=False, indice_key="subm0")
        self.stem_norm = _bn(c0)
        self.stages = nn.ModuleList()
        self.downs = nn.ModuleList()
        for level in range(n):
            c = self.channels[level]
            if level > 0:
                self.downs.append(DownBlock(self.channels[level - 1], c, indice_key=f"down{level}"))
            self.stages.append(self.make_stage(level, c))
        self.ups = nn.ModuleList(
            UpBlock(self.channels[level], self.channels[level - 1], self.channels[level - 1],
                    self.decoder_layers[level - 1], indice_key=f"down{level}", subm_key=f"subm{level - 1}")
            for level in range(n - 1, 0, -1)
        )
        self.point_branch = (
            nn.Sequential(nn.Linear(c_in, point_mlp, bias=False), _bn(point_mlp), nn.ReLU(inplace=True))
            if point_mlp
            else None
        )
        self.head = nn.Linear(c0 + point_mlp, out_channels)

    def make_stage(self, level: int, channels: int) -> nn.Module:
        """The body of encoder level ``level`` (after its downsampling): SparseVoxels -> SparseVoxels."""
        return nn.Sequential(*(ResidualBlock(channels, channels, f"subm{level}") for _ in range(self.layers[level])))

    def forward(self, point: Point) -> torch.Tensor:
        """``point`` (N points, C features) -> logits ``(N, out_channels)`` in the input order."""
        if point.feat.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} point features, "
                             f"got {point.feat.shape[1]}")
        voxels, inverse, point_in = voxelize_for_net(point, self.voxel_size, len(self.channels), self.point_offsets)
        x = self.stem_conv(voxels)
        x = x.replace_feature(torch.relu(self.stem_norm(x.features)))
        skips = []
        for level, stage in enumerate(self.stages):
            if level > 0:
                x = self.downs[level - 1](x)
            x = stage(x)
            skips.append(x)
        for i, up in enumerate(self.ups):
            x = up(x, skips[-2 - i])
        feats = devoxelize(x.features, inverse)
        if self.point_branch is not None:
            feats = torch.cat([feats, self.point_branch(point_in)], 1)
        return self.head(feats)


@POINT_NETS.register("sparse_unet")
class SparseUNet(SparseUNetBase):
    """MinkUNet-style sparse conv U-Net: every encoder level runs ``layers[l]`` residual blocks.

    See :class:`SparseUNetBase` for the arguments and the module docstring for the layout.
    ``forward(point)``: :class:`Point` ``(N, C)`` -> logits ``(N, out_channels)``.
    """
