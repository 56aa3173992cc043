"""NIfTI writers that keep the affine exact, and the atomic-rename helper every output uses."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medvit.core.errors import InputError
from medvit.io.common import corner_offset_mm

PathLike = str | os.PathLike
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.ENOTDIR}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _full_suffix(name: str) -> str:
    """``.nii.gz`` for ``a.nii.gz``, ``.csv`` for ``a.csv``: what format sniffers look at."""
    p = Path(name)
    if p.suffix.lower() in _COMPRESSED and len(p.suffixes) >= 2:
        return "".join(p.suffixes[-2:])
    return p.suffix


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success, remove it on error.

    The temporary name is hidden (leading dot) and keeps the suffix (``.nii.gz``, ``.png``...) so
    writers that pick a format from the name still do. Missing parent folders are created.

    Example::

        with atomic_path(out / "stats.csv") as tmp:
            frame.to_csv(tmp)
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder; expected a file name to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(path.parent, f"cannot create the output folder ({e.strerror})") from None
    ext = _full_suffix(path.name)
    tmp = path.with_name(f".{path.name[: len(path.name) - len(ext)]}.tmp-{secrets.token_hex(4)}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, OSError) and e.errno in _UNWRITABLE:  # the folder, not the data, is at fault
            raise InputError(path, f"cannot be written ({e.strerror})") from None
        raise


def check_writable(path: PathLike) -> None:
    """InputError when the file ``path`` could not be created: a probe file is made and removed in
    its folder or, where that does not exist yet, in the nearest folder above that does
    (``os.access`` says yes to root even on ``/proc``). Creates no folder."""
    path = Path(path).absolute()
    existing = next(p for p in path.parents if p.exists())
    probe = existing / f".medvit-write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(path, f"cannot be written ({existing}: {e.strerror})") from None


def check_output_folder(path: PathLike) -> Path:
    """InputError when ``path``, meant as an output folder, is an existing file; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "is a file; the output must be a folder")
    return path


def make_output_folder(path: PathLike) -> Path:
    """Create the output folder ``path`` (and its parents); InputError when it cannot be made."""
    path = check_output_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(path, f"cannot create the output folder ({e.strerror})") from None
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would resolve to
        return a.resolve() == b.resolve()


def refuse_protected(path: PathLike, protect: Sequence[PathLike]) -> None:
    """InputError when ``path`` is (or resolves to) the same file as any path in ``protect``."""
    path = Path(path)
    for p in protect:
        if _same_file(path, Path(p)):
            raise InputError(path, f"refusing to overwrite the input file {p}")


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
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise InputError(path, "NIfTI output must be named .nii or .nii.gz")
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
