"""DICOM RTSTRUCT out and in (rt-utils), on real CT series, checked by dciodvfy and by geometry.

Contours are polygons through the centres of a mask's boundary pixels, and reading fills them
back with OpenCV's ``fillPoly``: a slanted edge or a one-pixel notch can come back a pixel off,
so a round trip is held to Dice >= 0.98 per ROI and voxel counts within 2 %, not to equality.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from medvit.core.errors import InputError
from medvit.io import read_label
from medvit.io.common import LPS_TO_RAS
from medvit.io.dicom import list_dicom_series, select_series, series_affine
from medvit.io.label_colors import label_color
from medvit.io.rtstruct import read_rtstruct, write_rtstruct
from tests.helpers import assert_user_error, require_tool, run_cli

ROUND_TRIP_DICE = 0.98
ROUND_TRIP_COUNT = 0.02


def _series(folder: Path):
    s = select_series(folder, list_dicom_series(folder), None)
    return s, series_affine(s, folder)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def ct3(data_dir) -> Path:
    """dcmqi's 3-slice CT (uncompressed, 512², 0.81 mm pixels, 1 mm steps), read in place."""
    return data_dir / "dcmqi" / "segmentations" / "ct-3slice"


@pytest.fixture(scope="module")
def ts_ct(data_dir, tmp_path_factory) -> Path:
    """TotalSegmentator's 20-slice JPEG 2000 CT with the UIDs its anonymiser blanked put back
    (an RTSTRUCT references slices by them); pixels and geometry are the original's."""
    folder = tmp_path_factory.mktemp("ts") / "example_ct_dicom"
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    for f in sorted((data_dir / "totalsegmentator" / "example_ct_dicom").iterdir()):
        ds = pydicom.dcmread(f)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID = "Canary^Rt", "RT-0001"
        ds.save_as(folder / f.name)
    return folder


@pytest.fixture(scope="module")
def ts_labels(data_dir, ts_ct) -> tuple[np.ndarray, dict[int, str]]:
    """TotalSegmentator's 31-label map of that series, in our (X, Y, Z) order on its grid."""
    import nibabel as nib

    nii = nib.load(data_dir / "totalsegmentator" / "example_seg_dicom.nii.gz")
    _, affine = _series(ts_ct)
    ornt = nib.orientations.ornt_transform(nib.io_orientation(nii.affine), nib.io_orientation(affine))
    lab = nib.orientations.apply_orientation(np.asarray(nii.dataobj).astype(np.int32), ornt)
    aff = nii.affine @ nib.orientations.inv_ornt_aff(ornt, nii.shape)
    np.testing.assert_allclose(aff, affine, atol=1e-3)  # the same grid, only the axis order differed
    table = json.loads((data_dir / "totalsegmentator" / "totalsegmentator_class_map.json").read_text())["total"]
    names = {int(k): v for k, v in table.items()}
    return lab, names


def _ct3_labels() -> np.ndarray:
    """Three labels on the 3-slice grid: a box with a hole, a thin bar, a small block."""
    lab = np.zeros((512, 512, 3), np.int32)
    lab[100:200, 150:300, 0:2] = 1
    lab[130:150, 180:200, 0] = 0  # a hole
    lab[300:304, 100:400, 1] = 2  # four voxels thick
    lab[400:420, 60:75, 2] = 5
    return lab


def _round_trip(lab, affine, series, folder, out, names):
    ids = write_rtstruct(lab, affine, series, out, names=names, description="test", algorithm="medvit test")
    back = read_label(out, source=folder)
    np.testing.assert_allclose(np.asarray(back.affine), affine, atol=1e-6)
    arr = back.as_tensor()[0].numpy()
    assert arr.shape == lab.shape
    for i in ids:
        a, b = lab == i, arr == i
        assert _dice(a, b) >= ROUND_TRIP_DICE, (i, _dice(a, b))
        assert abs(int(b.sum()) - int(a.sum())) <= ROUND_TRIP_COUNT * a.sum(), (i, a.sum(), b.sum())
    return ids, back


def test_round_trip_on_the_dcmqi_series(ct3, tmp_path):
    s, affine = _series(ct3)
    lab = _ct3_labels()
    names = {0: "background", 1: "liver", 2: "spleen", 5: "kidney_left"}
    ids, back = _round_trip(lab, affine, s, ct3, tmp_path / "rt.dcm", names)
    assert ids == [1, 2, 5]  # ROINumber is the label id, so the map reads back with the same ids
    assert back.meta["medvit_label_names"] == {1: "liver", 2: "spleen", 5: "kidney_left"}
    arr = back.as_tensor()[0].numpy()
    assert arr[140, 190, 0] == 0 and arr[140, 190, 1] == 1  # the hole on slice 0 only


def test_round_trip_on_the_totalsegmentator_series(ts_ct, ts_labels, tmp_path):
    lab, names = ts_labels
    s, affine = _series(ts_ct)
    ids, back = _round_trip(lab, affine, s, ts_ct, tmp_path / "rt.dcm", names)
    assert ids == sorted(int(i) for i in np.unique(lab) if i)
    assert len(ids) == 31
    ds = pydicom.dcmread(tmp_path / "rt.dcm")
    rois = {int(r.ROINumber): r.ROIName for r in ds.StructureSetROISequence}
    assert rois == {i: names[i] for i in ids}
    colours = {int(c.ReferencedROINumber): [int(v) for v in c.ROIDisplayColor] for c in ds.ROIContourSequence}
    assert colours == {i: list(label_color(i)) for i in ids}


def test_contour_points_land_on_the_right_slice_and_side(ct3, tmp_path):
    """An L-shaped mask on the last sorted slice only: every contour point, taken through our
    affine from patient (LPS) to voxel coordinates, lies on that slice and on a voxel of the mask,
    and the contour references that slice's SOPInstanceUID."""
    s, affine = _series(ct3)
    lab = np.zeros((512, 512, 3), np.int32)
    lab[40:60, 300:400, 2] = 1  # the long arm along Y
    lab[40:150, 380:400, 2] = 1  # the short arm along X, at the high-Y end
    write_rtstruct(lab, affine, s, tmp_path / "rt.dcm", names={1: "L"}, description="test")
    ds = pydicom.dcmread(tmp_path / "rt.dcm")
    (item,) = ds.ROIContourSequence
    assert len(item.ContourSequence) == 1
    contour = item.ContourSequence[0]
    assert contour.ContourImageSequence[0].ReferencedSOPInstanceUID == s.headers[2].SOPInstanceUID
    lps = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
    ras = (LPS_TO_RAS[:3, :3] @ lps.T).T
    ijk = (np.linalg.inv(affine) @ np.c_[ras, np.ones(len(ras))].T).T[:, :3]
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-3)  # on voxel centres
    idx = np.round(ijk).astype(int)
    assert (idx[:, 2] == 2).all()
    assert lab[idx[:, 0], idx[:, 1], idx[:, 2]].all()
    # the corners of the L are among the points, so it is not mirrored or transposed
    corners = {tuple(p) for p in idx[:, :2].tolist()}
    assert {(40, 300), (59, 300), (40, 399), (149, 399), (149, 380)} <= corners


def test_dciodvfy_finds_no_error_and_the_references_are_the_sources(ct3, ts_ct, tmp_path):
    tool = require_tool("dciodvfy")
    for folder, lab in ((ct3, _ct3_labels()), (ts_ct, None)):
        s, affine = _series(folder)
        if lab is None:
            lab = np.zeros((512, 512, s.n_files), np.int32)
            lab[200:260, 220:300, 3:9] = 4
        out = tmp_path / f"{folder.name}.dcm"
        write_rtstruct(lab, affine, s, out, names={4: "liver"}, description="medvit test, research use only")
        run = subprocess.run([tool, str(out)], capture_output=True, text=True, timeout=120)
        report = run.stdout + run.stderr
        print(f"dciodvfy {folder.name}:\n{report}")  # its warnings, kept in the test log
        assert not [line for line in report.splitlines() if line.startswith("Error")], report

        ds, src = pydicom.dcmread(out), s.headers[0]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3" and ds.Modality == "RTSTRUCT"
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        (ref,) = ds.ReferencedFrameOfReferenceSequence
        assert ref.FrameOfReferenceUID == src.FrameOfReferenceUID
        (ref_series,) = ref.RTReferencedStudySequence[0].RTReferencedSeriesSequence
        assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
        assert [c.ReferencedSOPInstanceUID for c in ref_series.ContourImageSequence] == \
            [h.SOPInstanceUID for h in s.headers]
        for tag in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            assert ds.get(tag) == src.get(tag, ""), tag
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert "InstitutionName" not in ds  # not rt-utils' placeholder
        assert ds.Manufacturer == "medvit"


def test_an_rtstruct_of_another_series_is_refused_naming_both_uids(ct3, ts_ct, tmp_path, capsys):
    s, affine = _series(ct3)
    write_rtstruct(_ct3_labels(), affine, s, tmp_path / "rt.dcm", names={}, description="test")
    other, _ = _series(ts_ct)
    with pytest.raises(InputError) as e:
        read_rtstruct(tmp_path / "rt.dcm", ts_ct)
    msg = str(e.value)
    assert s.headers[0].FrameOfReferenceUID in msg and other.headers[0].FrameOfReferenceUID in msg, msg
    # the same frame of reference, another series: named by series UIDs
    other_series = tmp_path / "same_frame"
    other_series.mkdir()
    new_uid = generate_uid()
    for f in s.files:
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = new_uid
        ds.save_as(other_series / f.name)
    with pytest.raises(InputError, match=f"references series {s.uid}.*is series {new_uid}"):
        read_rtstruct(tmp_path / "rt.dcm", other_series)
    # through evaluate: one line, exit 2
    assert_user_error(["evaluate", str(tmp_path / "rt.dcm"), str(tmp_path / "rt.dcm"), "--image", str(ts_ct)], capsys,
                      s.headers[0].FrameOfReferenceUID, other.headers[0].FrameOfReferenceUID)
    # without the source series: one line saying to give it
    assert_user_error(["evaluate", str(tmp_path / "rt.dcm"), str(tmp_path / "rt.dcm")], capsys, "rt.dcm", "--image")


def test_overlapping_rois_go_to_the_smaller_with_a_warning(ct3, tmp_path, caplog):
    s, affine = _series(ct3)
    big, small = np.zeros((512, 512, 3), np.int32), np.zeros((512, 512, 3), np.int32)
    big[100:300, 100:300, :] = 1
    small[150:170, 150:180, 1] = 2
    write_rtstruct(big, affine, s, tmp_path / "big.dcm", names={1: "body"}, description="test")
    write_rtstruct(small, affine, s, tmp_path / "small.dcm", names={2: "tumour"}, description="test")
    ds, extra = pydicom.dcmread(tmp_path / "small.dcm"), pydicom.dcmread(tmp_path / "big.dcm")
    for seq in ("ROIContourSequence", "StructureSetROISequence", "RTROIObservationsSequence"):
        getattr(ds, seq).extend(getattr(extra, seq))  # the body outline last, as a clinic's file may have it
    ds.save_as(tmp_path / "both.dcm")
    back = read_label(tmp_path / "both.dcm", source=ct3).as_tensor()[0].numpy()
    assert (back == 2).sum() == 20 * 30
    assert (back == 1).sum() == 200 * 200 * 3 - 20 * 30
    assert "600 voxels lie in more than one ROI" in caplog.text


def test_sources_rt_utils_cannot_place_contours_on_are_refused(data_dir, ct3, tmp_path):
    from tests.helpers_dicom import write_slice, write_tilted

    s, affine = _series(ct3)
    write_rtstruct(_ct3_labels(), affine, s, tmp_path / "rt.dcm", names={}, description="test")
    with pytest.raises(InputError, match="slice gap"):
        read_rtstruct(tmp_path / "rt.dcm", data_dir / "monai" / "CT_DICOM")
    write_tilted(tmp_path / "tilted")
    with pytest.raises(InputError, match="gantry-tilted"):
        read_rtstruct(tmp_path / "rt.dcm", tmp_path / "tilted")
    (tmp_path / "aniso").mkdir()
    for k in range(2):
        write_slice(tmp_path / "aniso" / f"{k}.dcm", series_uid="1.2.3.4", ipp=(0, 0, 2.0 * k), instance=k + 1,
                    pixels=np.zeros((8, 8), np.int16), spacing=(0.7, 0.5))
    with pytest.raises(InputError, match="non-square pixels"):
        read_rtstruct(tmp_path / "rt.dcm", tmp_path / "aniso")
    with pytest.raises(InputError, match="SOPClassUID, SOPInstanceUID, StudyInstanceUID, SeriesInstanceUID"):
        ts = data_dir / "totalsegmentator" / "example_ct_dicom"  # the UIDs blanked by its anonymiser
        write_rtstruct(np.zeros((512, 512, 20), np.int32), _series(ts)[1], _series(ts)[0], tmp_path / "x.dcm",
                       names={}, description="test")
    assert not (tmp_path / "x.dcm").exists()


def test_segment_rtstruct_on_the_command_line(ckpt, ct3, tmp_path, capsys):  # noqa: F811
    import nibabel as nib

    out = tmp_path / "seg"
    code, stdout, err = run_cli(["segment", str(ct3), "-o", str(out), "--checkpoint", str(ckpt), "--rtstruct"], capsys)
    assert code == 0, err
    assert "ct-3slice_rtstruct.dcm" in stdout
    side = json.loads((out / "ct-3slice_seg.json").read_text())
    assert "ct-3slice_rtstruct.dcm" in side["outputs"] and side["options"]["rtstruct"] is True
    labels = np.asarray(nib.load(out / "ct-3slice_seg.nii.gz").dataobj)
    present = sorted(int(i) for i in np.unique(labels) if i)
    assert present and side["rtstruct"]["rois"] == present
    assert side["rtstruct"]["empty_labels"] == [i for i in sorted(int(k) for k in side["labels"]) if i and i not in present]
    ds = pydicom.dcmread(out / "ct-3slice_rtstruct.dcm")
    assert "research use" in ds.SeriesDescription
    assert [r.ROIName for r in ds.StructureSetROISequence] == [side["labels"][str(i)] for i in present]
    # evaluate takes it as the reference on its series: the same labels, Dice near 1
    code, stdout, err = run_cli(["evaluate", str(out / "ct-3slice_seg.nii.gz"), str(out / "ct-3slice_rtstruct.dcm"),
                                 "--image", str(ct3), "-o", str(tmp_path / "ev.json")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "ev.json").read_text())
    dice = {int(r["id"]): r["dice"] for r in result["labels"].values()}
    assert all(dice[i] >= ROUND_TRIP_DICE for i in present), dice


def test_segment_rtstruct_refusals_come_before_the_net(ckpt, data_dir, tmp_path, capsys):  # noqa: F811
    from tests.helpers_dicom import write_tilted

    nii = data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"
    assert_user_error(["segment", str(nii), "-o", str(tmp_path / "a"), "--checkpoint", str(ckpt), "--rtstruct"],
                      capsys, "example_ct_sm.nii.gz", "--rtstruct", "not DICOM", out_dir=tmp_path / "a")
    ts = data_dir / "totalsegmentator" / "example_ct_dicom"
    assert_user_error(["segment", str(ts), "-o", str(tmp_path / "b"), "--checkpoint", str(ckpt), "--rtstruct"],
                      capsys, "example_ct_dicom", "SOPInstanceUID", out_dir=tmp_path / "b")
    write_tilted(tmp_path / "tilted")
    assert_user_error(["segment", str(tmp_path / "tilted"), "-o", str(tmp_path / "c"), "--checkpoint", str(ckpt),
                       "--rtstruct", "--tilt", "keep"], capsys, "gantry-tilted", out_dir=tmp_path / "c")
    shutil.rmtree(tmp_path / "tilted")


def test_a_folder_holding_other_files_and_an_rtstruct_is_read_as_its_series(ct3, tmp_path):
    """rt-utils walks a folder and takes every DICOM with pixels; we hand it our series alone, so
    an RTSTRUCT beside the slices, another series' slice and a text file change nothing."""
    from tests.helpers_dicom import write_slice

    folder = tmp_path / "study"
    shutil.copytree(ct3, folder)
    (folder / "notes.txt").write_text("not DICOM")
    s, affine = _series(folder)
    lab = _ct3_labels()
    write_rtstruct(lab, affine, s, folder / "rt.dcm", names={}, description="test")
    first = _read_contour_slices(folder / "rt.dcm")
    write_slice(folder / "other.dcm", series_uid=generate_uid(), ipp=(0, 0, 0), instance=1,
                pixels=np.zeros((8, 8), np.int16), spacing=(0.5, 0.5))  # a second image series: must be chosen
    with pytest.raises(InputError, match="holds 3 DICOM series; choose one"):
        read_rtstruct(folder / "rt.dcm", folder)
    (folder / "other.dcm").unlink()
    back = read_label(folder / "rt.dcm", source=folder).as_tensor()[0].numpy()
    for i in (1, 2, 5):
        assert _dice(lab == i, back == i) >= ROUND_TRIP_DICE
    # written again with the RTSTRUCT in the folder: the same slices referenced
    s2, _ = _series(folder)
    write_rtstruct(lab, affine, s2, tmp_path / "again.dcm", names={}, description="test")
    assert _read_contour_slices(tmp_path / "again.dcm") == first


def _read_contour_slices(path: Path) -> list[str]:
    ds = pydicom.dcmread(path)
    ref = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    return [c.ReferencedSOPInstanceUID for c in ref.ContourImageSequence]


def test_a_damaged_rtstruct_is_one_line(ct3, tmp_path, capsys):
    s, affine = _series(ct3)
    write_rtstruct(_ct3_labels(), affine, s, tmp_path / "rt.dcm", names={2: "spleen"}, description="test")
    ds = pydicom.dcmread(tmp_path / "rt.dcm")
    ds.ROIContourSequence[1].ContourSequence[0].ContourData = [1.0, 2.0, 3.0, 4.0]  # not x, y, z triples
    ds.save_as(tmp_path / "bad.dcm")
    assert_user_error(["evaluate", str(tmp_path / "bad.dcm"), str(tmp_path / "bad.dcm"), "--image", str(ct3)],
                      capsys, "bad.dcm", "ROI 'spleen'", "cannot be filled")


def test_a_training_entry_takes_an_rtstruct_label_renumbered_by_name(ct3, tmp_path):
    # the datalist's label is an RTSTRUCT on the entry's image series; its ROIs (numbered 1, 2, 5
    # here) train as the config's ids of the same names
    from medvit.io.loader import LoadVolumed
    from medvit.transforms.checks import CheckCased

    s, affine = _series(ct3)
    lab = _ct3_labels()
    write_rtstruct(lab, affine, s, tmp_path / "rt.dcm", names={1: "liver", 2: "spleen", 5: "Left kidney"},
                   description="test", algorithm="medvit test")
    names = {0: "background", 1: "kidney_left", 2: "liver", 3: "spleen"}
    case = LoadVolumed(keys="image", label_keys="label")({"image": str(ct3), "label": str(tmp_path / "rt.dcm")})
    assert case["label"].shape == case["image"].shape
    checked = CheckCased("image", "label", in_channels=1, n_classes=4, label_ids=set(names), label_names=names)(case)
    got = checked["label"][0].numpy()
    for old, new in ((1, 2), (2, 3), (5, 1)):
        assert _dice(lab == old, got == new) >= ROUND_TRIP_DICE, (old, new)


def test_without_rt_utils_rtstruct_is_one_line_with_the_install_command(ct3, monkeypatch):
    import sys

    from medvit.core.errors import MedvitError
    from medvit.io.rtstruct import check_rtstruct_source

    monkeypatch.setitem(sys.modules, "rt_utils", None)  # an import of it now fails
    with pytest.raises(MedvitError) as e:
        check_rtstruct_source(_series(ct3)[0], ct3)
    assert "pip install --no-deps rt-utils" in str(e.value) and "\n" not in str(e.value)
