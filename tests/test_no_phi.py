"""No patient data in anything medvit prints, logs or writes besides DICOM objects (issue 20).

A real series is copied with its identifying attributes set to unique canary strings (pixels and
geometry untouched); the CLI commands run on it in this process with file-descriptor capture (so
GDCM/ITK's own stderr and the progress bars are seen), every log record and Python warning
recorded; then every output file (decompressed where it is gzip or zip, PNG text chunks
included) and every output file and folder name is searched for every canary, in the forms DICOM
values take when printed (PN components, dates with and without dashes, times with colons).
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import logging
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from tests.helpers import tiny_checkpoint
from tests.test_cli import TINY, run_cli

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
"""Every attribute the issue names, set on every slice of the copy (added where a file lacks it)."""
IF_PRESENT = {"InstanceCreationDate": "18770928", "InstanceCreationTime": "013705.271805",
              "AcquisitionDateTime": "18770929013706.271806"}
"""Further dates and times, replaced where the source has them."""
OTHER_IDS_SEQUENCE_ID = "QZOTHERPIDSEQ6620"

SEGMENT_OPTION_SETS: list[list[str]] = [
    ["--stats", "--preview"],
    ["--dicom-seg", "--rtstruct", "--resample", "labels"],
]
"""Extra ``segment`` options; each set is one more run (its own output folder) that must leak nothing."""

SOURCES = {
    "dcmqi": "dcmqi/segmentations/ct-3slice",  # 3 uncompressed slices
    "totalsegmentator": "totalsegmentator/example_ct_dicom",  # 20 JPEG 2000 slices
}

BLANK_UIDS = {"totalsegmentator"}
"""Sources whose slices have blank Study/Series/SOP instance UIDs (an anonymiser's doing): the
DICOM SEG derives UIDs for them, the RTSTRUCT writer refuses them."""


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


def _widen_last_step(folder: Path, mm: float) -> None:
    """Move the slice farthest along the normal ``mm`` further: a slice gap."""
    files = {f: pydicom.dcmread(f) for f in folder.iterdir()}
    last = max(files, key=lambda f: float(files[f].ImagePositionPatient[2]))
    ds = files[last]
    ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [float(ds.ImagePositionPatient[2]) + mm]
    ds.save_as(last)


def _cut_after(path: Path, value: str) -> None:
    """Truncate a DICOM file a few bytes after ``value`` (inside the next element): a copy cut short."""
    raw = path.read_bytes()
    path.write_bytes(raw[: raw.index(value.encode()) + len(value) + 3])


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


def test_find_canaries_catches_every_place_a_leak_can_hide(tmp_path):
    """The search itself: a canary printed on purpose in each kind of place is reported, naming
    the place and the attribute; a clean file is not."""
    import nibabel as nib
    from PIL import Image, PngImagePlugin

    out = tmp_path / "out"
    (out / "sub_Qzpatgiven").mkdir(parents=True)
    (out / "clean.json").write_text(json.dumps({"dice": 0.9}))
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), np.eye(4))
    img.header["descrip"] = b"made 1877-09-24"
    nib.save(img, out / "x_seg.nii.gz")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "QZACC8812", zip=True)
    Image.new("L", (4, 4)).save(out / "p.png", pnginfo=info)
    with zipfile.ZipFile(out / "state.pt", "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("data.pkl", "institution: qzINSTITUTION canary")
    hits = find_canaries({"stderr": "series 01:37:02 QZPID4417"}, [out])
    said = "\n".join(hits)
    for needle in ("PatientID ('qzpid4417') in stderr", "SeriesTime ('01:37:02') in stderr",
                   f"PatientName ('qzpatgiven') in the name {out / 'sub_Qzpatgiven'}",
                   f"StudyDate ('1877-09-24') in {out / 'x_seg.nii.gz'} (gunzipped)",
                   f"AccessionNumber ('qzacc8812') in {out / 'p.png'} (PNG metadata)",
                   f"InstitutionName ('qzinstitution canary') in {out / 'state.pt'} (member data.pkl)"):
        assert needle in said, (needle, said)
    assert "clean.json" not in said


@pytest.mark.parametrize("source", list(SOURCES))
def test_no_patient_data_in_output_or_logs(source, data_dir, tmp_path, capfd, caplog):
    """Every command a clinical script runs on a DICOM series (list, segment with stats and preview,
    refusals, a modality warning, evaluate, a short training run whose datalist names the series)
    leaves no identifying attribute of it in its output, log, warnings or output names."""
    from medvit.io import read_image, write_label_map

    inputs, work = tmp_path / "inputs", tmp_path / "work"
    ct = inputs / "ct"
    write_canary_series(data_dir / SOURCES[source], ct)
    other_uid = write_canary_series(data_dir / SOURCES[source], inputs / "study" / "b", new_series=True)
    write_canary_series(data_dir / SOURCES[source], inputs / "study" / "a", new_series=True)
    write_canary_series(data_dir / SOURCES[source], inputs / "nouid", blank_uid=True)
    write_canary_series(data_dir / SOURCES[source], inputs / "gap", new_series=True)
    _widen_last_step(inputs / "gap", 5.0)
    write_canary_series(data_dir / SOURCES[source], inputs / "cut", new_series=True)
    _cut_after(sorted((inputs / "cut").iterdir())[-1], CANARIES["OtherPatientIDs"])
    copied = pydicom.dcmread(next(ct.iterdir()), stop_before_pixels=True)
    assert {k: str(copied[k].value) for k in CANARIES} == CANARIES
    assert copied.OtherPatientIDsSequence[0].PatientID == OTHER_IDS_SEQUENCE_ID
    grid, original = read_image(ct), read_image(data_dir / SOURCES[source])  # the same voxels where they were
    assert torch.equal(grid.as_tensor(), original.as_tensor()) and torch.equal(grid.affine, original.affine)
    work.mkdir()
    ct_ckpt, mr_ckpt = tiny_checkpoint(work, "ct"), tiny_checkpoint(work, "mri")

    texts: dict[str, str] = {}
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def cli(name: str, args: list[str], expect: int = 0) -> str:
            code, out, err = run_cli(args, capfd)
            texts[f"{name} stdout"], texts[f"{name} stderr"] = out, err
            assert code == expect, (name, code, out, err)
            return out + err

        assert other_uid in cli("series", ["series", str(inputs / "study")])
        for i, options in enumerate(SEGMENT_OPTION_SETS):
            if source in BLANK_UIDS and "--rtstruct" in options:  # refused there: contours reference slice UIDs
                options = [o for o in options if o != "--rtstruct"]
            cli(f"segment {options}", ["segment", str(ct), "-o", str(work / f"seg{i}"), "--checkpoint", str(ct_ckpt),
                                       *options])
        cli("segment, blank SeriesInstanceUID", ["segment", str(inputs / "nouid"), "-o", str(work / "nouid"),
                                                 "--checkpoint", str(ct_ckpt), "--resample", "labels"])
        assert json.loads((work / "nouid" / "nouid_seg.json").read_text())["source"]["series_uid"].startswith("nouid-")
        said = cli("refusal: two series", ["segment", str(inputs / "study"), "-o", str(work / "refused"),
                                           "--checkpoint", str(ct_ckpt)], expect=2)
        assert other_uid in said  # the listing names each series by UID
        cli("refusal: unknown --series", ["segment", str(inputs / "study"), "-o", str(work / "refused"),
                                          "--checkpoint", str(ct_ckpt), "--series", "1.2.3.4"], expect=2)
        assert "slice gap" in cli("refusal: gap", ["segment", str(inputs / "gap"), "-o", str(work / "refused"),
                                                   "--checkpoint", str(ct_ckpt)], expect=2)
        assert "cut short" in cli("refusal: cut short", ["series", str(inputs / "cut")], expect=2)
        cli("refusal: --strict", ["segment", str(ct), "-o", str(work / "refused"), "--checkpoint", str(mr_ckpt),
                                  "--strict"], expect=2)
        said = cli("modality warning", ["segment", str(ct), "-o", str(work / "warned"), "--checkpoint", str(mr_ckpt),
                                        "--resample", "labels"])
        assert "DICOM Modality is CT" in said + caplog.text

        # a reference label on the series' grid (one box), for evaluate and training
        label = np.zeros(grid.shape[1:], np.uint8)
        label[label.shape[0] // 4: label.shape[0] // 2, label.shape[1] // 4: label.shape[1] // 2] = 1
        write_label_map(label, np.asarray(grid.affine), work / "ref.nii.gz")
        cli("evaluate", ["evaluate", str(work / "seg0" / "ct_seg.nii.gz"), str(work / "ref.nii.gz"),
                         "-o", str(work / "eval.json"), "--labels", str(ct_ckpt.with_suffix(".json"))])
        for ref in ("ct_seg.dcm",) + (() if source in BLANK_UIDS else ("ct_rtstruct.dcm",)):  # read onto the series
            cli(f"evaluate {ref}", ["evaluate", str(work / "seg0" / "ct_seg.nii.gz"), str(work / "seg1" / ref),
                                    "--image", str(ct), "-o", str(work / f"eval_{ref}.json")])

        entry = {"image": str(ct), "label": str(work / "ref.nii.gz")}
        (work / "datalist.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))
        cfg = copy.deepcopy(TINY)
        cfg["augment"] = {"num_samples": 1}
        cfg["train"] = {"datalist": str(work / "datalist.json"), "output_dir": str(work / "run"), "epochs": 1,
                        "max_steps_per_epoch": 1, "batch_size": 1, "lr": 1e-3, "val_every": 1}
        (work / "train.yaml").write_text(yaml.safe_dump(cfg))
        cli("train", ["train", str(work / "train.yaml")])

    texts["log records"] = "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records) + caplog.text
    texts["Python warnings"] = "\n".join(f"{w.category.__name__}: {w.message}" for w in caught)
    assert (work / "run" / "metrics.jsonl").is_file() and (work / "seg0" / "ct_preview.png").is_file()
    hits = find_canaries(texts, [work])
    assert not hits, "patient data leaked:\n" + "\n".join(hits)
