"""What every format reader hands back, and the geometry helpers they share."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""Left-multiplying an ITK/DICOM (LPS) voxel->world matrix by this gives nibabel's RAS one."""

def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (``hashlib.file_digest`` needs Python 3.11)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class RawVolume:
    """One file's (or DICOM series') voxels and geometry before they become a MetaTensor.

    ``array`` is channel-first ``(C, X, Y, Z)`` in the file's own dtype (native byte order);
    ``affine`` maps voxel indices to RAS mm, float64 ``(4, 4)``. The channels of a 4D NIfTI
    are its 4th axis, time points included.
    """

    array: np.ndarray
    affine: np.ndarray
    path: Path
    source: dict[str, str] = field(default_factory=dict)
    time_points: int = 0
    """The channels' count when they are a time series (a NIfTI whose 4th axis is time), else 0."""
    codes: tuple[int, int] = (1, 1)
    """NIfTI (sform, qform) codes of the file; scanner (1) for the other formats."""
    label_names: dict[int, str] | None = None
    """Label number -> name for label objects that carry names (DICOM SEG segment labels, RTSTRUCT
    ROI names); None for plain label maps. Readers put it in ``meta["medvit_label_names"]``."""


def source_info(fmt: str, series_uid: str = "", series_description: str = "", modality: str = "",
                series_number: str = "") -> dict[str, str]:
    """The ``meta["medvit_source"]`` mapping; the same keys for every format so batches collate
    (DICOM's Modality and SeriesNumber tags; empty where a format has none)."""
    return {"format": fmt, "series_uid": series_uid, "series_description": series_description,
            "modality": modality, "series_number": series_number}


def corner_offset_mm(shape, a_affine: np.ndarray, b_affine: np.ndarray) -> float:
    """The largest distance in mm between where two voxel->world affines put the corners of a
    grid of ``shape`` (up to 3 axes): an error in mm, not in matrix entries; NaN if either is not finite."""
    dims = [max(int(n) - 1, 0) for n in tuple(shape)[:3]] + [0] * (3 - min(len(shape), 3))
    corners = np.array(np.meshgrid(*[[0, d] for d in dims], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones((1, corners.shape[1]))])
    off = np.linalg.norm((np.asarray(a_affine, float) @ corners - np.asarray(b_affine, float) @ corners)[:3], axis=0)
    return float(off.max()) if np.isfinite(off).all() else float("nan")


def tilt_degrees(affine: np.ndarray) -> float:
    """Angle in degrees between a voxel->world affine's slice axis (third column) and the normal
    of its first two columns: 0 for an orthogonal grid, the gantry tilt for a tilted series."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    normal = np.cross(a[:, 0], a[:, 1])
    normal /= np.linalg.norm(normal)
    along = float(normal @ a[:, 2])
    # atan2 of the parts across and along the normal stays exact near 0, where arccos does not
    return float(np.degrees(np.arctan2(np.linalg.norm(a[:, 2] - along * normal), abs(along))))


def itk_affine(origin, spacing, direction) -> np.ndarray:
    """RAS voxel->world ``(4, 4)`` from an ITK image's LPS origin, spacing and row-major direction."""
    dim = len(origin)
    lps = np.eye(4)
    d = np.asarray(direction, dtype=np.float64).reshape(dim, dim)
    lps[:dim, :dim] = d * np.asarray(spacing, dtype=np.float64)[None, :]
    lps[:dim, 3] = origin
    return LPS_TO_RAS @ lps


def native(array: np.ndarray) -> np.ndarray:
    """``array`` in native byte order (torch refuses big-endian buffers)."""
    if array.dtype.byteorder not in ("=", "|"):
        return array.astype(array.dtype.newbyteorder("="))
    return array
