"""DICOM RT Structure Sets (RTSTRUCT) out of and into label maps, through rt-utils.

rt-utils (with OpenCV's ``findContours``/``fillPoly``) turns each slice of a binary mask into
closed planar contours and back. We call its building blocks with our own inputs rather than
its file-walking entry points: it gets exactly the headers of the series we sorted
(:class:`medvit.io.dicom.DicomSeries`, ascending along the slice normal, the order rt-utils
itself sorts by), never a folder it would walk and whose other series or files it would mix in.

Our label maps are ``(X, Y, Z)``: X along a row (the column index), Y down the columns (the row
index), Z the sorted slices. rt-utils wants ``(rows, cols, slices)``, so a mask is our map with
its first two axes swapped; on reading, its ``(rows, cols, slices)`` masks are swapped back.

rt-utils 1.2.7 takes PixelSpacing's first value (the row spacing) for both in-plane steps and
reads contours into a ``(Columns, Rows)`` slice: series with non-square pixels are refused both
ways, and non-square slices on reading. It places slice k at the first slice's position plus k
steps along the normal, which a gantry-tilted series does not follow: refused too.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.valuerep import DSfloat

from medvit.core.errors import InputError, MedvitError, listed
from medvit.io.common import LPS_TO_RAS, RawVolume, corner_offset_mm, source_info, tilt_degrees
from medvit.io.dicom import DicomSeries, list_dicom_series, select_series, series_affine
from medvit.io.label_colors import label_color

log = logging.getLogger(__name__)

RTSTRUCT_SOP = "1.2.840.10008.5.1.4.1.1.481.3"
"""RT Structure Set Storage."""
GRID_MM = 1e-3
"""rt-utils' slice grid and ours may place a corner this far apart (mm) and still be one grid."""
_PATIENT = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
            "PatientIdentityRemoved", "DeidentificationMethod")
"""Patient module attributes copied from the source series when it has them."""


def _sop_class(ds: Dataset) -> str:
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop and getattr(ds, "file_meta", None) is not None:  # an anonymiser may blank it; the file meta keeps it
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return sop


WRITE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")
"""What an RTSTRUCT references its source by; each slice must have them to be written on."""


def require_rt_utils() -> None:
    """MedvitError, one line with the install command, when rt-utils (or OpenCV's cv2) is missing:
    it is installed without its requirements (see the README), so a plain ``pip install medvit``
    lacks it."""
    try:
        import cv2  # noqa: F401
        import rt_utils  # noqa: F401
    except ImportError as e:
        raise MedvitError(f"RTSTRUCT needs rt-utils and OpenCV ({e.name} is not installed): "
                          "pip install opencv-python-headless && pip install --no-deps rt-utils==1.2.7") from None


def check_rtstruct_source(s: DicomSeries, where: str | Path, uids: Sequence[str] = WRITE_UIDS) -> np.ndarray:
    """The RAS voxel->world affine of series ``s`` (:func:`series_affine`) after checking that
    rt-utils can place contours on it: an image series, untilted, with square pixels, whose slices
    all have the ``uids`` an RTSTRUCT references them by (an anonymiser may blank them); else
    InputError naming ``where``. Gaps and uneven steps are refused by :func:`series_affine`.
    Without rt-utils installed, a MedvitError saying how to install it."""
    require_rt_utils()
    if s.not_image is not None:
        raise InputError(where, f"series {s.uid} {s.not_image}")
    affine = series_affine(s, Path(where))
    angle = tilt_degrees(affine)
    if angle >= 1e-6:
        raise InputError(where, f"series {s.uid} is gantry-tilted ({angle:.1f}°); an RTSTRUCT cannot be written or "
                                "read on it (rt-utils places each slice along the normal of the first)")
    spacing = [float(v) for v in s.headers[0].PixelSpacing]
    if abs(spacing[0] - spacing[1]) > 1e-6 * max(spacing):
        raise InputError(where, f"series {s.uid} has non-square pixels ({spacing[0]:g} x {spacing[1]:g} mm); rt-utils "
                                "1.2.7 misplaces contours on such a series, so no RTSTRUCT is written or read on it")
    blank = [t for t in uids if any(not str(h.get(t, "") or "") for h in s.headers)]
    if blank:
        raise InputError(where, f"series {s.uid}: slices without {', '.join(blank)} (blanked by an anonymiser?); an "
                                "RTSTRUCT references its image series and slices by these UIDs")
    return affine


def _series_data(s: DicomSeries) -> list[Dataset]:
    """The headers rt-utils works on, in our sorted order; the first is a copy with the General
    Study attributes that rt-utils reads without a default present (empty, as type 2 allows)."""
    first = copy.deepcopy(s.headers[0])
    for tag in ("StudyDate", "StudyTime", "StudyID"):
        if tag not in first:
            setattr(first, tag, "")
    return [first, *s.headers[1:]]


@contextlib.contextmanager
def _quiet_deprecations():
    """rt-utils sets the transfer syntax the way pydicom 3 deprecates; pydicom both warns and logs it."""
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will be removed in v4.0", category=DeprecationWarning)
            yield
    finally:
        pydicom_log.setLevel(level)


def _check_rt_utils_grid(series_data: list[Dataset], affine: np.ndarray, shape) -> None:
    """rt-utils' pixel->patient matrix must be our affine (it sorts and spaces slices alike)."""
    from rt_utils import image_helper

    theirs = LPS_TO_RAS @ image_helper.get_pixel_to_patient_transformation_matrix(series_data).astype(np.float64)
    off = corner_offset_mm(shape, theirs, affine)
    if not off <= GRID_MM:
        raise RuntimeError(f"rt-utils places the series' corners {off:.4g} mm from our affine")


def write_rtstruct(
    labels: np.ndarray,
    affine: np.ndarray,
    series: DicomSeries,
    out: str | Path,
    *,
    names: Mapping[int, str],
    description: str,
    algorithm: str = "",
    protect: Sequence[str | Path] = (),
) -> list[int]:
    """Write ``labels`` as an RTSTRUCT on ``series``: one ROI per label present, contours per slice.

    Args:
        labels: integer label map ``(X, Y, Z)`` on the series' own grid, as
            :func:`medvit.io.read_image` reads it (shape ``(Columns, Rows, slices)``, ``affine``
            equal to the series' within 1e-3 mm); 0 is background.
        affine: its RAS voxel->world matrix.
        series: the source series (its headers give the patient, study and frame of reference,
            and every contour references the slice it lies on).
        out: the file to write (through a temporary name; an existing file is replaced).
        names: label id -> ROI name (the checkpoint's label table); a missing id is named "label N".
        description: the RT series' SeriesDescription.
        algorithm: ROIGenerationDescription of every ROI (say, the net, version and checkpoint hash).
        protect: paths ``out`` must not be (the inputs).

    Each ROI's ROINumber is its label id and its ROIDisplayColor the preview's
    (:func:`medvit.io.label_colors.label_color`); ROIs are AUTOMATIC. Holes are inner contours
    (rt-utils without its pin-hole cut), which viewers subtract. Returns the label ids written.
    The series must pass :func:`check_rtstruct_source` (InputError otherwise); a label map not
    on its grid is a ValueError.
    """
    from rt_utils import ds_helper
    from rt_utils.utils import ROIData

    from medvit.core.files import atomic_path, refuse_protected

    lab = np.asarray(labels)
    where = series.files[0].parent
    src_affine = check_rtstruct_source(series, where)
    h0 = series.headers[0]
    grid = (int(h0.Columns), int(h0.Rows), series.n_files)
    if lab.shape != grid:
        raise ValueError(f"labels of shape {lab.shape} are not on series {series.uid}'s grid {grid}")
    off = corner_offset_mm(grid, np.asarray(affine, np.float64), src_affine)
    if not off <= GRID_MM:
        raise ValueError(f"the labels' affine places the grid {off:.4g} mm from series {series.uid}'s")
    if not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {lab.dtype}")
    ids = [int(i) for i in np.unique(lab) if i != 0]
    if ids and ids[0] < 0:
        raise ValueError(f"labels hold negative values ({ids[0]})")
    refuse_protected(out, protect)

    series_data = _series_data(series)
    _check_rt_utils_grid(series_data, src_affine, grid)
    with _quiet_deprecations():
        ds = ds_helper.create_rtstruct_dataset(series_data)
    frame_uid = ds.ReferencedFrameOfReferenceSequence[-1].FrameOfReferenceUID
    for i in ids:
        mask = np.ascontiguousarray((lab == i).transpose(1, 0, 2))  # rt-utils' (rows, cols, slices)
        roi = ROIData(mask, list(label_color(i)), i, str(names.get(i, f"label {i}")), frame_uid,
                      use_pin_hole=False, approximate_contours=True, roi_generation_algorithm=0)
        ds.ROIContourSequence.append(ds_helper.create_roi_contour(roi, series_data))
        ds.StructureSetROISequence.append(ds_helper.create_structure_set_roi(roi))
        ds.RTROIObservationsSequence.append(ds_helper.create_rtroi_observation(roi))
    _finish(ds, h0, description, algorithm)
    with atomic_path(out) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return ids


def _finish(ds: Dataset, source: Dataset, description: str, algorithm: str) -> None:
    """Our identity and the type-2 attributes rt-utils leaves out, in place of its placeholders."""
    import medvit

    ds.Manufacturer = "medvit"
    ds.ManufacturerModelName = "medvit"
    ds.SoftwareVersions = medvit.__version__
    if "InstitutionName" in ds:  # rt-utils writes its own lab's name there
        del ds.InstitutionName
    ds.SeriesDescription = description[:64]
    ds.SeriesDate, ds.SeriesTime = ds.StructureSetDate, ds.StructureSetTime  # rt-utils copies the image series'
    ds.StructureSetLabel = "medvit"
    ds.OperatorsName = ""
    for tag in ("ReferringPhysicianName", "AccessionNumber"):  # General Study, type 2: the source's, else empty
        setattr(ds, tag, source.get(tag, ""))
    # the Frame of Reference module: the contours lie in the source's frame
    ds.FrameOfReferenceUID = ds.ReferencedFrameOfReferenceSequence[-1].FrameOfReferenceUID
    ds.PositionReferenceIndicator = source.get("PositionReferenceIndicator", "")
    for tag in ("PatientAge", "PatientSize", "PatientWeight"):  # optional; rt-utils adds them empty
        if tag in ds and ds.get(tag) in ("", None):
            delattr(ds, tag)
    for tag in _PATIENT:
        if tag in source:
            setattr(ds, tag, source.get(tag))
    for roi in ds.StructureSetROISequence:
        roi.ROIGenerationDescription = algorithm[:64]
    for obs in ds.RTROIObservationsSequence:
        if "ROIObservationDescription" in obs:  # rt-utils' display hints for its own viewer
            del obs.ROIObservationDescription
    for item in ds.ROIContourSequence:
        for contour in item.get("ContourSequence", []):
            contour.NumberOfContourPoints = len(contour.ContourData) // 3
            # DS holds 16 characters; rt-utils writes float32 sums as long decimals
            contour.ContourData = [DSfloat(float(v), auto_format=True) for v in contour.ContourData]


def _referenced(ds: Dataset) -> tuple[set[str], set[str]]:
    """The frame of reference UIDs and series UIDs an RTSTRUCT names."""
    frames, series = set(), set()
    for ref in ds.get("ReferencedFrameOfReferenceSequence", []):
        if ref.get("FrameOfReferenceUID"):
            frames.add(str(ref.FrameOfReferenceUID))
        for study in ref.get("RTReferencedStudySequence", []):
            for s in study.get("RTReferencedSeriesSequence", []):
                if s.get("SeriesInstanceUID"):
                    series.add(str(s.SeriesInstanceUID))
    return frames, series


def _contours_by_roi(ds: Dataset) -> dict[int, list[Dataset]]:
    out: dict[int, list[Dataset]] = {}
    for item in ds.get("ROIContourSequence", []):
        out.setdefault(int(item.ReferencedROINumber), []).extend(item.get("ContourSequence", None) or [])
    return out


def _bounding_box(m: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of a 3D mask (an empty box for none)."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(m.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, 0))
    return tuple(box)


def read_rtstruct(path: str | Path, source: str | Path | None) -> RawVolume:
    """Read an RTSTRUCT's ROIs as one integer label map ``(1, X, Y, Z)`` on its source series.

    ``source`` is the image series the contours were drawn on (a folder, or a folder holding the
    series and the RTSTRUCT); the grid and affine are those :func:`medvit.io.dicom.read_dicom`
    builds for it. Each ROI's voxels take its ROINumber as label (the label id for RTSTRUCTs medvit
    writes; an RTSTRUCT whose ROINumbers fall outside 1..65535 is numbered 1..n in its ROI order),
    and ``label_names`` maps those labels to ROINames. Only CLOSED_PLANAR contours are read; ROIs
    without any (points, markers) are left out with a warning. Where ROIs overlap, the smaller
    ROI (fewer voxels) keeps the voxel, so a body outline does not swallow the organs in it; the
    overlapping voxels are counted in a warning.

    InputError (one line): no ``source``; a file that is not a readable RTSTRUCT; an RTSTRUCT
    that names another frame of reference or series than ``source``'s (both UIDs named), or
    contours on slices not in it; a source with a gap, a tilt, several image series, non-square
    pixels or non-square slices.
    """
    require_rt_utils()
    import cv2
    from rt_utils import image_helper

    path = Path(path)
    if source is None:
        raise InputError(path, "is a DICOM RTSTRUCT: its contours need the image series they were drawn on; give "
                               "that series (evaluate: --image DIR)")
    source = Path(source)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError) as e:
        raise InputError(path, f"unreadable DICOM RTSTRUCT ({e})") from None
    if _sop_class(ds) != RTSTRUCT_SOP or "StructureSetROISequence" not in ds:
        raise InputError(path, "is not a DICOM RT Structure Set with a StructureSetROISequence")
    s = select_series(source, list_dicom_series(source), None)
    affine = check_rtstruct_source(s, source, ("SOPInstanceUID",))
    h0 = s.headers[0]
    if int(h0.Rows) != int(h0.Columns):
        raise InputError(source, f"series {s.uid} has {int(h0.Rows)} x {int(h0.Columns)} (non-square) slices; "
                                 "rt-utils 1.2.7 reads RTSTRUCT contours onto square slices only")
    frames, series_uids = _referenced(ds)
    frame = str(h0.get("FrameOfReferenceUID", "") or "")
    if frames and frame not in frames:
        raise InputError(path, f"references frame of reference {listed(sorted(frames))}, but the series {source} is "
                               f"in frame of reference {frame or '(none)'}")
    if series_uids and s.uid not in series_uids:
        raise InputError(path, f"references series {listed(sorted(series_uids))}, but {source} is series {s.uid}")

    try:
        contours = _contours_by_roi(ds)
        numbers = [int(roi.ROINumber) for roi in ds.StructureSetROISequence]
    except (AttributeError, TypeError, ValueError) as e:
        raise InputError(path, f"malformed RTSTRUCT: an ROI without a whole ROINumber or ReferencedROINumber ({e})") from None
    slices = {str(h.SOPInstanceUID) for h in s.headers}
    rois: list[tuple[int, str, list[Dataset]]] = []
    left_out = []
    for number, roi in zip(numbers, ds.StructureSetROISequence):
        name = str(roi.get("ROIName", "") or f"ROI {number}")
        closed = [c for c in contours.get(number, []) if str(c.get("ContourGeometricType", "")) == "CLOSED_PLANAR"]
        if not closed:
            left_out.append(name)
            continue
        for c in closed:
            refs = [str(r.ReferencedSOPInstanceUID) for r in c.get("ContourImageSequence", None) or []]
            if not refs:
                raise InputError(path, f"ROI '{name}' has a contour that names no image slice (no ContourImageSequence); "
                                       "rt-utils places contours by the slice they reference")
            missing = [u for u in refs if u not in slices]
            if missing:
                raise InputError(path, f"ROI '{name}' has a contour on slice {missing[0]}, which is not in series "
                                       f"{s.uid} of {source}")
        rois.append((number, name, closed))
    if left_out:
        log.warning("%s: left out ROIs without closed planar contours: %s", path, listed(left_out))
    if any(not 1 <= n <= 65535 for n, _, _ in rois) or len({n for n, _, _ in rois}) != len(rois):
        rois = [(k + 1, name, c) for k, (_, name, c) in enumerate(rois)]

    series_data = _series_data(s)
    grid = (int(h0.Columns), int(h0.Rows), s.n_files)
    _check_rt_utils_grid(series_data, affine, grid)
    masks = []  # per ROI: voxels, number, name, bounding box, mask inside it (whole-grid masks would not fit)
    for number, name, closed in rois:
        try:
            m = image_helper.create_series_mask_from_contour_sequence(series_data, closed).transpose(1, 0, 2)  # our (X, Y, Z)
        except (ValueError, TypeError, AttributeError, cv2.error) as e:
            raise InputError(path, f"ROI '{name}': its contour data cannot be filled ({e})") from None
        box = _bounding_box(m)
        masks.append((int(m.sum()), number, name, box, m[box].copy()))
    top = max((n for _, n, _, _, _ in masks), default=0)
    out = np.zeros(grid, dtype=np.uint8 if top <= 255 else np.uint16)
    hits = np.zeros(grid, dtype=np.uint16)
    for _, number, _, box, m in sorted(masks, key=lambda t: -t[0]):  # the largest first: smaller ROIs paint over it
        out[box][m] = number
        hits[box] += m
    overlap = int((hits > 1).sum())
    if overlap:
        log.warning("%s: %d voxels lie in more than one ROI; each went to the smallest of them", path, overlap)
    raw = RawVolume(out[None], affine, path,
                    source_info("rtstruct", s.uid, s.description, "RTSTRUCT",
                                "" if s.series_number is None else str(s.series_number)))
    raw.label_names = {number: name for _, number, name, _, _ in masks}
    return raw
