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

from tests.helpers import TINY, run_cli, tiny_checkpoint
from tests.helpers_dicom import CANARIES, OTHER_IDS_SEQUENCE_ID, find_canaries, write_canary_series

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
