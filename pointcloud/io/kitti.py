"""Raw float32 scans (KITTI/SemanticKITTI ``.bin``, nuScenes ``.pcd.bin``) and SemanticKITTI ``.label`` files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medvit.core.errors import InputError
from pointcloud.io.cloud import PointCloud

# format key -> per-point float32 columns after x, y, z
RAW_LAYOUTS = {"kitti": ["intensity"], "nuscenes": ["intensity", "ring"]}
WIDTHS = range(3, 17)
"""The float32 widths a ``.bin`` is tried at when its size allows them."""
_ROWS = 20_000  # rows of each width that are scored: enough to tell, cheap on a 10M-point scan


def width_fit(flat: np.ndarray, width: int) -> tuple[float, float]:
    """How implausibly ``flat`` float32 values read as ``width`` columns (first rows only): ``(mixing, jump)``.

    ``mixing``: mean over columns of the share of a column's non-zero values that are not of its
    commonest kind (whole numbers 1..255 such as colours or rings; garbage: NaN, inf, denormals,
    magnitudes past 1e12; anything else): a right width keeps each column one kind.
    ``jump``: median over rows of how many orders of magnitude x, y, z change from one row to the
    next (mean over the three): a wrong width puts colours or intensity into the coordinates.
    """
    rows = min(len(flat) // width, _ROWS)
    t = flat[: rows * width].reshape(rows, width).astype(np.float64)
    with np.errstate(all="ignore"):
        a = np.abs(t)
        garbage = ~np.isfinite(t) | ((a > 0) & (a < 1e-30)) | (a > 1e12)
        byte = ~garbage & (t == np.round(t)) & (t >= 1) & (t <= 255)
        nonzero = t != 0
        mixing = []
        for c in range(width):
            n = int(nonzero[:, c].sum())
            if n:
                g, b = int((garbage[:, c] & nonzero[:, c]).sum()), int((byte[:, c] & nonzero[:, c]).sum())
                mixing.append(1 - max(g, b, n - g - b) / n)
        orders = np.log10(np.where(nonzero[:, :3] & ~garbage[:, :3], a[:, :3], np.nan))
        steps = np.abs(np.diff(orders, axis=0))
        per_axis = [np.nanmedian(s) for s in steps.T if np.isfinite(s).any()]
    return (float(np.mean(mixing)) if mixing else 0.0), (float(np.mean(per_axis)) if per_axis else 0.0)


def better_width(flat: np.ndarray, width: int) -> dict | None:
    """The width that reads ``flat`` float32 values far more plausibly than ``width`` (see
    :func:`width_fit`), with both readings' scores; None when ``width`` reads them about as well
    as any. Of widths that read them about equally well the smallest is named (a multiple of the
    right width reads them as well as it does)."""
    if len(flat) // width < 16:  # too few rows to judge
        return None
    fits = {w: width_fit(flat, w) for w in {*WIDTHS, width} if len(flat) % w == 0 and len(flat) // w >= 8}
    score = {w: m + j / 2 for w, (m, j) in fits.items()}
    best = min(score.values())
    if score[width] <= best + 0.3:
        return None
    w = min(k for k, s in score.items() if s <= best + 0.1)
    return {"read": width, "better": w, "points_read": len(flat) // width, "points_better": len(flat) // w,
            "fit_read": fits[width], "fit_better": fits[w]}


def width_message(hint: dict) -> str:
    """One sentence for :func:`better_width`'s finding, naming the width and the option."""
    (m0, j0), (m1, j1) = hint["fit_read"], hint["fit_better"]
    w0, w1 = hint["read"], hint["better"]
    return (f"reads as {w0} float32 columns ({hint['points_read']} points), but {w1} columns "
            f"({hint['points_better']} points) read it far better: as {w0}, x, y, z jump by {j0:.1f} orders of "
            f"magnitude from row to row (as {w1}: {j1:.1f}) and {100 * m0:.0f} % of a column's values differ in kind "
            f"from the rest, such as whole numbers 0..255 beside coordinates (as {w1}: {100 * m1:.0f} %); "
            f"--bin-columns {w1} reads it so (mmdet3d's ScanNet, SUN RGB-D and S3DIS .bin files are 6: x y z r g b)")


def _records(path: Path, dtype: np.dtype, width: int, what: str) -> np.ndarray:
    """The file as ``(N, width)`` values of ``dtype``; InputError when the size is not whole records."""
    size = path.stat().st_size
    record = dtype.itemsize * width
    if size % record:
        raise InputError(path, f"file size {size} bytes is not a multiple of the {record}-byte {what} record "
                               f"({size // record} whole records and {size % record} bytes left over)")
    return np.fromfile(path, dtype=dtype).reshape(-1, width)


def read_raw_scan(path: Path, layout: str, bin_columns: int | None = None) -> PointCloud:
    """A headerless little-endian float32 scan, ``(N, 3 + F)``: x, y, z then ``RAW_LAYOUTS[layout]``.

    ``bin_columns`` overrides the layout's width for ``.bin`` files written with another one (mmdet3d's
    ``load_dim``: Waymo's are 6 wide): x, y, z, then ``intensity``, then ``f4``, ``f5``, ...
    The file cannot tell for sure: a 6-column file of an even point count reads as 4 columns too.
    When another width reads the values far more plausibly (:func:`better_width`),
    ``meta["width_hint"]`` says which; the reader itself does not warn (``lidar segment`` does, or
    refuses with ``--strict``).
    """
    if bin_columns is None:
        names = RAW_LAYOUTS[layout]
    else:
        if not 3 <= bin_columns <= 64:
            raise ValueError(f"columns must be 3..64, got {bin_columns}")
        names = ["intensity", *(f"f{k}" for k in range(4, bin_columns))][: bin_columns - 3]
    table = _records(path, np.dtype("<f4"), 3 + len(names), f"{layout} point (float32 x y z {' '.join(names)})")
    meta = {"format": layout, "feature_dtypes": dict.fromkeys(names, "float32")}
    if (hint := better_width(table.reshape(-1), table.shape[1])) is not None:
        meta["width_hint"] = hint
    return PointCloud(xyz=table[:, :3].astype(np.float64), features=table[:, 3:], feature_names=list(names),
                      source=str(path), meta=meta)


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
