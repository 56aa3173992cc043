"""DICOM slice series: pydicom groups, sorts and checks the slices; SimpleITK/GDCM decodes pixels.

The geometry comes from the tags, not from SimpleITK: slices are sorted by the projection of
ImagePositionPatient onto the slice normal (row x column cosines), the steps between them must
be uniform (a gap is refused, not averaged into one spacing as ITK does), and the affine is
built from the first slice's position, the cosines, PixelSpacing and the measured step.
A gantry-tilted series (slice positions stepping off the slice normal) has a sheared affine;
``read_dicom(tilt=...)`` keeps it (with a warning naming the angle), refuses it, or resamples
the series onto an orthogonal grid along the normal that covers it.
Pixels are read by SimpleITK's ImageSeriesReader from our sorted file list (GDCM decodes
JPEG 2000, JPEG-LS and JPEG itself), with RescaleSlope/Intercept applied per slice.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from medvit.core.errors import InputError
from medvit.io.common import LPS_TO_RAS, RawVolume, source_info, tilt_degrees
from medvit.io.formats import by_key
from medvit.io.itk_formats import sitk_to_raw

log = logging.getLogger(__name__)
Tilt = Literal["keep", "resample", "error"]
TILT_MODES = ("keep", "resample", "error")


NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "FID", "PLAN"}
_STORAGE = "1.2.840.10008.5.1.4.1.1."
# SOP classes that hold no pixel grid of their own: raw data, registrations, fiducials and
# segmentations (66.x), SR and key objects (88.x), presentation states (11.x), RT structure
# sets, plans and records (481.3-481.9), encapsulated documents (104.x).
_NON_IMAGE_SOP_FAMILIES = ("66", "88", "11", "104")
_NON_IMAGE_RT = {f"481.{i}" for i in range(3, 10)}

# Gap check: steps within max(_ABS_TOL mm, _REL_TOL * step) of the regular step count as equal.
_ABS_TOL = 0.01
_REL_TOL = 1e-2


def _tol(step: float) -> float:
    return max(_ABS_TOL, _REL_TOL * abs(step))


def _mm(x: float) -> str:
    return f"{round(float(x), 3):g}"


def _is_non_image_sop(sop: str) -> bool:
    if not sop.startswith(_STORAGE):
        return False
    rest = sop[len(_STORAGE):]
    return rest.split(".")[0] in _NON_IMAGE_SOP_FAMILIES or rest in _NON_IMAGE_RT


def _sop_class(ds: Dataset) -> str:
    # anonymisers sometimes blank SOPClassUID; the file meta keeps a copy
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop and getattr(ds, "file_meta", None) is not None:
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return sop


_DICOMDIR = "1.2.840.10008.1.3.10"  # Media Storage Directory: a file index, part of no series


def _series_key(ds: Dataset) -> str | None:
    """SeriesInstanceUID, or for files where it is blank a stable name from tags a series shares."""
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if uid:
        return uid
    if "Modality" not in ds and "ImagePositionPatient" not in ds:
        return None  # a DICOMDIR or other object that is no part of a series
    shared = [str(ds.get(t, "") or "") for t in ("FrameOfReferenceUID", "Modality", "SeriesNumber", "SeriesDescription",
                                                   "SeriesDate", "SeriesTime", "StudyInstanceUID")]
    return "nouid-" + hashlib.sha1("|".join(shared).encode()).hexdigest()[:10]


def _not_image_reason(ds: Dataset) -> str | None:
    """Why ``ds`` cannot be a slice of an image series, or None when it can."""
    modality = str(ds.get("Modality", "")).upper()
    sop = _sop_class(ds)
    sop_name = UID(sop).name if sop else "no SOP class"
    what = f"a DICOM {modality or 'object'} ({sop_name})"
    if modality in NON_IMAGE_MODALITIES or _is_non_image_sop(sop):
        return f"is {what}, not an image series"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"is {what} with {frames} frames in one file; only series of single-frame slices are supported"
    missing = [t for t in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
               if t not in ds or ds.get(t) in (None, "")]
    if missing:
        return f"is {what} without {', '.join(missing)}, not an image series with geometry"
    return None


@dataclass(frozen=True)
class DicomSeries:
    """One SeriesInstanceUID found under a folder.

    ``files`` are sorted by position along the slice normal (image series) or by instance
    number (other objects); ``instance_numbers`` follow the same order.
    """

    uid: str
    """SeriesInstanceUID; ``nouid-<hash>`` for files whose SeriesInstanceUID was blanked."""
    description: str
    modality: str
    n_files: int
    files: tuple[Path, ...]
    instance_numbers: tuple[int | None, ...]
    series_number: int | None
    sop_class: str
    """SOP Class name of the first file, e.g. "CT Image Storage"."""
    not_image: str | None
    """Why the series cannot be read as an image (a SEG, SR, multi-frame file...), None for slices."""
    headers: tuple[Dataset, ...] = field(repr=False, compare=False, default=())

    def summary(self) -> str:
        """``UID 'description' (N slices, MODALITY)`` for listings in messages."""
        unit = "slices" if self.not_image is None else "files"
        return f"{self.uid} '{self.description}' ({self.n_files} {unit}, {self.modality or '?'})"

    def instance(self, i: int) -> str:
        """How messages name the i-th sorted file: its InstanceNumber, else its file name."""
        n = self.instance_numbers[i]
        return str(n) if n is not None else self.files[i].name


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM file, or None for a file that is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except (EOFError, OSError) as e:
        raise InputError(path, f"unreadable DICOM header ({e})") from None


def _cut_short(path: Path, ds: Dataset) -> bool:
    """True for a DICOM file whose header stops before SeriesInstanceUID (pydicom reads a file cut
    mid-header as the elements before the cut) and that is not a part of no series (a DICOMDIR);
    an image object without its UID is read in full to see whether its pixel data is there."""
    if ds.get("SeriesInstanceUID") or _sop_class(ds) == _DICOMDIR:
        return False
    if len(ds) == 0:
        return True
    sop = _sop_class(ds)
    if not sop.startswith(_STORAGE) or _is_non_image_sop(sop):
        return False
    try:  # only files with a blank UID get here; large values are skipped, not loaded
        return "PixelData" not in pydicom.dcmread(path, defer_size="1 KB")
    except (InvalidDicomError, EOFError, OSError, ValueError):
        return True


def _instance_number(ds: Dataset) -> int | None:
    value = ds.get("InstanceNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _make_series(uid: str, items: list[tuple[Path, Dataset]]) -> DicomSeries:
    first = items[0][1]
    reason = next((r for r in (_not_image_reason(ds) for _, ds in items) if r is not None), None)
    if reason is None:
        iop = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        items.sort(key=lambda it: (float(np.dot(np.asarray(it[1].ImagePositionPatient, dtype=np.float64), normal)),
                                   _instance_number(it[1]) or 0, it[0].name))
    else:
        items.sort(key=lambda it: (_instance_number(it[1]) or 0, it[0].name))
    number = first.get("SeriesNumber")
    sop = _sop_class(first)
    return DicomSeries(
        uid=uid,
        description=str(first.get("SeriesDescription", "") or "").strip(),
        modality=str(first.get("Modality", "") or ""),
        n_files=len(items),
        files=tuple(p for p, _ in items),
        instance_numbers=tuple(_instance_number(ds) for _, ds in items),
        series_number=int(number) if number not in (None, "") else None,
        sop_class=UID(sop).name if sop else "",
        not_image=reason,
        headers=tuple(ds for _, ds in items),
    )


def _candidate_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        found.extend(Path(root) / n for n in sorted(names))
    return found


def no_series_found(where: Path) -> str:
    """Why ``where`` gave no series: the files looked at, and the first one named like DICOM
    that is not a DICOM image, so a corrupt ``.dcm`` is named rather than passed over in silence."""
    files = _candidate_files(where)
    named = next((f for f in files if f.name.lower().endswith(by_key("dicom").suffixes)), None)
    why = f"; {named.name} is named like DICOM but is not a DICOM image" if named is not None else ""
    return f"no DICOM files found ({len(files)} file{'s' if len(files) != 1 else ''} looked at{why})"


def list_dicom_series(folder: str | Path) -> list[DicomSeries]:
    """All DICOM series under ``folder`` (searched recursively; a single file also works).

    Files that are not DICOM are skipped quietly. Series come in order of SeriesNumber, then UID.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(folder, "no such file or folder")
    groups: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    for f in _candidate_files(folder):
        ds = _read_header(f)
        key = None if ds is None else _series_key(ds)
        if ds is not None and _cut_short(f, ds):
            # a slice cut short reads as an empty or partial header: left out, the series would be
            # read without it, and an end slice lost that way leaves no gap to notice
            raise InputError(f, "is a DICOM file that ends before its SeriesInstanceUID or pixel data: cut short or damaged")
        if key is not None:
            groups[key].append((f, ds))
    series = [_make_series(uid, items) for uid, items in groups.items()]
    return sorted(series, key=lambda s: (s.series_number if s.series_number is not None else 1 << 30, s.uid))


def select_series(where: Path, found: list[DicomSeries], series: str | None) -> DicomSeries:
    """The series to read: the one named by ``series``, the only one, or the only image series."""
    if not found:
        raise InputError(where, no_series_found(where))
    listing = "; ".join(s.summary() for s in found)
    if series is not None:
        for s in found:
            if s.uid == series:
                return s
        raise InputError(where, f"no DICOM series with UID {series}; available: {listing}")
    if len(found) == 1:
        return found[0]
    images = [s for s in found if s.not_image is None]
    if len(images) == 1:  # e.g. a CT series next to its SEG or RTSTRUCT: nothing to choose
        return images[0]
    # only segment has --series; elsewhere (evaluate, a datalist) a folder of one series is the way
    raise InputError(where, f"holds {len(found)} DICOM series; choose one (segment's --series UID, or a folder "
                            f"holding only that series): {listing}")


def _check_same(s: DicomSeries, where: Path, tag: str, values: list[np.ndarray], *, atol: float, rtol: float = 0.0) -> None:
    for i, v in enumerate(values[1:], start=1):
        if v.shape != values[0].shape or not np.allclose(v, values[0], atol=atol, rtol=rtol):
            raise InputError(where, f"series {s.uid}: {tag} differs between instances {s.instance(0)} "
                                    f"({values[0].tolist()}) and {s.instance(i)} ({v.tolist()})")


def _same_instance(s: DicomSeries, a: int, b: int) -> bool:
    if len(s.headers) <= b:
        return False
    ua, ub = (getattr(s.headers[k], "SOPInstanceUID", None) for k in (a, b))
    return ua is not None and ua == ub


def _check_steps(s: DicomSeries, where: Path, steps: np.ndarray) -> float:
    """Refuse duplicate positions and uneven steps; return the regular step (mm)."""
    for i in np.flatnonzero(steps < _ABS_TOL):
        a, b = int(i), int(i) + 1
        if _same_instance(s, a, b):  # a file copied twice into the folder, not a second acquisition
            raise InputError(where, f"series {s.uid}: {s.files[a].name} and {s.files[b].name} are the same instance "
                                    f"(SOPInstanceUID {s.headers[a].SOPInstanceUID}) twice; remove one of the copies")
        raise InputError(where, f"series {s.uid}: instances {s.instance(a)} and {s.instance(b)} share one "
                                "slice position (several acquisitions, echoes or time points in one series?)")
    # the regular step is the one most other steps agree with; ties go to the smaller one
    agree = [int(np.sum(np.abs(steps - x) <= _tol(x))) for x in steps]
    best = max(range(len(steps)), key=lambda i: (agree[i], -steps[i]))
    near = steps[np.abs(steps - steps[best]) <= _tol(steps[best])]
    regular = float(np.median(near))
    bad = np.flatnonzero(np.abs(steps - regular) > _tol(regular))
    if bad.size:
        i = int(bad[np.argmax(np.abs(steps[bad] - regular))])
        kind = "slice gap" if steps[i] > regular else "uneven slice step"
        more = f" (and {bad.size - 1} more uneven steps)" if bad.size > 1 else ""
        raise InputError(where, f"series {s.uid}: {kind} of {_mm(steps[i])} mm between instances {s.instance(i)} and "
                                f"{s.instance(i + 1)} where the other steps are {_mm(regular)} mm{more}; "
                                "refusing to average it into one spacing")
    return regular


def series_affine(s: DicomSeries, where: Path) -> np.ndarray:
    """RAS voxel->world ``(4, 4)`` of the sorted series after checking its slices agree.

    Voxel axis X runs along the rows (ImageOrientationPatient[:3], PixelSpacing[1]), Y down the
    columns (ImageOrientationPatient[3:], PixelSpacing[0]), Z from the first to the last slice.
    """
    hs = s.headers
    iops = [np.asarray(h.ImageOrientationPatient, dtype=np.float64) for h in hs]
    _check_same(s, where, "ImageOrientationPatient", iops, atol=1e-4)
    _check_same(s, where, "PixelSpacing", [np.asarray(h.PixelSpacing, dtype=np.float64) for h in hs], atol=1e-6, rtol=1e-4)
    _check_same(s, where, "Rows x Columns", [np.asarray([int(h.Rows), int(h.Columns)]) for h in hs], atol=0)
    row, col = iops[0][:3], iops[0][3:]
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    ipp = np.asarray([h.ImagePositionPatient for h in hs], dtype=np.float64)
    if len(hs) == 1:
        thickness = hs[0].get("SliceThickness")
        step_vec = normal * (float(thickness) if thickness not in (None, "") and float(thickness) > 0 else 1.0)
    else:
        regular = _check_steps(s, where, np.diff(ipp @ normal))
        # the mean step vector keeps a gantry tilt (slices shifted in-plane) as a shear
        step_vec = (ipp[-1] - ipp[0]) / (len(hs) - 1)
        off = np.linalg.norm(ipp - (ipp[0] + np.arange(len(hs))[:, None] * step_vec), axis=1)
        if off.max() > _tol(regular):
            i = int(np.argmax(off))
            raise InputError(where, f"series {s.uid}: slice positions do not lie on a line "
                                    f"(instance {s.instance(i)} is {_mm(off[i])} mm off it)")
        along = float(step_vec @ normal)
        if np.linalg.norm(step_vec - along * normal) * (len(hs) - 1) <= _ABS_TOL:
            # no tilt to speak of over the whole series: an orthonormal affine, so qform == sform
            step_vec = along * normal
    spacing = np.asarray(hs[0].PixelSpacing, dtype=np.float64)
    lps = np.eye(4)
    lps[:3, 0] = row * spacing[1]
    lps[:3, 1] = col * spacing[0]
    lps[:3, 2] = step_vec
    lps[:3, 3] = ipp[0]
    return LPS_TO_RAS @ lps


def orthogonal_grid(affine: np.ndarray, shape) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The orthogonal grid covering a sheared ``(X, Y, Z)`` grid: the first two axes and their
    spacing kept, the third along their normal (pointing the way the slices step) with the
    slice step projected on it; its extent covers every voxel centre of the input grid.

    Returns the new voxel->world affine and shape.
    """
    a = np.asarray(affine, dtype=np.float64)
    normal = np.cross(a[:3, 0], a[:3, 1])
    normal /= np.linalg.norm(normal)
    along = float(normal @ a[:3, 2])
    b = a.copy()
    b[:3, 2] = normal * along
    dims = [[0, int(n) - 1] for n in shape]
    corners = np.array(np.meshgrid(*dims, indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones((1, corners.shape[1]))])
    idx = (np.linalg.inv(b) @ a @ corners)[:3]  # the input's corners in the new grid's index frame
    lo, hi = idx.min(axis=1), idx.max(axis=1)
    b[:3, 3] = (b @ np.append(lo, 1.0))[:3]
    new_shape = tuple(int(n) for n in np.ceil(hi - lo - 1e-6).astype(int) + 1)
    return b, new_shape


def resample_orthogonal(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resample a channel-first ``(C, X, Y, Z)`` volume on a sheared grid onto
    :func:`orthogonal_grid` with linear interpolation; points outside the input take each
    channel's minimum (air, for CT). Returns float32 ``(C, X', Y', Z')`` and its affine.

    scipy's ``affine_transform`` takes the output-index -> input-index map as one matrix,
    ``inv(affine) @ new_affine``, so the shear needs no intermediate image geometry (an ITK
    image would need a non-orthogonal direction matrix).
    """
    from scipy.ndimage import affine_transform

    new_affine, shape = orthogonal_grid(affine, array.shape[1:])
    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ new_affine
    out = np.empty((array.shape[0], *shape), dtype=np.float32)
    for c in range(array.shape[0]):
        src = np.asarray(array[c], dtype=np.float32)
        affine_transform(src, m[:3, :3], offset=m[:3, 3], output_shape=shape, output=out[c], order=1,
                         mode="constant", cval=float(src.min()))
    return out, new_affine


def _handle_tilt(raw: RawVolume, s: DicomSeries, where: Path, tilt: Tilt) -> RawVolume:
    angle = tilt_degrees(raw.affine)
    if angle < 1e-6:
        return raw
    tag = s.headers[0].get("GantryDetectorTilt")
    said = f"; its GantryDetectorTilt tag says {float(tag):g}°" if tag not in (None, "") else ""
    what = f"series {s.uid} is gantry-tilted: its slices step {angle:.1f}° off their normal{said}"
    if tilt == "error":
        raise InputError(where, f"{what}; refused (--tilt resample reads it onto an orthogonal grid, "
                                "--tilt keep on its sheared one)")
    if tilt == "keep":
        log.warning("%s: %s; kept on its sheared grid (the label map carries the shear in its sform, with no qform: "
                    "ITK-based tools refuse such a file rather than misplace it)", where, what)
        return raw
    shape_in = raw.array.shape[1:]
    raw.array, raw.affine = resample_orthogonal(raw.array, raw.affine)
    log.warning("%s: %s; resampled (linear) from %s onto an orthogonal %s grid along the normal: outputs are "
                "on that grid, not on the slices' own", where, what,
                "x".join(map(str, shape_in)), "x".join(map(str, raw.array.shape[1:])))
    return raw


def _read_pixels(s: DicomSeries, where: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(f) for f in s.files])
    # float output keeps per-slice RescaleSlope/Intercept (and fractional slopes) exact
    vector = int(s.headers[0].get("SamplesPerPixel", 1) or 1) > 1
    reader.SetOutputPixelType(sitk.sitkVectorFloat32 if vector else sitk.sitkFloat32)
    try:
        return reader.Execute()
    except RuntimeError:
        pass
    for f in s.files:  # name the file that fails on its own
        try:
            sitk.ReadImage(str(f), imageIO="GDCMImageIO")
        except RuntimeError:
            raise InputError(f, f"series {s.uid}: pixel data cannot be decoded (truncated or corrupt file?)") from None
    raise InputError(where, f"series {s.uid}: pixel data cannot be decoded as one series")


def read_dicom(path: Path, *, series: str | None = None, tilt: Tilt = "keep") -> RawVolume:
    """Read one DICOM image series from a folder (or a single-slice file) as ``(C, X, Y, Z)`` float32.

    A gantry-tilted series (:func:`tilt_degrees` of its affine above 0) is, by ``tilt``: read on
    its sheared grid with a warning naming the angle ("keep"), refused with an InputError
    ("error"), or resampled onto :func:`orthogonal_grid` with a warning ("resample").
    """
    if tilt not in TILT_MODES:
        raise ValueError(f"tilt must be one of {TILT_MODES}, got {tilt!r}")
    s = select_series(path, list_dicom_series(path), series)
    if s.not_image is not None:
        raise InputError(path, s.not_image if path.is_file() else f"series {s.uid} {s.not_image}")
    affine = series_affine(s, path)
    image = _read_pixels(s, path)
    h0 = s.headers[0]
    expected = (int(h0.Columns), int(h0.Rows), s.n_files)
    if tuple(image.GetSize()) != expected:
        raise InputError(path, f"series {s.uid}: decoded size {image.GetSize()} differs from the tags' {expected}")
    # SimpleITK takes the origin from the first file we gave it: a check that our order held
    origin_ras = LPS_TO_RAS[:3, :3] @ np.asarray(image.GetOrigin())
    if not np.allclose(origin_ras, affine[:3, 3], atol=1e-3):
        raise RuntimeError(f"SimpleITK origin {image.GetOrigin()} does not match the first sorted slice of {path}")
    number = "" if s.series_number is None else str(s.series_number)
    raw = sitk_to_raw(image, path, source_info("dicom", s.uid, s.description, s.modality, number))
    raw.affine = affine
    return _handle_tilt(raw, s, path, tilt)
