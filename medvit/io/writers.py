"""NIfTI writers that keep the affine exact, written through :func:`medvit.core.files.atomic_path`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medvit.core.errors import InputError
from medvit.core.files import PathLike, atomic_path, refuse_protected
from medvit.io.common import corner_offset_mm
from medvit.io.formats import by_key, by_name


def _numpy(array, what: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if hasattr(array, "as_tensor"):
            array = array.as_tensor()
        return array.numpy()
    if isinstance(array, np.ndarray):
        return array
    raise TypeError(f"{what} must be a numpy array or a torch tensor, got {type(array).__name__}")


def _check_affine(affine) -> np.ndarray:
    a = np.asarray(_numpy(affine, "affine") if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.isfinite(a).all() or not np.allclose(a[3], [0, 0, 0, 1]):
        raise ValueError(f"affine must be a finite (4, 4) matrix with last row [0, 0, 0, 1], got shape {a.shape}")
    if abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError("affine is singular")
    return a


def _check_target(path: Path, protect: Sequence[PathLike]) -> None:
    nifti = by_key("nifti")
    if by_name(path) is not nifti:
        raise InputError(path, f"NIfTI output must be named {' or '.join(nifti.suffixes)}")
    refuse_protected(path, protect)


FORMS_AGREE_MM = 1e-3
"""The most (mm, at the grid's corners) a written qform may place a voxel away from the sform."""


def _check_codes(codes) -> tuple[int, int]:
    s, q = (int(c) for c in codes)
    if not (0 <= s <= 4 and 0 <= q <= 4):
        raise ValueError(f"NIfTI xform codes must lie in 0..4, got {codes}")
    return s, q


def nifti_forms(img: nib.Nifti1Image, affine: np.ndarray, codes: tuple[int, int] = (1, 1)) -> nib.Nifti1Image:
    """Set ``img``'s sform to ``affine`` and its qform to the same placement, or unset the qform.

    ``codes`` are the (sform, qform) codes; a 0 takes the other's (a label map of an input whose
    affine came from its qform alone keeps that code), both 0 mean scanner (1). A qform is a
    rotation and zooms: where ``affine`` has a shear (a gantry-tilted series kept as it is) the
    nearest one misplaces voxels, and ITK-based viewers read the qform when the sform is not
    orthonormal, so the qform code is then 0. Every NIfTI medvit writes has its forms agreeing
    to :data:`FORMS_AGREE_MM` or no qform.
    """
    s_code, q_code = _check_codes(codes)
    s_code, q_code = s_code or q_code or 1, q_code or s_code or 1
    img.set_sform(affine, code=s_code)
    img.set_qform(affine, code=q_code)
    if corner_offset_mm(img.shape, img.get_qform(), affine) > FORMS_AGREE_MM:
        img.set_qform(None, code=0)
    return img


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, codes: tuple[int, int] = (1, 1),
                descrip: str = "") -> Path:
    """Write ``data`` (X, Y, Z[, C]) unscaled, ``affine`` exact in the sform, see :func:`nifti_forms`."""
    img = nib.Nifti1Image(data, affine)
    img.header["descrip"] = descrip.encode("ascii", "replace")[:80]  # the header's 80-byte text field
    img.header.set_data_dtype(data.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    nifti_forms(img, affine, codes)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


def write_label_map(labels, affine, path: PathLike, *, protect: Sequence[PathLike] = (),
                    codes: tuple[int, int] = (1, 1), descrip: str = "") -> Path:
    """Write an integer label map ``(X, Y, Z)`` (or ``(1, X, Y, Z)``, or a 2D ``(X, Y)`` for a 2D
    input) as NIfTI, atomically.

    Stored as uint8, or uint16 when a label exceeds 255; labels must lie in 0..65535. ``affine``
    (4, 4) voxel->RAS mm goes to the sform, so nibabel reads it back to float32 precision, and
    to the qform where that holds it (no shear; else the qform code is 0, see :func:`nifti_forms`);
    ``codes`` are the (sform, qform) codes, the input's when the affine is the input's.
    Refuses (InputError) to write onto any file in ``protect``. ``descrip`` goes to the header's
    description (provenance such as the checkpoint that made the labels; ASCII, cut at 80 bytes).
    """
    path = Path(path)
    _check_target(path, protect)
    data = _numpy(labels, "labels")
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]
    if data.ndim not in (2, 3):
        raise ValueError(f"labels must be (X, Y, Z), (1, X, Y, Z) or (X, Y), got shape {tuple(data.shape)}")
    if data.dtype == np.bool_:
        data = data.astype(np.uint8)
    if not np.issubdtype(data.dtype, np.integer):
        raise TypeError(f"labels must have an integer dtype, got {data.dtype}")
    low, high = (int(data.min()), int(data.max())) if data.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError(f"label values must lie in 0..65535 to be written, got {low}..{high}")
    dtype = np.uint8 if high <= 255 else np.uint16
    return _save_nifti(np.ascontiguousarray(data.astype(dtype)), _check_affine(affine), path, _check_codes(codes),
                       descrip)


def _default_dtype(data: np.ndarray) -> np.dtype:
    if data.dtype == np.bool_:
        return np.dtype(np.uint8)
    if np.issubdtype(data.dtype, np.floating):
        return np.dtype(np.float32)
    if data.dtype.itemsize == 8:  # NIfTI readers handle int64 poorly; narrow when it fits
        return np.dtype(np.int32)
    return data.dtype


def write_image(array, affine, path: PathLike, *, dtype=None, protect: Sequence[PathLike] = ()) -> Path:
    """Write an image ``(X, Y, Z)`` or multi-channel ``(C, X, Y, Z)`` (stored 4D, channels last) as NIfTI.

    ``dtype`` defaults to float32 for floats, int32 for 64-bit integers, else the array's own.
    Floats written to an integer dtype are rounded and must fit its range. No scaling is stored.
    The affine goes to the sform, and to the qform where that holds it (see :func:`nifti_forms`).
    """
    path = Path(path)
    _check_target(path, protect)
    data = _numpy(array, "array")
    if data.ndim == 4:
        data = np.moveaxis(data, 0, -1)
    elif data.ndim != 3:
        raise ValueError(f"array must be (X, Y, Z) or (C, X, Y, Z), got shape {tuple(data.shape)}")
    target = np.dtype(dtype) if dtype is not None else _default_dtype(data)
    if np.issubdtype(target, np.integer):
        if np.issubdtype(data.dtype, np.floating):
            if not np.isfinite(data).all():
                raise ValueError(f"cannot write NaN/inf voxels as {target}")
            data = np.rint(data)
        info = np.iinfo(target)
        if data.size and (data.min() < info.min or data.max() > info.max):
            raise ValueError(f"values {data.min()}..{data.max()} do not fit {target}")
    return _save_nifti(np.ascontiguousarray(data.astype(target)), _check_affine(affine), path)
