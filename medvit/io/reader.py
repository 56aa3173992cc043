"""``read_image`` / ``read_label``: any supported file or DICOM series to a RAS MetaTensor."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import ImageMetaKey, MetaKeys, SpaceKeys

from medvit.core.errors import InputError
from medvit.io.common import RawVolume
from medvit.io.dicom import Tilt
from medvit.io.formats import SUPPORTED, by_key, by_name

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
GRID_ATOL = 1e-4
"""Affines of the channels of one case may differ by this much (mm) and still share a grid."""

# dtypes torch holds as they are; other integer types are widened for labels
_TORCH_INT = (np.uint8, np.int8, np.int16, np.int32, np.int64)


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def source_format(path: Path) -> str:
    """The :data:`medvit.io.formats.FORMATS` key (``"nifti"``, ``"nrrd"``, ``"mha"`` or ``"dicom"``)
    of an existing path: by its name's suffix; a folder, or a file whose header has DICOM's magic,
    is ``"dicom"``. InputError for a missing path or another file, listing the supported formats."""
    if not path.exists():
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        return "dicom"
    fmt = by_name(path)
    if fmt is not None:
        return fmt.key
    if _has_dicom_magic(path):
        return "dicom"
    raise InputError(path, f"unsupported file type '{path.suffix or path.name}'; supported: {SUPPORTED}")


def _read_raw(path: Path, fmt: str, series: str | None, tilt: Tilt = "keep", *, labels: bool = False) -> RawVolume:
    return by_key(fmt).read(path, series=series, tilt=tilt, labels=labels)


def _paths(path: PathLike | Sequence[PathLike]) -> list[Path]:
    if isinstance(path, (str, os.PathLike)):
        return [Path(path)]
    paths = [Path(p) for p in path]
    if not paths:
        raise InputError(None, "no input path given (an empty list)")
    return paths


def _formats(paths: list[Path], series: str | None) -> list[str]:
    formats = [source_format(p) for p in paths]
    if series is not None and "dicom" not in formats:
        raise InputError(paths[0], f"a DICOM series ({series}) was chosen but the input is not DICOM")
    return formats


def _channels_said(raws: list[RawVolume]) -> str:
    """Where a case's channels come from, for messages: ``a.nii.gz: 1, b.nii.gz: a 4D time series
    of 2 time points`` for several files; for one file its time series, else ""."""
    def one(r: RawVolume) -> str:
        return f"a 4D time series of {r.time_points} time points" if r.time_points else str(r.array.shape[0])

    if len(raws) == 1:
        return one(raws[0]) if raws[0].time_points else ""
    return ", ".join(f"{r.path.name}: {one(r)}" for r in raws)


def channel_mismatch(image: MetaTensor, want: int, who: str) -> InputError:
    """The one-line refusal of an image read by :func:`read_image` whose channel count is not
    ``want`` (``who``: "the checkpoint's unetr"), naming every file of its case and, for a 4D
    time series, that it is one and that one volume a file is expected."""
    meta = getattr(image, "meta", {}) or {}
    case = str(meta.get("medvit_case", meta.get(ImageMetaKey.FILENAME_OR_OBJ, "the image")))
    said, n = str(meta.get("medvit_channels", "")), int(image.shape[0])
    if said.startswith("a 4D time series"):  # one file
        return InputError(case, f"is {said}, but medvit reads one volume a file as one channel ({who} takes {want}); "
                                "save the time point to segment as a 3D file")
    where = f" ({said})" if said else ""
    if said and "time series" in said:
        where += "; medvit reads one volume a file: save the time point you want as a 3D file"
    return InputError(case, f"has {n} channel(s){where} but {who} takes {want}")


def _to_metatensor(array: np.ndarray, raw: RawVolume, replaced: int, raws: list[RawVolume] | None = None) -> MetaTensor:
    raws = raws or [raw]
    meta = {
        ImageMetaKey.FILENAME_OR_OBJ: str(raw.path),
        MetaKeys.ORIGINAL_AFFINE: raw.affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[1:], dtype=np.int64),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.ORIGINAL_CHANNEL_DIM: 0,  # already channel-first
        "medvit_source": dict(raw.source),
        "medvit_nonfinite_replaced": int(replaced),
        # the whole case (a comma group names every file) and where its channels come from, for messages
        "medvit_case": ",".join(str(r.path) for r in raws),
        "medvit_channels": _channels_said(raws),
        "medvit_xform_codes": np.asarray(raw.codes, dtype=np.int64),
    }
    if raw.label_names is not None:
        meta["medvit_label_names"] = dict(raw.label_names)
    affine = torch.as_tensor(raw.affine, dtype=torch.float64)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array)), affine=affine, meta=meta)


def _fix_nonfinite(array: np.ndarray, path: Path, mode: str) -> int:
    """Count NaN/inf voxels of a float ``array``; refuse them or replace them in place."""
    bad = ~np.isfinite(array)
    n = int(bad.sum())
    if n == 0:
        return 0
    if mode == "error":
        raise InputError(path, f"{n} voxels are NaN or infinite (or beyond float32); mend the file (when "
                               "segmenting, --nonfinite replace sets them to the smallest finite value)")
    if n == array.size:
        raise InputError(path, "every voxel is NaN or infinite")
    low = float(array[~bad].min())
    array[bad] = low
    logger.warning("%s: replaced %d NaN/infinite voxels by the minimum finite value %g", path, n, low)
    return n


def read_image(
    path: PathLike | Sequence[PathLike],
    *,
    series: str | None = None,
    nonfinite: Literal["error", "replace"] = "error",
    tilt: Tilt = "keep",
) -> MetaTensor:
    """Read an image as a channel-first float32 MetaTensor ``(C, X, Y, Z)`` with a RAS affine.

    Args:
        path: a NIfTI/NRRD/MetaImage file, a DICOM folder or file, or a sequence of them that
            make one case (their channels are stacked in order; all must share one grid).
        series: SeriesInstanceUID to read when a DICOM folder holds several series.
        nonfinite: NaN/inf voxels raise InputError ("error") or are set to the minimum finite
            value with a logged warning ("replace"); ``meta["medvit_nonfinite_replaced"]`` counts them.
        tilt: a gantry-tilted DICOM series is read on its sheared grid ("keep", the default: voxels
            stay the slices' own, so label maps drawn on them still fit), refused ("error") or
            resampled onto an orthogonal grid ("resample"); see :func:`medvit.io.dicom.read_dicom`.

    ``.affine`` is the voxel->world matrix in RAS mm (float64); ``.meta`` holds
    ``filename_or_obj`` (the first path), ``original_affine``, ``spatial_shape``, ``space``,
    ``medvit_source`` (format; DICOM series UID, description, Modality and SeriesNumber), ``medvit_case`` (every path,
    comma-joined), ``medvit_channels`` (each file's channel count for a case of several, or
    a 4D time series' description; "" otherwise) and ``medvit_xform_codes`` (the first file's
    NIfTI sform and qform codes; 1, 1 for other formats).
    """
    if nonfinite not in ("error", "replace"):
        raise ValueError(f"nonfinite must be 'error' or 'replace', got {nonfinite!r}")
    paths = _paths(path)
    formats = _formats(paths, series)
    raws = [_read_raw(p, f, series if f == "dicom" else None, tilt) for p, f in zip(paths, formats)]
    first = raws[0]
    for r in raws[1:]:
        if r.array.shape[1:] != first.array.shape[1:]:
            raise InputError(r.path, f"grid {tuple(r.array.shape[1:])} differs from "
                                     f"{first.path}'s {tuple(first.array.shape[1:])}")
        diff = float(np.abs(r.affine - first.affine).max())
        if diff > GRID_ATOL:
            raise InputError(r.path, f"affine differs from {first.path}'s by up to {diff:.4g} mm; "
                                     "channels of one case must share a grid")
    for r in raws:
        _check_scalar(r.array, r.path)
    with np.errstate(over="ignore"):  # a float64 voxel past float32's range becomes inf, reported just below
        array = np.concatenate([r.array.astype(np.float32, copy=False) for r in raws], axis=0)
    replaced = _fix_nonfinite(array, first.path, nonfinite)
    return _to_metatensor(array, first, replaced, raws)


def _check_scalar(array: np.ndarray, path: Path) -> None:
    """One real number a voxel: an RGB (structured) or complex file would crash or lose a part in the cast."""
    if array.dtype.names is not None:
        raise InputError(path, f"holds RGB or other multi-part voxels ({', '.join(array.dtype.names)}); medvit reads "
                               "grey-level volumes: save one file per component and give them as channels")
    if np.iscomplexobj(array):
        raise InputError(path, "holds complex voxels; give a real image (the magnitude, say)")


def _label_dtype(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels: float files must hold whole finite numbers; odd int types are widened."""
    _check_scalar(array, path)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(path, "label map holds NaN or infinite values")
        if not np.array_equal(array, np.round(array)):
            raise InputError(path, "label map holds non-integer values (is it an image?)")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        for dt in (np.uint8, np.int16, np.int32, np.int64):
            if np.iinfo(dt).min <= low and high <= np.iinfo(dt).max:
                return array.astype(dt)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(path, f"label map has type {array.dtype}, expected integers")
    if array.dtype.type in _TORCH_INT:
        return array
    if array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise InputError(path, "label values exceed the int64 range")
    return array.astype(np.int32 if array.dtype.itemsize < 4 else np.int64)


SEG_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"


def dicom_label_kind(path: Path) -> str | None:
    """``"seg"`` for a DICOM Segmentation file (BINARY, FRACTIONAL or LABELMAP), ``"rtstruct"`` for
    an RT Structure Set, else None (a folder, another format, an image slice)."""
    if not path.is_file() or source_format(path) != "dicom":
        return None
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, EOFError, OSError):
        return None
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop and getattr(ds, "file_meta", None) is not None:
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return "seg" if sop in SEG_SOP_CLASSES else "rtstruct" if sop == RTSTRUCT_SOP_CLASS else None


def read_label(path: PathLike, *, series: str | None = None, source: PathLike | None = None) -> MetaTensor:
    """Read a label map as an integer MetaTensor ``(1, X, Y, Z)`` with a RAS affine.

    The dtype is the file's when torch holds it (uint8, int8, int16, int32, int64), else a wider
    signed type; label files stored as floats must hold whole numbers, and a NIfTI's stored
    integers scaled by its header to within 1e-3 of whole numbers are read as those (a 0/1 mask
    with ``scl_slope`` 0.99999997). A gantry-tilted DICOM
    series is read on its sheared grid (labels are never interpolated).

    A DICOM SEG (:func:`medvit.io.dicom_seg.read_dicom_seg`) or RTSTRUCT
    (:func:`medvit.io.rtstruct.read_rtstruct`) is read onto ``source``, the DICOM image series it
    was drawn on (exactly ``read_image(source, tilt="keep")``'s grid), with its names in
    ``meta["medvit_label_names"]``; without ``source`` it is an InputError. ``series`` picks
    the source's series (or, for a label that is itself a series folder, that series).
    """
    p = Path(path)
    kind = dicom_label_kind(p)
    if kind is not None:
        what = "a DICOM SEG" if kind == "seg" else "a DICOM RTSTRUCT"
        if source is None:
            raise InputError(p, f"is {what}; give the DICOM image series it was drawn on as its source "
                                "(evaluate: --image DIR; a datalist entry's image)")
        if kind == "seg":
            from medvit.io.dicom_seg import read_dicom_seg

            raw = read_dicom_seg(p, Path(source), series=series)
        else:
            from medvit.io.rtstruct import read_rtstruct

            raw = read_rtstruct(p, Path(source))
        return _to_metatensor(_label_dtype(raw.array, p), raw, 0)
    (fmt,) = _formats([p], series)
    raw = _read_raw(p, fmt, series, labels=True)
    if raw.array.shape[0] != 1:
        raise InputError(p, f"label map has {raw.array.shape[0]} channels, expected 1")
    return _to_metatensor(_label_dtype(raw.array, p), raw, 0)
