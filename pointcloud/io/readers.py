"""``read_points``: one entry for every scan format, with the checks every format shares.

:data:`FORMATS` is the one table of scan formats: the suffixes that name each, the function that
reads it and the ``read_points`` options it takes. :func:`detect_format`, :func:`scan_stem` (output
names) and the messages listing the supported formats (:data:`SUPPORTED`) all read it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from medvit.core.errors import InputError, listed
from pointcloud.io.cloud import PointCloud, drop_nonfinite, integer_labels, logger
from pointcloud.io.kitti import read_label_file, sibling_label_path


@dataclass(frozen=True)
class ScanFormat:
    """One readable scan format.

    ``key`` is the ``format`` argument of :func:`read_points` and ``meta["format"]``; ``suffixes``
    (lower case) end the file names of this format; ``reader`` names the function
    ``module:function`` that reads a path into a :class:`PointCloud`, imported on first use (laspy
    only when a LAS file is read); ``options`` are the keyword arguments it takes (``layout``: the
    format key; ``bin_columns``, ``fields``: :func:`read_points`' own), and a reader that takes
    ``fields`` selects them itself; ``described`` is how messages name the format.
    """

    key: str
    suffixes: tuple[str, ...]
    reader: str
    described: str
    options: tuple[str, ...] = ()

    def read(self, path: Path, **options) -> PointCloud:
        """``path`` read by this format's reader, given those of ``options`` it takes."""
        module, _, name = self.reader.partition(":")
        fn = getattr(importlib.import_module(module), name)
        return fn(path, **{k: v for k, v in options.items() if k in self.options})


FORMATS: tuple[ScanFormat, ...] = (
    ScanFormat("kitti", (".bin",), "pointcloud.io.kitti:read_raw_scan", "KITTI/SemanticKITTI .bin",
               ("layout", "bin_columns")),
    ScanFormat("nuscenes", (".pcd.bin",), "pointcloud.io.kitti:read_raw_scan", "nuScenes .pcd.bin",
               ("layout", "bin_columns")),
    ScanFormat("pcd", (".pcd",), "pointcloud.io.pcd:read_pcd", ".pcd (ascii, binary, binary_compressed)"),
    ScanFormat("ply", (".ply",), "pointcloud.io.ply:read_ply", ".ply"),
    ScanFormat("las", (".las",), "pointcloud.io.las:read_las", ".las", ("fields",)),
    ScanFormat("laz", (".laz",), "pointcloud.io.las:read_las", ".laz", ("fields",)),
    ScanFormat("npy", (".npy",), "pointcloud.io.readers:read_npy", ".npy"),
)
"""Every scan format, in the order messages list them; a name matches its longest suffix
(``.pcd.bin`` is nuScenes, not KITTI)."""

SUPPORTED = ", ".join(f.described for f in FORMATS)


def _matching(name: str) -> tuple[ScanFormat, str] | None:
    """The format whose suffix ends ``name`` (case-insensitively), the longest one winning, and that suffix."""
    low = name.lower()
    hits = [(f, s) for f in FORMATS for s in f.suffixes if low.endswith(s)]
    return max(hits, key=lambda hit: len(hit[1]), default=None)


def scan_stem(path: str | os.PathLike) -> str:
    """``path``'s file name without its scan suffix (``x.pcd.bin`` -> ``x``); other names whole."""
    name = Path(path).name
    hit = _matching(name)
    return name[: -len(hit[1])] if hit is not None else name


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
    hit = _matching(Path(path).name)
    if hit is not None:
        return hit[0].key
    raise InputError(path, f"unknown point-cloud suffix; supported: {SUPPORTED}")


def _real(dtype: np.dtype) -> bool:
    """Integer or floating (not complex, string or object): what a coordinate or feature can be."""
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def read_npy(path: Path) -> PointCloud:
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
    fmt = next((f for f in FORMATS if f.key == key), None)
    if fmt is None:
        raise ValueError(f"format must be one of {', '.join(f.key for f in FORMATS)}, got {format!r}")
    if nonfinite not in ("drop", "error"):
        raise ValueError(f"nonfinite must be 'drop' or 'error', got {nonfinite!r}")
    cloud = fmt.read(path, layout=key, bin_columns=bin_columns, fields=fields)
    if len(cloud) == 0:
        raise InputError(path, "holds no points")
    cloud.meta["n_points_file"] = len(cloud)
    if fields is not None and "fields" not in fmt.options:
        cloud = _select_fields(cloud, fields)
    if label_path is None and key == "kitti" and sibling_labels:
        label_path = sibling_label_path(path)
    if label_path is not None:
        _attach_labels(cloud, Path(label_path))
    return drop_nonfinite(cloud, nonfinite, warn=warn_nonfinite)
