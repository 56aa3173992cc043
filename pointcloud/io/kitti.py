"""Raw float32 scans (KITTI/SemanticKITTI ``.bin``, nuScenes ``.pcd.bin``) and SemanticKITTI ``.label`` files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medvit.errors import InputError
from pointcloud.io.cloud import PointCloud

# format key -> per-point float32 columns after x, y, z
RAW_LAYOUTS = {"kitti": ["intensity"], "nuscenes": ["intensity", "ring"]}


def _records(path: Path, dtype: np.dtype, width: int, what: str) -> np.ndarray:
    """The file as ``(N, width)`` values of ``dtype``; InputError when the size is not whole records."""
    size = path.stat().st_size
    record = dtype.itemsize * width
    if size % record:
        raise InputError(path, f"file size {size} bytes is not a multiple of the {record}-byte {what} record "
                               f"({size // record} whole records and {size % record} bytes left over)")
    return np.fromfile(path, dtype=dtype).reshape(-1, width)


def read_raw_scan(path: Path, layout: str, columns: int | None = None) -> PointCloud:
    """A headerless little-endian float32 scan, ``(N, 3 + F)``: x, y, z then ``RAW_LAYOUTS[layout]``.

    ``columns`` overrides the layout's width for ``.bin`` files written with another one (mmdet3d's
    ``load_dim``: Waymo's are 6 wide): x, y, z, then ``intensity``, then ``f4``, ``f5``, ...
    The file cannot tell: a 6-column file of an even point count reads as 4 columns too.
    """
    if columns is None:
        names = RAW_LAYOUTS[layout]
    else:
        if not 3 <= columns <= 64:
            raise ValueError(f"columns must be 3..64, got {columns}")
        names = ["intensity", *(f"f{k}" for k in range(4, columns))][: columns - 3]
    table = _records(path, np.dtype("<f4"), 3 + len(names), f"{layout} point (float32 x y z {' '.join(names)})")
    return PointCloud(xyz=table[:, :3].astype(np.float64), features=table[:, 3:], feature_names=list(names),
                      source=str(path), meta={"format": layout, "feature_dtypes": dict.fromkeys(names, "float32")})


def read_label_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-point labels from a SemanticKITTI ``.label`` or a ``.npy`` file.

    ``.label``: uint32 per point, semantic id in the low 16 bits, instance id in the high 16;
    returns ``(semantic, instance)`` as ``(N,)`` int64. ``.npy``: ``(N,)`` integer semantic ids, or
    ``(N, 2)`` ``[semantic, instance]`` columns (what :func:`pointcloud.io.writers.write_labels` writes).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "label file not found")
    if path.suffix.lower() == ".label":
        raw = _records(path, np.dtype("<u4"), 1, "uint32 label")[:, 0]
        return (raw & 0xFFFF).astype(np.int64), (raw >> 16).astype(np.int64)
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as e:  # pickled/malformed header; empty file
            raise InputError(path, f"not a readable .npy label array ({e or 'empty file'})") from None
        if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (1, 2) or \
                (array.ndim == 2 and array.shape[1] != 2):
            raise InputError(path, f"expected (N,) or (N, 2) integer labels, got {array.dtype} {array.shape}")
        if array.ndim == 1:
            return array.astype(np.int64), None
        return array[:, 0].astype(np.int64), array[:, 1].astype(np.int64)
    raise InputError(path, "label files must be .label (SemanticKITTI) or .npy")


def sibling_label_path(scan: Path) -> Path | None:
    """SemanticKITTI's layout: ``seq/velodyne/NAME.bin`` is labelled by ``seq/labels/NAME.label``."""
    candidate = scan.parent.parent / "labels" / (scan.stem + ".label")
    return candidate if candidate.is_file() else None
