"""DICOM Segmentation objects, written and read with highdicom on the source series' slices.

Writing (:func:`write_dicom_seg`): a label map on :func:`medvit.io.dicom.read_dicom`'s grid of a
DICOM series becomes a BINARY Segmentation (uncompressed; LABELMAP, the 2024 SOP class, on
request) whose frames are the source slices that hold a segment: the labels go into a
``highdicom.Volume`` that ``match_geometry`` puts onto the geometry the source headers describe,
so every frame has its source slice's position and a derivation reference to it. Label numbers
are renumbered 1..n over the labels present (highdicom, like the standard, wants every segment
from 1 up described); segment descriptions carry SNOMED CT codes from
:mod:`medvit.io.segment_codes` and the algorithm (net, medvit version, checkpoint SHA-256).
The patient and study modules are copied from the source as the standard requires; type-2
attributes an anonymiser removed are written empty, never made up.

Reading (:func:`read_dicom_seg`): ``get_pixels_by_source_instance`` with the source series'
SOP instances in our sorted slice order, one segment at a time; where segments overlap, the
higher segment number wins (a warning counts the voxels). The result lies exactly on the grid
:func:`medvit.io.dicom.read_dicom` builds for the source (``tilt="keep"``), labels 1..n being
the segment numbers, with the segment labels as names.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from medvit.core.errors import InputError
from medvit.io.common import LPS_TO_RAS, RawVolume, corner_offset_mm, source_info, tilt_degrees
from medvit.io.dicom import DicomSeries, list_dicom_series, select_series, series_affine

log = logging.getLogger(__name__)

SEG_TYPES = ("binary", "labelmap")
SERIES_DESCRIPTION = "medvit segmentation - research use only, not for clinical use"

# type-2 attributes of the patient and general study modules: present, and empty when unknown
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


@contextlib.contextmanager
def _values_unsaid():
    """Silence highdicom's and pydicom's warnings while they copy or parse the source's attributes:
    theirs quote the values (a patient name "unlikely to represent the intended person name", an
    invalid date), and nothing medvit prints may carry patient data."""
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_log.setLevel(level)


@dataclass
class SegWritten:
    """What :func:`write_dicom_seg` wrote: the file, each segment's number -> (label in the map,
    name), and the labels named but absent from the map (left out)."""

    path: Path
    segments: dict[int, tuple[int, str]] = field(default_factory=dict)
    empty: dict[int, str] = field(default_factory=dict)


def source_series(source: str | Path, series: str | None = None) -> tuple[DicomSeries, np.ndarray]:
    """The source image series (sorted, checked for gaps and mixed geometry as reading does) and
    its RAS affine; InputError for a source that is not a DICOM image series."""
    from medvit.io.reader import source_format

    source = Path(source)
    fmt = source_format(source)  # a missing path or unsupported file is refused here
    if fmt != "dicom":
        raise InputError(source, f"is {'NIfTI' if fmt == 'nifti' else fmt.upper()}, not a DICOM series; a DICOM SEG is "
                                 "read onto (and written on) the DICOM image series it was drawn on")
    s = select_series(source, list_dicom_series(source), series)
    if s.not_image is not None:
        raise InputError(source, s.not_image if source.is_file() else f"series {s.uid} {s.not_image}")
    return s, series_affine(s, source)


def _coded(code: tuple[str, str]):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code[0], scheme_designator="SCT", meaning=code[1])


def _descriptions(segments: dict[int, tuple[int, str]], algorithm: dict, colors: Mapping[int, tuple[int, int, int]]):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medvit.io.segment_codes import segment_codes

    coded = segment_codes({n: name for n, (_, name) in segments.items()})
    ident = hd.AlgorithmIdentificationSequence(
        name=str(algorithm.get("name") or "medvit")[:64],
        family=codes.DCM.ArtificialIntelligence,
        version=f"medvit {algorithm.get('version', '')}".strip()[:64],
        source="medvit",
        parameters={"checkpoint_sha256": str(algorithm.get("sha256") or "unsaved")},
    )
    out = []
    for number, (v, name) in segments.items():
        code = coded[number]
        desc = hd.seg.SegmentDescription(
            segment_number=number, segment_label=str(name)[:64], segmented_property_category=_coded(code.category),
            segmented_property_type=_coded(code.type), algorithm_type="AUTOMATIC", algorithm_identification=ident,
            display_color=hd.color.CIELabColor.from_rgb(*colors[v]) if v in colors else None)
        if code.laterality is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _coded(code.laterality)]
        out.append(desc)
    return out


def _meta_uid(h: Dataset, tag: str, meta_tag: str) -> str:
    """A UID of ``h``, or the file meta's copy where an anonymiser blanked the dataset's."""
    uid = str(h.get(tag, "") or "")
    if not uid and getattr(h, "file_meta", None) is not None:
        uid = str(h.file_meta.get(meta_tag, "") or "")
    return uid


def instance_uids(s: DicomSeries) -> list[str]:
    """SOPInstanceUID of each sorted slice (the file meta's where the dataset's is blank)."""
    return [_meta_uid(h, "SOPInstanceUID", "MediaStorageSOPInstanceUID") for h in s.headers]


_DERIVED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID")


def _source_headers(s: DicomSeries, where: Path) -> list[Dataset]:
    """The source headers highdicom copies from. Type-2 attributes the source lacks are present
    and empty (anonymised data). A blank SOP class or instance UID is taken from the file meta;
    a blank study, series or frame-of-reference UID (which no file meta holds) is replaced by a
    UID derived from the slices' SOP instance UIDs, the same on every run, with a warning: a SEG
    must reference them, and they identify nobody."""
    from pydicom.uid import generate_uid

    uids = instance_uids(s)
    if not all(uids):
        i = uids.index("")
        raise InputError(where, f"series {s.uid}: instance {s.instance(i)} has no SOPInstanceUID; a DICOM SEG must "
                                "reference each source slice by it")
    derived = {}
    for tag in _DERIVED_UIDS:
        values = {str(h.get(tag, "") or "") for h in s.headers}
        if values == {""}:
            derived[tag] = generate_uid(entropy_srcs=[tag, *sorted(uids)])
        elif "" in values or len(values) > 1:
            raise InputError(where, f"series {s.uid}: the slices do not share one {tag}")
    if derived:
        log.warning("%s: the source series has no %s (anonymised?); the DICOM SEG carries UIDs derived from its "
                    "slices' SOP instance UIDs instead", where, ", ".join(derived))
    headers = []
    for h, uid in zip(s.headers, uids):
        h = pydicom.Dataset(h)  # a shallow copy: the cached headers stay as read
        h.file_meta = s.headers[0].file_meta
        h.SOPInstanceUID = uid
        h.SOPClassUID = _meta_uid(h, "SOPClassUID", "MediaStorageSOPClassUID")
        for tag, value in derived.items():
            setattr(h, tag, value)
        if "SpecificCharacterSet" in h and not h.SpecificCharacterSet:
            del h.SpecificCharacterSet  # blank means the default repertoire, which highdicom wants unsaid
        for tag in _TYPE2:
            if tag not in h:
                setattr(h, tag, None)
        headers.append(h)
    return headers


def write_dicom_seg(
    labels: np.ndarray,
    affine: np.ndarray,
    source: str | Path,
    path: str | Path,
    *,
    names: dict[int, str],
    algorithm: dict,
    seg_type: str = "binary",
    series: str | None = None,
    protect: list[str | Path] | None = None,
    colors: Mapping[int, tuple[int, int, int]] | None = None,
) -> SegWritten:
    """Write ``labels`` (``(X, Y, Z)`` integers on ``read_dicom(source)``'s grid, RAS ``affine``) as
    a DICOM SEG at ``path`` (through :func:`medvit.core.files.atomic_path`).

    Args:
        names: label number -> name (the checkpoint's label table; 0 is background and ignored).
        algorithm: ``name`` (the net), ``version`` (medvit's), ``sha256`` (the checkpoint's).
        seg_type: ``"binary"`` (Segmentation Storage, BINARY) or ``"labelmap"`` (Label Map
            Segmentation Storage, which most viewers and validators do not read yet).
        series: the SeriesInstanceUID read from a folder of several.
        colors: label number -> RGB 0..255, written as each segment's recommended display colour.

    Labels present are renumbered 1..n in ascending order; named labels absent from the map are
    left out, listed in one warning and in the result. A source with gaps, several series to
    choose from, or without SOP instance UIDs raises InputError; ``labels`` off the source's grid
    is a ValueError (a caller's bug). A gantry-tilted source's labels must be on its sheared grid
    (``tilt="keep"``); each frame is then its slice.
    """
    import highdicom as hd

    import medvit
    from medvit.core.files import atomic_path, refuse_protected

    if seg_type not in SEG_TYPES:
        raise ValueError(f"seg_type must be one of {SEG_TYPES}, got {seg_type!r}")
    source, path = Path(source), Path(path)
    labels = np.asarray(labels)
    if labels.ndim != 3 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 3D integer array, got {labels.dtype} {labels.shape}")
    s, src_affine = source_series(source, series)
    h0 = s.headers[0]
    shape = (int(h0.Columns), int(h0.Rows), s.n_files)
    if labels.shape != shape or corner_offset_mm(shape, affine, src_affine) > 1e-3:
        raise ValueError(f"labels {labels.shape} are not on the grid of series {s.uid} {shape} (read it with "
                         "tilt='keep' or 'error')")
    refuse_protected(path, protect or [])

    present = [int(v) for v in np.unique(labels) if v != 0]
    if present and present[0] < 0:
        raise ValueError(f"labels hold negative values ({present[0]})")
    segments = {i: (v, str(names.get(v, f"label {v}"))) for i, v in enumerate(present, start=1)}
    empty = {int(k): str(v) for k, v in names.items() if int(k) != 0 and int(k) not in present}
    if empty:
        log.warning("%s: label(s) %s hold no voxel and are left out of the DICOM SEG", path.name,
                    ", ".join(f"{k} ({v})" for k, v in sorted(empty.items())))
    if not segments:
        raise InputError(path, "the label map holds no label other than background; a DICOM SEG needs at least "
                               "one segment, so none is written")
    lut = np.zeros(max(present) + 1, dtype=np.uint16 if len(present) > 255 else np.uint8)
    for number, (v, _) in segments.items():
        lut[v] = number
    relabeled = lut[labels]

    headers = _source_headers(s, source)
    frame_of_ref = str(headers[0].FrameOfReferenceUID)
    if tilt_degrees(src_affine) > 1e-6:
        # a gantry-tilted series has no Volume geometry (a sheared grid): the label map, on the
        # slices' own grid, goes frame by frame onto the sorted slices
        planes_array = np.ascontiguousarray(relabeled.transpose(2, 1, 0))
    else:
        # (X, Y, Z) = (column, row, slice) -> highdicom's (slice, row, column), affine in LPS
        volume = hd.Volume(np.ascontiguousarray(relabeled.transpose(2, 1, 0)), LPS_TO_RAS @ affine[:, [2, 1, 0, 3]],
                           coordinate_system="PATIENT", frame_of_reference_uid=frame_of_ref)
        step = float(np.linalg.norm(src_affine[:3, 2]))
        # highdicom stacks frames against the row x column normal, so from our last slice to our first
        geometry = hd.VolumeGeometry.from_attributes(
            image_position=s.headers[-1].ImagePositionPatient, image_orientation=h0.ImageOrientationPatient,
            rows=int(h0.Rows), columns=int(h0.Columns), pixel_spacing=h0.PixelSpacing, spacing_between_slices=step,
            number_of_frames=s.n_files, coordinate_system="PATIENT", frame_of_reference_uid=frame_of_ref)
        volume = volume.match_geometry(geometry, tol=1e-3)
        # each plane of the matched volume is one source slice: passing the planes as an array with the
        # slices in the same order lets highdicom copy each frame's position from its slice and record
        # the derivation reference (it records none for a Volume's own planes)
        planes = np.array([p[0].ImagePositionPatient for p in volume.get_plane_positions()], dtype=np.float64)
        ipp = np.array([h.ImagePositionPatient for h in headers], dtype=np.float64)
        dist = np.linalg.norm(planes[:, None, :] - ipp[None, :, :], axis=2)
        order = dist.argmin(axis=1)
        if planes.shape != ipp.shape or sorted(order.tolist()) != list(range(len(headers))) or \
                dist[np.arange(len(order)), order].max() > 1e-3:
            raise RuntimeError(f"highdicom's volume planes are not the slices of series {s.uid}")
        headers = [headers[i] for i in order]
        planes_array = volume.array

    version = medvit.__version__
    number = h0.get("SeriesNumber")
    with _values_unsaid():
        seg = _segmentation(hd, headers, planes_array, seg_type, _descriptions(segments, algorithm, colors or {}),
                            number, version, algorithm)
        seg.SeriesDescription = SERIES_DESCRIPTION
        with atomic_path(path) as tmp:
            seg.save_as(tmp, enforce_file_format=True)
    return SegWritten(path, segments, empty)


def _segmentation(hd, headers, planes_array, seg_type, descriptions, number, version, algorithm):
    """highdicom's Segmentation of ``planes_array`` (one plane per header, in their order)."""
    return hd.seg.Segmentation(
        source_images=headers,
        pixel_array=planes_array,
        segmentation_type=hd.seg.SegmentationTypeValues[seg_type.upper()],
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=(int(number) if number not in (None, "") else 0) % 100000 + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="medvit",
        manufacturer_model_name=str(algorithm.get("name") or "medvit")[:64],
        software_versions=f"medvit {version}",
        device_serial_number=str(algorithm.get("sha256") or "unsaved")[:16],
        content_label="MEDVIT",
        content_description="medvit segmentation (research use only)",
        omit_empty_frames=True,
    )


FRAME_POSITION_MM = 0.01
"""How far a SEG frame's ImagePositionPatient may lie from its source slice's (writers round it)."""


def _check_frame_positions(seg, s: DicomSeries, uids: list[str], path: Path) -> None:
    """Each frame that names its source slice must lie on it: highdicom's own check needs the
    optional SpatialLocationsPreserved flag, which dcmqi and others leave out."""
    where = {u: (i, np.asarray(h.ImagePositionPatient, dtype=np.float64)) for i, (u, h) in enumerate(zip(uids, s.headers))}
    for k, frame in enumerate(seg.get("PerFrameFunctionalGroupsSequence", []), start=1):
        try:
            ref = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            pos = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        except (AttributeError, IndexError):
            continue
        if ref in where:
            i, ipp = where[ref]
            off = float(np.linalg.norm(pos - ipp))
            if off > FRAME_POSITION_MM:
                raise InputError(path, f"frame {k} lies {off:.3g} mm from its source slice (instance {s.instance(i)} of "
                                       f"series {s.uid}); it is not on the source's slices")


def read_dicom_seg(path: str | Path, source: str | Path, *, series: str | None = None) -> RawVolume:
    """Read a DICOM SEG onto its source series' grid: a ``(1, X, Y, Z)`` uint8/uint16 label map
    (segment numbers as labels) with exactly ``read_dicom(source, tilt="keep")``'s affine, and
    ``label_names`` number -> SegmentLabel.

    A SEG that references another series than ``source``'s, or has another FrameOfReferenceUID,
    is refused with one line naming both UIDs. Overlapping segments (BINARY or FRACTIONAL, where
    a voxel may be in several) are read one at a time and the higher segment number wins, with a
    warning counting the voxels; a FRACTIONAL segment holds where its value is at least half.
    """
    import highdicom as hd

    path = Path(path)
    try:
        with _values_unsaid():
            seg = hd.seg.segread(path)
    except (ValueError, AttributeError, KeyError, TypeError) as e:
        raise InputError(path, f"cannot be read as a DICOM SEG ({type(e).__name__})") from None
    s, affine = source_series(source, series)
    uids = instance_uids(s)
    refs = list(seg.get("ReferencedSeriesSequence", []))
    referenced = [str(r.SeriesInstanceUID) for r in refs]
    if s.uid.startswith("nouid-"):  # a source without SeriesInstanceUID: its instances must be the ones referenced
        mine = {str(i.ReferencedSOPInstanceUID) for r in refs for i in r.get("ReferencedInstanceSequence", [])}
        if mine and not mine & set(uids):
            raise InputError(path, f"references series {', '.join(referenced)} whose instances are not those of "
                                   f"the source {source} (a series without SeriesInstanceUID)")
    elif referenced and s.uid not in referenced:
        raise InputError(path, f"references series {', '.join(referenced)}, but the source {source} is series {s.uid}")
    seg_for = str(seg.get("FrameOfReferenceUID", "") or "")
    src_for = str(s.headers[0].get("FrameOfReferenceUID", "") or "")
    if seg_for and src_for and seg_for != src_for:
        raise InputError(path, f"has FrameOfReferenceUID {seg_for}, but the source {source} has {src_for}")
    _check_frame_positions(seg, s, uids, path)
    h0 = s.headers[0]
    shape = (int(h0.Columns), int(h0.Rows), s.n_files)
    numbers = [int(n) for n in seg.segment_numbers]
    dtype = np.uint8 if max(numbers, default=0) <= 255 else np.uint16
    out = np.zeros(shape[::-1], dtype=dtype)  # (Z, Y, X) as highdicom returns frames
    seen = np.zeros(out.shape, dtype=bool)
    multi = np.zeros(out.shape, dtype=bool)
    for n in numbers:
        try:
            with _values_unsaid():
                frames = seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=uids, segment_numbers=[n], assert_missing_frames_are_empty=True,
                    ignore_spatial_locations=True)
        except (ValueError, KeyError, RuntimeError) as e:
            raise InputError(path, f"segment {n} cannot be placed on the slices of series {s.uid} ({e})") from None
        mask = frames[..., 0] >= (0.5 if np.issubdtype(frames.dtype, np.floating) else 1)
        if mask.shape != out.shape:
            raise InputError(path, f"frames of {mask.shape[1:]} pixels do not fit series {s.uid}'s {out.shape[1:]}")
        multi |= mask & seen
        seen |= mask
        out[mask] = n
    overlap = int(np.count_nonzero(multi))
    if overlap:
        log.warning("%s: %d voxel(s) lie in more than one segment; each takes the highest segment number",
                    path, overlap)
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    raw = RawVolume(np.ascontiguousarray(out.transpose(2, 1, 0))[None], affine, path,
                    source_info("dicom", str(seg.SeriesInstanceUID), str(seg.get("SeriesDescription", "") or ""),
                                "SEG", str(seg.get("SeriesNumber", "") or "")))
    raw.label_names = {n: names.get(n, f"segment {n}") for n in numbers}
    return raw
