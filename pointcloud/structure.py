"""The records that flow through the point-cloud nets.

:class:`Point` is one batch of point clouds, Pointcept style: a single record carrying
coordinates, features, batch membership and voxel indices, plus a ``cache`` for things
computed once per batch (sort orders, serialisations), instead of loose tensors.

:class:`SparseVoxels` is the sparse voxel tensor the sparse convolutions read and write:
unique voxel sites with their features, the grid's shape and a ``cache`` that holds the
kernel neighbour maps by ``indice_key`` so each level of a net builds them once.

Axis conventions (the same as spconv and OpenPCDet):

- ``Point.coord`` is ``(x, y, z)`` in metres and ``Point.grid_coord`` is ``(x, y, z)``
  voxel indices, as in Pointcept;
- ``SparseVoxels.indices`` is ``(batch, z, y, x)`` and ``SparseVoxels.spatial_shape`` is
  ``(nz, ny, nx)``, the order spconv's ``SparseConvTensor`` expects; a dense view is
  ``(B, C, nz, ny, nx)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Point", "SparseVoxels", "batch2offset", "offset2batch"]


def offset2batch(offset: torch.Tensor) -> torch.Tensor:
    """Cumulative end indices ``(B,)`` -> per-point batch index ``(N,)`` int64."""
    counts = torch.diff(offset, prepend=offset.new_zeros(1))
    return torch.repeat_interleave(torch.arange(len(counts), device=offset.device), counts)


def batch2offset(batch: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Per-point batch index ``(N,)`` (sorted) -> cumulative end indices ``(B,)`` int64."""
    if batch_size is None:
        batch_size = int(batch.max()) + 1 if batch.numel() else 0
    return torch.cumsum(torch.bincount(batch, minlength=batch_size), 0)


def _as_tensor(x: Any, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    return torch.as_tensor(x).to(dtype)


@dataclass
class Point:
    """A batch of point clouds concatenated along the point axis.

    Args:
        coord: ``(N, 3)`` float32 point coordinates ``(x, y, z)`` in metres.
        feat: ``(N, C)`` float32 point features.
        offset: ``(B,)`` int64 cumulative point counts (cloud ``b`` is rows
            ``offset[b-1]:offset[b]``). Give ``offset`` or ``batch``; the other is derived.
        batch: ``(N,)`` int64 cloud index of each point, non-decreasing.
        grid_coord: ``(N, 3)`` int32 voxel indices ``(x, y, z)``, or None until gridded.
        grid_size: voxel edge length(s) in metres that ``grid_coord`` was made with.
        cache: per-batch results keyed by name (sort orders, serialisations, ...).
    """

    coord: torch.Tensor
    feat: torch.Tensor
    offset: torch.Tensor | None = None
    batch: torch.Tensor | None = None
    grid_coord: torch.Tensor | None = None
    grid_size: float | tuple[float, float, float] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.coord.ndim != 2 or self.coord.shape[1] != 3:
            raise ValueError(f"coord must be (N, 3), got {tuple(self.coord.shape)}")
        n = self.coord.shape[0]
        if self.feat.ndim != 2 or self.feat.shape[0] != n:
            raise ValueError(f"feat must be (N={n}, C), got {tuple(self.feat.shape)}")
        if self.offset is None and self.batch is None:
            raise ValueError("give offset or batch")
        if self.batch is None:
            self.offset = self.offset.long()
            self.batch = offset2batch(self.offset)
        elif self.offset is None:
            self.batch = self.batch.long()
            if self.batch.numel() > 1 and bool((self.batch[1:] < self.batch[:-1]).any()):
                raise ValueError("batch must be non-decreasing (points grouped by cloud)")
            self.offset = batch2offset(self.batch)
        end = int(self.offset[-1]) if len(self.offset) else 0
        if end != n:
            raise ValueError(f"offset ends at {end}, expected N={n}")
        if self.batch.shape != (n,):
            raise ValueError(f"batch must be (N={n},), got {tuple(self.batch.shape)}")
        if self.grid_coord is not None and self.grid_coord.shape != (n, 3):
            raise ValueError(f"grid_coord must be (N={n}, 3), got {tuple(self.grid_coord.shape)}")

    @classmethod
    def from_clouds(
        cls,
        coords: Sequence[torch.Tensor | np.ndarray],
        feats: Sequence[torch.Tensor | np.ndarray] | None = None,
        device: torch.device | str | None = None,
    ) -> Point:
        """Batch a list of clouds ``[(N_i, 3), ...]`` into one :class:`Point`.

        ``feats`` is a matching list of ``(N_i, C)`` arrays; when None the coordinates
        themselves are the features (C = 3).
        """
        if len(coords) == 0:
            raise ValueError("from_clouds needs at least one cloud")
        coord_list = [_as_tensor(c, torch.float32) for c in coords]
        for i, c in enumerate(coord_list):
            if c.ndim != 2 or c.shape[1] != 3:
                raise ValueError(f"cloud {i}: coordinates must be (N, 3), got {tuple(c.shape)}")
        if feats is None:
            feat_list = [c.clone() for c in coord_list]
        else:
            if len(feats) != len(coords):
                raise ValueError(f"{len(feats)} feature arrays for {len(coords)} clouds")
            feat_list = [_as_tensor(f, torch.float32) for f in feats]
            for i, (c, f) in enumerate(zip(coord_list, feat_list)):
                if f.ndim == 1:
                    feat_list[i] = f = f[:, None]
                if f.shape[0] != c.shape[0]:
                    raise ValueError(f"cloud {i}: {c.shape[0]} points but {f.shape[0]} feature rows")
            if len({f.shape[1] for f in feat_list}) != 1:
                raise ValueError(f"clouds have different feature widths {[f.shape[1] for f in feat_list]}")
        offset = torch.cumsum(torch.tensor([c.shape[0] for c in coord_list], dtype=torch.long), 0)
        return cls(
            coord=torch.cat(coord_list).to(device),
            feat=torch.cat(feat_list).to(device),
            offset=offset.to(device),
        )

    @property
    def batch_size(self) -> int:
        return len(self.offset)

    @property
    def num_points(self) -> int:
        return self.coord.shape[0]

    def to(self, device: torch.device | str) -> Point:
        """A copy on ``device``; the cache is dropped (its tensors belong to the old device)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Point(
            coord=move(self.coord),
            feat=move(self.feat),
            offset=move(self.offset),
            batch=move(self.batch),
            grid_coord=move(self.grid_coord),
            grid_size=self.grid_size,
        )


@dataclass
class SparseVoxels:
    """A batch of sparse voxel grids: the input and output of the sparse convolutions.

    Args:
        features: ``(M, C)`` features of the active sites.
        indices: ``(M, 4)`` int32 ``(batch, z, y, x)`` of each active site, unique rows.
        spatial_shape: ``(nz, ny, nx)`` grid size; every index lies inside it.
        batch_size: number of grids B (batch indices lie in ``[0, B)``).
        voxel_size: voxel edge ``(x, y, z)`` in metres, when the grid came from points.
        origin: world ``(x, y, z)`` of the corner of voxel ``(0, 0, 0)``, in metres.
        dropped: points that fell outside the voxelised range.
        cache: neighbour maps by ``indice_key`` (``cache["maps"]``) and spconv's
            ``indice_dict`` (``cache["spconv"]``). Shared by every tensor a net derives
            from this one, like spconv's ``indice_dict``.
    """

    features: torch.Tensor
    indices: torch.Tensor
    spatial_shape: tuple[int, int, int]
    batch_size: int
    voxel_size: tuple[float, float, float] | None = None
    origin: tuple[float, float, float] | None = None
    dropped: int = 0
    cache: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spatial_shape = tuple(int(s) for s in self.spatial_shape)
        if len(self.spatial_shape) != 3:
            raise ValueError(f"spatial_shape must be (nz, ny, nx), got {self.spatial_shape}")
        if self.indices.ndim != 2 or self.indices.shape[1] != 4:
            raise ValueError(f"indices must be (M, 4) as (batch, z, y, x), got {tuple(self.indices.shape)}")
        if self.features.ndim != 2 or self.features.shape[0] != self.indices.shape[0]:
            raise ValueError(
                f"features must be (M={self.indices.shape[0]}, C), got {tuple(self.features.shape)}"
            )
        if self.indices.dtype != torch.int32:
            self.indices = self.indices.int()

    @property
    def num_sites(self) -> int:
        return self.indices.shape[0]

    def replace_feature(self, features: torch.Tensor) -> SparseVoxels:
        """Same sites (and shared cache) with new ``(M, C')`` features."""
        return SparseVoxels(
            features=features,
            indices=self.indices,
            spatial_shape=self.spatial_shape,
            batch_size=self.batch_size,
            voxel_size=self.voxel_size,
            origin=self.origin,
            dropped=self.dropped,
            cache=self.cache,
        )

    def dense(self) -> torch.Tensor:
        """``(B, C, nz, ny, nx)`` dense copy (zeros at inactive sites); small grids only."""
        out = self.features.new_zeros(self.batch_size, *self.spatial_shape, self.features.shape[1])
        i = self.indices.long()
        out = out.index_put((i[:, 0], i[:, 1], i[:, 2], i[:, 3]), self.features)
        return out.permute(0, 4, 1, 2, 3).contiguous()

    def to(self, device: torch.device | str) -> SparseVoxels:
        """A copy on ``device`` with an empty cache (cached maps stay with their device)."""
        return SparseVoxels(
            features=self.features.to(device),
            indices=self.indices.to(device),
            spatial_shape=self.spatial_shape,
            batch_size=self.batch_size,
            voxel_size=self.voxel_size,
            origin=self.origin,
            dropped=self.dropped,
        )
