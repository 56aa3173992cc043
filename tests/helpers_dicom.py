"""DICOM files written for tests: synthetic slices and series (plain, gantry-tilted) and copies of
real series carrying canary patient data, with the search that finds a canary anywhere."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from medvit.io.common import LPS_TO_RAS


def write_slice(path: Path, *, series_uid: str, ipp, instance: int, pixels: np.ndarray, iop=(1, 0, 0, 0, 1, 0),
                spacing=(0.7, 0.5), description: str = "", thickness: float | None = 2.0, slope: float = 1.0,
                intercept: float = 0.0, modality: str = "CT", number: int | None = None) -> Path:
    """A minimal uncompressed CT (or, ``modality="MR"``, MR) slice; ``pixels`` is (Rows, Columns)
    int16; ``number`` is its SeriesNumber (none when None)."""
    sop = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    if number is not None:
        ds.SeriesNumber = number
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in spacing]
    if thickness is not None:
        ds.SliceThickness = thickness
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = pixels.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_body_series(folder: Path, *, modality: str = "CT", number: int | None = 1, n: int = 4,
                      uid: str | None = None, offset: float = 0.0, seed: int = 0) -> str:
    """``n`` axial 16x16 slices, 6 mm apart, of one series; returns its SeriesInstanceUID. CT pixels
    hold air (-1000) around a body (40 HU); MR ones 0 around 300."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    rng = np.random.default_rng(seed)
    for i in range(n):
        body = np.zeros((16, 16), bool)
        body[3:13, 2:14] = True
        px = np.where(body, 40, -1000) if modality == "CT" else np.where(body, 300, 0)
        write_slice(folder / f"{uid[-4:]}_{i}.dcm", series_uid=uid, ipp=(0.0, 0.0, offset + 6.0 * i), instance=i + 1,
                    pixels=(px + rng.normal(0, 5, px.shape)).astype(np.int16), spacing=(5.0, 5.0), thickness=6.0,
                    modality=modality, number=number)
    return uid


# the tilted series of write_tilted: its tilt (degrees), slice grid, slice step and pixel (mm)
TILT = 14.0
ROWS, COLS, N, STEP, PIX = 20, 24, 6, 3.0, 1.5
BLOCK_LPS = (np.array([-4.0, -6.0, 3.0]), np.array([5.0, 4.0, 10.0]))  # a bright box, world mm (LPS)


def block_hu(lps: np.ndarray) -> np.ndarray:
    inside = np.all((lps >= BLOCK_LPS[0]) & (lps <= BLOCK_LPS[1]), axis=-1)
    return np.where(inside, 1000, 0).astype(np.int16)


def write_tilted(folder, tilt_deg: float = TILT, n: int = N):
    """Axial slices (rows along +x, columns along +y) whose positions step along z tilted by
    ``tilt_deg`` towards y; the pixel values sample a world-space block. Returns the RAS affine the
    tags describe."""
    folder.mkdir(parents=True, exist_ok=True)
    t = np.radians(tilt_deg)
    step = STEP * np.array([0.0, np.sin(t), np.cos(t)])
    origin = np.array([-COLS * PIX / 2, -ROWS * PIX / 2, -3.0])
    for k in range(n):
        ipp = origin + k * step
        i, j = np.meshgrid(np.arange(COLS), np.arange(ROWS))  # (Rows, Columns) grids of column i, row j
        lps = ipp + i[..., None] * PIX * np.array([1.0, 0, 0]) + j[..., None] * PIX * np.array([0, 1.0, 0])
        write_slice(folder / f"s{k:02d}.dcm", series_uid="1.2.826.0.1.3680043.8.498.77", ipp=ipp, instance=k + 1,
                    pixels=block_hu(lps), spacing=(PIX, PIX), thickness=STEP)
    lps_aff = np.eye(4)
    lps_aff[:3, 0], lps_aff[:3, 1], lps_aff[:3, 2], lps_aff[:3, 3] = [PIX, 0, 0], [0, PIX, 0], step, origin
    return LPS_TO_RAS @ lps_aff


CANARIES = {
    "PatientName": "Qzpatfamily^Qzpatgiven",
    "PatientID": "QZPID4417",
    "OtherPatientIDs": "QZOTHERPID5531",
    "PatientBirthDate": "18770923",
    "AccessionNumber": "QZACC8812",
    "InstitutionName": "Qzinstitution Canary",
    "ReferringPhysicianName": "Qzreffamily^Qzrefgiven",
    "StudyDate": "18770924",
    "SeriesDate": "18770925",
    "AcquisitionDate": "18770926",
    "ContentDate": "18770927",
    "StudyTime": "013701.271801",
    "SeriesTime": "013702.271802",
    "AcquisitionTime": "013703.271803",
    "ContentTime": "013704.271804",
}
"""Patient-identifying attributes and their canaries, set on every slice of a copy (added where a
file lacks them) by :func:`write_canary_series`."""
IF_PRESENT = {"InstanceCreationDate": "18770928", "InstanceCreationTime": "013705.271805",
              "AcquisitionDateTime": "18770929013706.271806"}
"""Further dates and times, replaced where the source has them."""
OTHER_IDS_SEQUENCE_ID = "QZOTHERPIDSEQ6620"


def canary_forms() -> dict[str, list[str]]:
    """Attribute -> the strings any printed form of its canary contains: each PN component (so
    "Family^Given", "Given Family" and "Family, Given" are all caught), a DA with and without
    dashes, a TM to milliseconds and with colons, a DT as both."""
    def date(v: str) -> list[str]:
        return [v, f"{v[:4]}-{v[4:6]}-{v[6:]}"]

    def time(v: str) -> list[str]:
        return [v[:10], f"{v[:2]}:{v[2:4]}:{v[4:6]}"]

    forms: dict[str, list[str]] = {}
    for key, value in {**CANARIES, **IF_PRESENT, "OtherPatientIDsSequence": OTHER_IDS_SEQUENCE_ID}.items():
        if "^" in value:
            forms[key] = value.split("^")
        elif key.endswith("DateTime"):
            forms[key] = date(value[:8]) + time(value[8:])
        elif key.endswith("Date"):
            forms[key] = date(value)
        elif key.endswith("Time"):
            forms[key] = time(value)
        else:
            forms[key] = [value]
    return forms


def write_canary_series(src: Path, dst: Path, *, new_series: bool = False, blank_uid: bool = False) -> str:
    """Copy the DICOM files of ``src`` to ``dst`` with the canaries set; ``new_series`` gives the copy
    its own SeriesInstanceUID, SeriesNumber and SOPInstanceUIDs, ``blank_uid`` a blank
    SeriesInstanceUID (as some anonymisers leave it). Returns the SeriesInstanceUID."""
    dst.mkdir(parents=True)
    uid = "" if blank_uid else generate_uid() if new_series else None
    for f in sorted(p for p in src.iterdir() if p.is_file()):
        ds = pydicom.dcmread(f)
        for key, value in CANARIES.items():
            setattr(ds, key, value)
        for key, value in IF_PRESENT.items():
            if key in ds:
                setattr(ds, key, value)
        other = Dataset()
        other.PatientID = OTHER_IDS_SEQUENCE_ID
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = Sequence([other])
        if new_series or blank_uid:
            ds.SeriesInstanceUID = uid
            ds.SeriesNumber = int(ds.get("SeriesNumber") or 1) + 100
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(dst / f.name)
    return str(ds.SeriesInstanceUID)


def _views(path: Path) -> list[tuple[str, bytes]]:
    """The bytes of a file to search: as stored, gunzipped, each zip member, and PNG text chunks
    (compressed zTXt/iTXt ones too, as Pillow decodes them)."""
    raw = path.read_bytes()
    views = [("", raw)]
    if raw[:2] == b"\x1f\x8b":
        views.append((" (gunzipped)", gzip.decompress(raw)))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            views += [(f" (member {n})", z.read(n)) for n in z.namelist()]
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as im:
            views.append((" (PNG metadata)", repr({**im.info, **getattr(im, "text", {})}).encode()))
    return views


def is_dicom_object(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def find_canaries(texts: dict[str, str], roots: list[Path]) -> list[str]:
    """Where a canary occurs (case-insensitively): in ``texts`` (what -> captured text), or in a
    file or folder name under ``roots``, or in a file's contents (DICOM objects excepted)."""
    forms = {k: [f.lower() for f in v] for k, v in canary_forms().items()}
    hits = []

    def search(where: str, data: bytes) -> None:
        low = data.lower()
        hits.extend(f"{key} ({form!r}) in {where}" for key, fs in forms.items() for form in fs
                    if form.encode() in low)

    for what, text in texts.items():
        search(what, text.encode("utf-8", "replace"))
    for root in roots:
        for p in sorted(root.rglob("*")):
            search(f"the name {p}", p.name.encode())
            if p.is_file() and not is_dicom_object(p):
                for how, data in _views(p):
                    search(f"{p}{how}", data)
    return hits
