"""Points to sparse voxels and back.

``voxelize`` groups the points of a :class:`~pointcloud.structure.Point` batch into
unique voxels and reduces their features (mean or max); the returned ``inverse`` maps
every point to its voxel row (``-1`` for points outside ``point_range``), which is what
``devoxelize`` uses to hand voxel outputs back to the points. ``to_spconv`` and
``from_spconv`` convert to and from spconv's ``SparseConvTensor`` (same index order,
``(batch, z, y, x)``), importing spconv only when called.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from medvit.core.values import triple
from pointcloud.structure import Point, SparseVoxels

if TYPE_CHECKING:  # spconv stays optional
    from spconv.pytorch import SparseConvTensor

__all__ = ["devoxelize", "from_spconv", "to_spconv", "voxel_centers", "voxelize"]


def _cells(extent: float, size: float) -> int:
    # 70.4 / 0.05 is 1407.9999999999998 in floats: snap near-integers, otherwise round up
    n = extent / size
    return int(round(n)) if abs(n - round(n)) < 1e-4 else math.ceil(n)


def voxelize(
    point: Point,
    voxel_size: float | Sequence[float] | None = None,
    point_range: Sequence[float] | None = None,
    reduce: Literal["mean", "max"] = "mean",
) -> tuple[SparseVoxels, torch.Tensor]:
    """Group points into unique voxels.

    Args:
        point: N points in B clouds.
        voxel_size: voxel edge in metres, one number or ``(x, y, z)``. None uses
            ``point.grid_coord`` as the voxel indices (and ``point.grid_size``).
        point_range: ``(x_min, y_min, z_min, x_max, y_max, z_max)`` in metres (OpenPCDet's
            order). Voxel 0 starts at the minimum; points outside ``[min, max)`` are
            dropped. None: the grid covers the batch, aligned to multiples of
            ``voxel_size`` in world coordinates, so a point falls in the same voxel
            whichever tile or crop it arrives with.
        reduce: how the features of the points in one voxel combine: ``"mean"`` or ``"max"``.

    Returns:
        ``(voxels, inverse)``: ``voxels.indices`` ``(M, 4)`` int32 ``(batch, z, y, x)``,
        sorted by batch then z, y, x; ``voxels.features`` ``(M, C)``;
        ``voxels.spatial_shape`` ``(nz, ny, nx)``; ``voxels.dropped`` the number of points
        outside ``point_range``. ``inverse`` ``(N,)`` int64 is each point's voxel row, -1
        for dropped points.
    """
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    coord = point.coord
    device = coord.device
    origin: tuple[float, float, float] | None = None
    if voxel_size is None:
        if point.grid_coord is None:
            raise ValueError("voxel_size is None and point.grid_coord is not set")
        if point_range is not None:
            raise ValueError("point_range needs voxel_size (grid_coord is already a grid)")
        grid = point.grid_coord.long()
        if grid.numel() and bool((grid < 0).any()):
            raise ValueError("point.grid_coord has negative indices")
        inside = torch.ones(point.num_points, dtype=torch.bool, device=device)
        shape_xyz = (grid.amax(0) + 1).tolist() if grid.numel() else [1, 1, 1]
        vs = None if point.grid_size is None else triple(point.grid_size, "point.grid_size", kind=float)
    else:
        vs = triple(voxel_size, "voxel_size", kind=float)
        size = torch.tensor(vs, dtype=torch.float64, device=device)
        if point_range is not None:
            if len(point_range) != 6 or not all(point_range[i + 3] > point_range[i] for i in range(3)):
                raise ValueError(f"point_range must be (x_min, y_min, z_min, x_max, y_max, z_max), got {point_range}")
            lo = torch.tensor(point_range[:3], dtype=torch.float64, device=device)
            hi = torch.tensor(point_range[3:], dtype=torch.float64, device=device)
            shape_xyz = [_cells(float(point_range[i + 3] - point_range[i]), vs[i]) for i in range(3)]
            c = coord.double()
            grid = torch.floor((c - lo) / size).long()
            limit = torch.tensor(shape_xyz, device=device)
            inside = ((c >= lo) & (c < hi) & (grid >= 0) & (grid < limit)).all(1)
            origin = tuple(float(x) for x in point_range[:3])
        else:
            g = torch.floor(coord.double() / size).long()
            inside = torch.ones(point.num_points, dtype=torch.bool, device=device)
            gmin = g.amin(0) if g.numel() else torch.zeros(3, dtype=torch.long, device=device)
            grid = g - gmin
            shape_xyz = (grid.amax(0) + 1).tolist() if grid.numel() else [1, 1, 1]
            origin = tuple((gmin.double() * size).tolist())

    nx, ny, nz = (int(s) for s in shape_xyz)
    b = point.batch[inside]
    g = grid[inside]
    key = ((b * nz + g[:, 2]) * ny + g[:, 1]) * nx + g[:, 0]
    ukey, inv = torch.unique(key, sorted=True, return_inverse=True)
    indices = torch.stack(
        [ukey // (nz * ny * nx), (ukey // (ny * nx)) % nz, (ukey // nx) % ny, ukey % nx], dim=1
    ).int()

    feat = point.feat[inside]
    m = ukey.shape[0]
    if reduce == "mean":
        sums = feat.new_zeros(m, feat.shape[1]).index_add_(0, inv, feat)
        counts = torch.bincount(inv, minlength=m).clamp_min(1).to(feat.dtype)
        features = sums / counts[:, None]
    else:
        features = feat.new_zeros(m, feat.shape[1]).scatter_reduce_(
            0, inv[:, None].expand_as(feat), feat, reduce="amax", include_self=False
        )

    inverse = torch.full((point.num_points,), -1, dtype=torch.long, device=device)
    inverse[inside] = inv
    voxels = SparseVoxels(
        features=features,
        indices=indices,
        spatial_shape=(nz, ny, nx),
        batch_size=point.batch_size,
        voxel_size=vs,
        origin=origin,
        dropped=int((~inside).sum()),
    )
    return voxels, inverse


def devoxelize(voxel_feats: torch.Tensor, inverse: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Voxel features ``(M, C)`` -> point features ``(N, C)`` through ``inverse`` ``(N,)``.

    Points whose ``inverse`` is -1 (outside the voxelised range) get ``fill``.
    Differentiable with respect to ``voxel_feats``.
    """
    if inverse.ndim != 1:
        raise ValueError(f"inverse must be (N,), got {tuple(inverse.shape)}")
    gathered = voxel_feats[inverse.clamp_min(0)]
    outside = (inverse < 0)[:, None]
    return torch.where(outside, torch.full_like(gathered, fill), gathered)


def voxel_centers(voxels: SparseVoxels) -> torch.Tensor:
    """World ``(x, y, z)`` in metres of each voxel's centre, ``(M, 3)`` float32."""
    if voxels.voxel_size is None or voxels.origin is None:
        raise ValueError("these voxels carry no voxel_size/origin (not made from metric points)")
    zyx = voxels.indices[:, 1:].double()
    xyz = zyx.flip(1)
    size = torch.tensor(voxels.voxel_size, dtype=torch.float64, device=xyz.device)
    origin = torch.tensor(voxels.origin, dtype=torch.float64, device=xyz.device)
    return (origin + (xyz + 0.5) * size).float()


def to_spconv(voxels: SparseVoxels) -> SparseConvTensor:
    """An spconv ``SparseConvTensor`` over the same sites; it reuses ``voxels.cache["spconv"]``
    (spconv's ``indice_dict``) so spconv layers find the pairs built earlier."""
    from spconv.pytorch import SparseConvTensor

    return SparseConvTensor(
        voxels.features,
        voxels.indices,
        list(voxels.spatial_shape),
        voxels.batch_size,
        indice_dict=voxels.cache.get("spconv"),
    )


def from_spconv(tensor: SparseConvTensor, like: SparseVoxels | None = None) -> SparseVoxels:
    """A :class:`SparseVoxels` over an spconv tensor's sites.

    With ``like``, metadata (voxel size, origin) and the cache dict are carried over and
    the cache's ``"spconv"`` entry is updated with the tensor's ``indice_dict`` (spconv
    copies that dict on every layer, so the newest one holds every key so far).
    """
    cache = {} if like is None else like.cache
    cache["spconv"] = tensor.indice_dict
    return SparseVoxels(
        features=tensor.features,
        indices=tensor.indices,
        spatial_shape=tuple(int(s) for s in tensor.spatial_shape),
        batch_size=int(tensor.batch_size),
        voxel_size=None if like is None else like.voxel_size,
        origin=None if like is None else like.origin,
        dropped=0 if like is None else like.dropped,
        cache=cache,
    )
