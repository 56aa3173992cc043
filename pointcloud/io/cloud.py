"""The one record every scan reader returns, and the range helpers used before voxelisation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from medvit.core.errors import InputError

logger = logging.getLogger(__name__)


@dataclass
class PointCloud:
    """One scan's points as read from a file.

    Attributes:
        xyz: ``(N, 3)`` float64 coordinates (float64 so UTM-sized LAS coordinates keep their
            millimetres).
        features: ``(N, F)`` float32 per-point values, named by ``feature_names`` (``F`` may be 0).
        feature_names: ``F`` names, e.g. ``["intensity"]``, ``["intensity", "ring"]``,
            ``["r", "g", "b"]``.
        labels: optional ``(N,)`` int64 semantic ids as the file stores them (SemanticKITTI raw
            ids, LAS classification codes), not remapped.
        instance: optional ``(N,)`` int64 instance ids.
        source: the file the points came from.
        meta: format details: ``format``, ``n_points_file`` (points in the file), and for LAS the
            header's ``scale``/``offset``/``point_format``/``version``/``crs``; ``kept_index``
            ``(N,)`` int64, present when the cloud holds a subset of the file's points, gives each
            point's index in the file's order (see :func:`to_file_order`); ``feature_dtypes``
            maps each feature name to the numpy type the file stores it in (``"uint16"`` for LAS
            intensity), which the float32 ``features`` no longer show.
    """

    xyz: np.ndarray
    features: np.ndarray
    feature_names: list[str]
    labels: np.ndarray | None = None
    instance: np.ndarray | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.xyz = np.asarray(self.xyz, dtype=np.float64)
        if self.xyz.ndim != 2 or self.xyz.shape[1] != 3:
            raise ValueError(f"xyz must be (N, 3), got shape {self.xyz.shape}")
        n = self.xyz.shape[0]
        self.features = np.asarray(self.features, dtype=np.float32)
        self.feature_names = list(self.feature_names)
        if self.features.shape != (n, len(self.feature_names)):
            raise ValueError(f"features must be ({n}, {len(self.feature_names)}) for {len(self.feature_names)} "
                             f"names, got {self.features.shape}")
        for name in ("labels", "instance"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value)
                if value.shape != (n,) or not np.issubdtype(value.dtype, np.integer):
                    raise ValueError(f"{name} must be an integer ({n},) array, got {value.dtype} {value.shape}")
                setattr(self, name, value.astype(np.int64, copy=False))

    def __len__(self) -> int:
        return self.xyz.shape[0]

    def feature(self, name: str) -> np.ndarray:
        """The ``(N,)`` column of feature ``name`` (KeyError listing the names when absent)."""
        if name not in self.feature_names:
            raise KeyError(f"no feature {name!r}; this cloud has {self.feature_names}")
        return self.features[:, self.feature_names.index(name)]

    def select(self, index: np.ndarray) -> PointCloud:
        """A new cloud with the points at ``index`` (int array or (N,) bool mask).

        ``meta["kept_index"]`` is composed so it still maps every point to the file's order.
        """
        index = np.asarray(index)
        if index.dtype == np.bool_:
            if index.shape != (len(self),):
                raise ValueError(f"mask must be ({len(self)},), got {index.shape}")
            index = np.flatnonzero(index)
        index = index.astype(np.int64, copy=False)
        meta = dict(self.meta)
        previous = meta.get("kept_index")
        meta["kept_index"] = index if previous is None else previous[index]
        return replace(
            self,
            xyz=self.xyz[index],
            features=self.features[index],
            labels=None if self.labels is None else self.labels[index],
            instance=None if self.instance is None else self.instance[index],
            meta=meta,
        )


def integer_labels(values: np.ndarray, source, field: str = "label") -> np.ndarray:
    """``values`` as int64 labels; InputError naming ``source`` when a value is NaN, infinite or
    not a whole number (a float column cast blindly gives -2**63 for NaN)."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.integer):
        bad = ~np.isfinite(values) | (values != np.round(values))
        if bad.any():
            raise InputError(source, f"field {field!r} holds {values[bad][0]}, which is not a whole-number label "
                                     f"({int(bad.sum())} such points)")
    return values.astype(np.int64)


def drop_nonfinite(cloud: PointCloud, mode: str = "drop", *, warn: bool = True) -> PointCloud:
    """Remove (``"drop"``) or refuse (``"error"``) points whose coordinates are NaN or infinite.

    Dropping records the count in ``meta["dropped_nonfinite"]`` and the survivors' file indices in
    ``meta["kept_index"]``, and logs one warning for the file unless ``warn`` is false (a caller
    that says itself what becomes of those points).
    """
    if mode not in ("drop", "error"):
        raise ValueError(f"nonfinite must be 'drop' or 'error', got {mode!r}")
    finite = np.isfinite(cloud.xyz).all(axis=1)
    bad = len(cloud) - int(finite.sum())
    cloud.meta["dropped_nonfinite"] = 0
    if bad == 0:
        return cloud
    if mode == "error":
        raise InputError(cloud.source, f"{bad} of {len(cloud)} points have NaN or infinite coordinates")
    if bad == len(cloud):
        raise InputError(cloud.source, f"all {bad} points have NaN or infinite coordinates")
    if warn:
        logger.warning("%s: dropped %s of %s points with NaN or infinite coordinates", cloud.source, f"{bad:,}",
                       f"{len(cloud):,}")
    out = cloud.select(finite)
    out.meta["dropped_nonfinite"] = bad
    return out


def to_file_order(cloud: PointCloud, values: np.ndarray, *, fill=0) -> np.ndarray:
    """Per-point ``values`` ``(N, ...)`` of ``cloud`` placed back in the file's order and count.

    Points the reader dropped (non-finite) or a crop removed get ``fill``; the result has
    ``meta["n_points_file"]`` rows, ready to be written beside the input.
    """
    values = np.asarray(values)
    if values.shape[0] != len(cloud):
        raise ValueError(f"values have {values.shape[0]} rows, the cloud {len(cloud)} points")
    kept = cloud.meta.get("kept_index")
    if kept is None:
        return values
    if "n_points_file" not in cloud.meta:
        raise ValueError("cloud.meta has kept_index but no n_points_file; it was not made by read_points")
    out = np.full((int(cloud.meta["n_points_file"]),) + values.shape[1:], fill, dtype=values.dtype)
    out[kept] = values
    return out


def _check_range(range_xyz: Sequence[float]) -> np.ndarray:
    r = np.asarray(range_xyz, dtype=np.float64)
    if r.shape != (6,) or not np.all(r[:3] < r[3:]):
        raise ValueError(f"range must be (xmin, ymin, zmin, xmax, ymax, zmax) with min < max, got {list(r)}")
    return r


def points_in_range(cloud: PointCloud | np.ndarray, range_xyz: Sequence[float]) -> np.ndarray:
    """``(N,)`` bool: points with ``min <= p < max`` on every axis.

    ``range_xyz`` is ``(xmin, ymin, zmin, xmax, ymax, zmax)`` (mmdet3d's ``point_cloud_range``);
    the upper bound is open, as a voxel grid of that extent has no cell for ``p == max``.
    ``cloud`` may be a :class:`PointCloud` or an ``(N, >=3)`` array.
    """
    r = _check_range(range_xyz)
    xyz = cloud.xyz if isinstance(cloud, PointCloud) else np.asarray(cloud)[:, :3]
    return np.all((xyz >= r[:3]) & (xyz < r[3:]), axis=1)


def crop_to_range(cloud: PointCloud, range_xyz: Sequence[float]) -> tuple[PointCloud, int]:
    """The points of ``cloud`` inside ``range_xyz`` (see :func:`points_in_range`) and how many were outside.

    The cropped cloud's ``meta["kept_index"]`` still maps its points to the file's order.
    """
    mask = points_in_range(cloud, range_xyz)
    outside = len(cloud) - int(mask.sum())
    if outside == 0:
        return cloud, 0
    return cloud.select(mask), outside
