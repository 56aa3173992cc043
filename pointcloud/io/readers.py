"""``read_points``: one entry for every scan format, with the checks every format shares."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from medvit.core.errors import InputError, listed
from pointcloud.io.cloud import PointCloud, drop_nonfinite, integer_labels, logger
from pointcloud.io.kitti import RAW_LAYOUTS, read_label_file, read_raw_scan, sibling_label_path

# format key -> suffixes; ".pcd.bin" is matched before ".bin"
FORMATS = {
    "nuscenes": (".pcd.bin",),
    "kitti": (".bin",),
    "pcd": (".pcd",),
    "ply": (".ply",),
    "las": (".las",),
    "laz": (".laz",),
    "npy": (".npy",),
}
SUPPORTED = ("KITTI/SemanticKITTI .bin, nuScenes .pcd.bin, .pcd (ascii, binary, binary_compressed), .ply, "
             ".las, .laz, .npy")


def check_scan_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path; InputError when it is missing, a folder, or not a regular file."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a folder, not a scan file")
    if not path.is_file():
        raise InputError(path, "is not a file")
    return path


def detect_format(path: str | os.PathLike) -> str:
    """The format key for ``path``'s suffix (InputError listing the supported ones)."""
    name = Path(path).name.lower()
    for key, suffixes in FORMATS.items():
        if any(name.endswith(s) for s in suffixes):
            return key
    raise InputError(path, f"unknown point-cloud suffix; supported: {SUPPORTED}")


def _real(dtype: np.dtype) -> bool:
    """Integer or floating (not complex, string or object): what a coordinate or feature can be."""
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def _read_npy(path: Path) -> PointCloud:
    """``(N, >=3)`` float array: x, y, z then features ``f0, f1, ...``; or a structured array with
    ``x``, ``y``, ``z`` fields whose other numeric fields become features by name."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:  # pickled object arrays, malformed headers; an empty file
        raise InputError(path, f"not a readable .npy array ({e or 'empty file'})") from None
    meta = {"format": "npy"}
    if array.dtype.names:
        missing = [a for a in "xyz" if a not in array.dtype.names]
        if missing or array.ndim != 1:
            raise InputError(path, f"structured .npy needs a 1-D array with x, y, z fields, got {array.dtype}")
        for n in array.dtype.names:
            kind = array.dtype[n]
            if kind.subdtype is not None or not (_real(kind) or kind == np.bool_):
                raise InputError(path, f"structured .npy field {n!r} is {kind}; every field must be one number a point")
        names = [n for n in array.dtype.names if n not in ("x", "y", "z", "label")]
        xyz = np.stack([array[a].astype(np.float64) for a in "xyz"], axis=1)
        features = np.stack([array[n].astype(np.float32) for n in names], axis=1) if names \
            else np.zeros((len(xyz), 0), np.float32)
        meta["feature_dtypes"] = {n: array.dtype[n].name for n in names}
        labels = integer_labels(array["label"], path) if "label" in array.dtype.names else None
        return PointCloud(xyz=xyz, features=features, feature_names=names, labels=labels, source=str(path), meta=meta)
    if array.ndim != 2 or array.shape[1] < 3 or not _real(array.dtype):
        raise InputError(path, f"expected an (N, >=3) numeric array (x, y, z, features...), got {array.dtype} "
                               f"{array.shape}")
    if array.shape[0] < array.shape[1] and array.shape[0] <= 16:
        logger.warning("%s: reads as %d points of %d columns (x, y, z, f0...); if the array is (columns, points), "
                       "save its transpose", path, array.shape[0], array.shape[1])
    names = [f"f{k}" for k in range(array.shape[1] - 3)]
    meta["feature_dtypes"] = dict.fromkeys(names, array.dtype.name)
    return PointCloud(xyz=array[:, :3], features=array[:, 3:], feature_names=names, source=str(path), meta=meta)


def _select_fields(cloud: PointCloud, fields: Sequence[str]) -> PointCloud:
    missing = [f for f in fields if f not in cloud.feature_names]
    if missing:
        raise InputError(cloud.source, f"no field {', '.join(missing)} in this {cloud.meta['format']} file "
                                       f"(it has {listed(cloud.feature_names) if cloud.feature_names else 'no per-point fields'})")
    cols = [cloud.feature_names.index(f) for f in fields]
    cloud.features, cloud.feature_names = cloud.features[:, cols], list(fields)
    return cloud


def _attach_labels(cloud: PointCloud, label_path: Path) -> None:
    semantic, instance = read_label_file(label_path)
    if len(semantic) != len(cloud):
        hint = cloud.meta.get("width_hint")
        width = (f" as {hint['read']} float32 columns; read as {hint['better']} columns, which fit its values far "
                 f"better, it has {hint['points_better']}") if hint else ""
        raise InputError(label_path, f"holds {len(semantic)} labels but the scan {cloud.source} has "
                                     f"{len(cloud)} points{width}")
    cloud.labels, cloud.instance = semantic, instance
    cloud.meta["label_path"] = str(label_path)


def read_points(
    path: str | os.PathLike,
    *,
    format: str | None = None,
    label_path: str | os.PathLike | None = None,
    fields: Sequence[str] | None = None,
    nonfinite: Literal["drop", "error"] = "drop",
    sibling_labels: bool = True,
    bin_columns: int | None = None,
    warn_nonfinite: bool = True,
) -> PointCloud:
    """Read a scan into a :class:`PointCloud` (``xyz`` ``(N, 3)`` float64, ``features`` ``(N, F)`` float32).

    Args:
        path: the scan.
        format: ``kitti`` (``.bin``: float32 x, y, z, intensity), ``nuscenes`` (``.pcd.bin``:
            x, y, z, intensity, ring), ``pcd``, ``ply``, ``las``, ``laz``, ``npy``; default from the suffix.
        label_path: per-point labels (SemanticKITTI ``.label`` or ``.npy``) filling ``labels`` and
            ``instance``. For ``kitti`` scans left ``None``, ``../labels/NAME.label`` is used when it
            exists (SemanticKITTI's layout) and ``sibling_labels`` is true (segmenting needs no labels).
        fields: the per-point values to keep as features, in this order; InputError naming any the
            file lacks. For LAS these are dimension names (default ``["intensity"]``); elsewhere the
            default keeps every field the file has.
        bin_columns: float32 columns of a ``kitti``/``nuscenes`` file when not the layout's own
            (4 and 5): x, y, z, intensity, then ``f4``, ``f5``, ...
        nonfinite: ``"drop"`` removes points with NaN/inf coordinates (count in
            ``meta["dropped_nonfinite"]``, survivors' file indices in ``meta["kept_index"]``, one
            logged warning unless ``warn_nonfinite`` is false); ``"error"`` raises InputError with the count.

    ``meta["n_points_file"]`` is the number of points in the file, before any are dropped.
    """
    path = check_scan_file(path)
    key = detect_format(path) if format is None else format.lower()
    if key not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if nonfinite not in ("drop", "error"):
        raise ValueError(f"nonfinite must be 'drop' or 'error', got {nonfinite!r}")
    if key in RAW_LAYOUTS:
        cloud = read_raw_scan(path, key, bin_columns)
    elif key == "pcd":
        from pointcloud.io.pcd import read_pcd

        cloud = read_pcd(path)
    elif key == "ply":
        from pointcloud.io.ply import read_ply

        cloud = read_ply(path)
    elif key in ("las", "laz"):
        from pointcloud.io.las import read_las  # laspy only when a LAS file is read

        cloud = read_las(path, fields)
    else:
        cloud = _read_npy(path)
    if len(cloud) == 0:
        raise InputError(path, "holds no points")
    cloud.meta["n_points_file"] = len(cloud)
    if fields is not None and key not in ("las", "laz"):
        cloud = _select_fields(cloud, fields)
    if label_path is None and key == "kitti" and sibling_labels:
        label_path = sibling_label_path(path)
    if label_path is not None:
        _attach_labels(cloud, Path(label_path))
    return drop_nonfinite(cloud, nonfinite, warn=warn_nonfinite)
