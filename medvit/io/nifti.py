"""NIfTI-1/2 reading through nibabel, keeping the file's best affine exactly."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from medvit.core.errors import InputError
from medvit.io.common import RawVolume, corner_offset_mm, native, source_info

log = logging.getLogger(__name__)
# What nibabel raises on a damaged file: a bad header, a cut gzip stream, a short data block.
_NIBABEL_ERRORS = (ImageFileError, HeaderDataError, EOFError, OSError, zlib.error, ValueError)


def _warn_if_forms_disagree(img, path: Path) -> None:
    """Both sform and qform set but placing voxels differently: we (like nibabel and FSL) use
    the sform, ITK-based viewers may use the qform, and the labels would then look misplaced."""
    sform, s_code = img.get_sform(coded=True)
    qform, q_code = img.get_qform(coded=True)
    if not (s_code and q_code) or sform is None or qform is None:
        return
    gap = corner_offset_mm(img.shape, sform, qform)
    if gap > 1e-2:
        log.warning("%s: the sform and qform disagree by up to %.1f mm at the grid's corners; using the sform "
                    "(as nibabel does); ITK-based tools may place the image by the qform", path, gap)


LABEL_SCALE_ATOL = 1e-3
"""Scaled integer labels within this of whole numbers are those whole numbers (float rounding of
a slope such as 0.99999997); further off, a label map is refused as non-integer."""


def _scaled_labels(img, path: Path) -> np.ndarray:
    """A label map's values: stored integers that the header's ``scl_slope``/``scl_inter`` turn
    into near-integers (within :data:`LABEL_SCALE_ATOL`) are rounded to them; scaled values
    further off are refused (InputError naming the scaling)."""
    data = np.asanyarray(img.dataobj)
    slope, inter = img.dataobj.slope, img.dataobj.inter
    if not np.issubdtype(img.get_data_dtype(), np.integer) or (slope == 1 and inter == 0):
        return data
    whole = np.rint(data)
    off = float(np.max(np.abs(data - whole))) if data.size else 0.0
    if not off <= LABEL_SCALE_ATOL:
        raise InputError(path, f"label map holds non-integer values: its header scales the stored integers by "
                               f"scl_slope {slope:g}, scl_inter {inter:g} (up to {off:.3g} off a whole number; "
                               "is it an image?)")
    return whole


def _is_time_series(header) -> bool:
    """A 4D NIfTI whose 4th axis is time: a time unit in ``xyzt_units`` or a time step in
    ``pixdim[4]`` other than 0 or 1 (what writers of channel stacks leave), and no vector intent
    (a 5D ``(X, Y, Z, 1, C)`` image is channels)."""
    if header.get_intent()[0] == "vector":
        return False
    unit = header.get_xyzt_units()[1]
    step = float(header["pixdim"][4])
    return unit in ("sec", "msec", "usec") or step not in (0.0, 1.0)


def read_nifti(path: Path, *, labels: bool = False) -> RawVolume:
    """Read a NIfTI file into ``(C, X, Y, Z)``: 3D gives one channel, a 4D ``(X, Y, Z, C)`` gives C.

    The affine is nibabel's ``img.affine``: the sform when its code is set, else the qform.
    A 4D file whose 4th axis is time (:func:`_is_time_series`) sets ``time_points``; the
    header's sform/qform codes go to ``codes``.
    ``scl_slope``/``scl_inter`` are applied (scaled data comes back float64); with ``labels``,
    scaled integers that land within :data:`LABEL_SCALE_ATOL` of whole numbers come back as
    those whole numbers, and further off are refused.
    """
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(path, f"is not a NIfTI file (nibabel reads it as {type(img).__name__})")
        data = native(_scaled_labels(img, path) if labels else np.asanyarray(img.dataobj))
    except _NIBABEL_ERRORS as e:
        raise InputError(path, f"not a readable NIfTI file ({e})") from None
    if 0 in img.shape or data.size == 0:  # nibabel hands such data back as shape (0,)
        raise InputError(path, f"holds no voxels: its header's shape is {tuple(img.shape)}")
    time_points, vector = 0, data.ndim == 5
    if data.ndim == 5 and data.shape[3] == 1:  # ITK writes vector images as (X, Y, Z, 1, C)
        data = data[:, :, :, 0, :]
    if data.ndim == 2:
        data = data[None, :, :, None]
    elif data.ndim == 3:
        data = data[None]
    elif data.ndim == 4:
        data = np.moveaxis(data, 3, 0)
        time_points = data.shape[0] if not vector and _is_time_series(img.header) else 0
    else:
        raise InputError(path, f"NIfTI with shape {tuple(data.shape)} is not supported "
                               "(expected 3D, or 4D with channels last)")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "has a NaN, infinite or singular voxel-to-world affine (its sform/qform); "
                               "its voxels have no position in space")
    _warn_if_forms_disagree(img, path)
    codes = (int(img.header["sform_code"]), int(img.header["qform_code"]))
    return RawVolume(np.ascontiguousarray(data), affine, path, source_info("nifti"), time_points, codes)
