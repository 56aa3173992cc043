"""DICOM SEG out and in: SNOMED codes, highdicom writing and reading, checked by dcmqi, dciodvfy
and highdicom on the real series in the shared data folder."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from nibabel.orientations import apply_orientation, io_orientation, ornt_transform

from medvit.io import LoadVolumed, read_image, read_label
from medvit.io.dicom_seg import SERIES_DESCRIPTION, read_dicom_seg, source_series, write_dicom_seg
from medvit.io.segment_codes import LEFT, RIGHT, TISSUE, _TABLE, normalize, segment_code, segment_codes
from tests.helpers import TINY, assert_user_error, require_tool, run_cli
from tests.helpers_dicom import write_body_series

TS_LABELS = {1: "spleen", 2: "kidney_right", 5: "liver", 69: "humerus_left", 70: "humerus_right",
             86: "autochthon_left", 87: "autochthon_right"}
"""A few TotalSegmentator labels of example_seg_dicom.nii.gz; kidney_right holds no voxel there."""
ALGORITHM = {"name": "unetr", "version": "test", "sha256": "ab" * 32}


# ---------------------------------------------------------------- codes


def _verhoeff_ok(code: str) -> bool:
    """SNOMED CT identifiers end in a Verhoeff check digit: a mistyped code fails it."""
    d = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
         [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
         [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
         [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
    p = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
         [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
         [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]
    c = 0
    for i, ch in enumerate(reversed(code)):
        c = d[c][p[i % 8][int(ch)]]
    return c == 0


def test_every_code_is_a_valid_snomed_identifier():
    codes = {c for pair in _TABLE.values() for c, _ in pair} | {LEFT[0], RIGHT[0], TISSUE[0]}
    bad = sorted(c for c in codes if not c.isdigit() or not _verhoeff_ok(c))
    assert not bad
    assert _verhoeff_ok("10200004") and not _verhoeff_ok("10200005")  # the check itself can fail


def test_left_and_right_kidney_share_a_type_and_differ_in_laterality():
    left, right = segment_code("kidney_left"), segment_code("Right Kidney")
    assert left.type == right.type == ("64033007", "Kidney")
    assert left.category == ("123037004", "Anatomical Structure")
    assert (left.laterality, right.laterality) == (LEFT, RIGHT)
    assert segment_code("left kidney") == segment_code("kidney-left") == left
    assert segment_code("spleen").laterality is None
    assert normalize("Adrenal_Gland RIGHT") == ("adrenal gland", RIGHT)


def test_shipped_label_names_are_all_coded(data_dir):
    names = set()
    repo = Path(__file__).resolve().parents[1]
    for f in repo.glob("data_manifests/*.json"):
        names |= set(json.loads(f.read_text()).get("labels", {}).values())
    import yaml

    for f in repo.glob("configs/*.yaml"):
        names |= set((yaml.safe_load(f.read_text()).get("labels") or {}).values())
    from medvit.data.phantom import LABELS

    names |= set(LABELS.values())
    ts = json.loads((data_dir / "totalsegmentator" / "totalsegmentator_class_map.json").read_text())["total"]
    names |= {n for n in ts.values() if "cyst" not in n}
    names.discard("background")
    assert sorted(n for n in names if not segment_code(n).known) == []


def test_unknown_names_fall_back_to_tissue_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING):
        codes = segment_codes({1: "liver", 2: "blob", 3: "left thing"})
    assert codes[2].type == codes[2].category == TISSUE and not codes[2].known
    assert codes[3].laterality == LEFT and codes[1].known
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "'blob'" in warned[0] and "'left thing'" in warned[0] and "liver" not in warned[0]


# ---------------------------------------------------------------- writing on real series


def _on_grid(path: Path, affine: np.ndarray) -> np.ndarray:
    """A NIfTI label map's voxels in the axis order and directions of ``affine``'s grid."""
    img = nib.load(path)
    arr = np.asarray(img.dataobj).astype(np.int32)
    return apply_orientation(arr, ornt_transform(io_orientation(img.affine), io_orientation(affine))).astype(np.int32)


@pytest.fixture(scope="module")
def ts_seg(data_dir, tmp_path_factory):
    """Our SEG of a few TotalSegmentator labels on example_ct_dicom (anonymised: no study or
    series UID), the label map it was written from, and what the writer returned."""
    src = data_dir / "totalsegmentator" / "example_ct_dicom"
    _, affine = source_series(src)
    labels = _on_grid(data_dir / "totalsegmentator" / "example_seg_dicom.nii.gz", affine)
    labels[~np.isin(labels, list(TS_LABELS))] = 0
    out = tmp_path_factory.mktemp("ts") / "case_seg.dcm"
    written = write_dicom_seg(labels, affine, src, out, names=TS_LABELS, algorithm=ALGORITHM)
    return out, labels, affine, written, src


@pytest.fixture(scope="module")
def liver_seg(data_dir, tmp_path_factory):
    """Our SEG of dcmqi's liver_seg.nrrd on its 3-slice CT (a series with all its UIDs)."""
    src = data_dir / "dcmqi" / "segmentations" / "ct-3slice"
    ref = read_label(data_dir / "dcmqi" / "segmentations" / "liver_seg.nrrd")
    out = tmp_path_factory.mktemp("liver") / "liver_seg.dcm"
    write_dicom_seg(ref[0].numpy().astype(np.int32), ref.affine.numpy(), src, out, names={1: "liver"},
                    algorithm=ALGORITHM)
    return out, src


def test_round_trip_renumbers_and_leaves_out_the_empty_class(ts_seg, caplog):
    path, labels, affine, written, src = ts_seg
    assert written.empty == {2: "kidney_right"}
    assert [v for v, _ in written.segments.values()] == [1, 5, 69, 70, 86, 87]
    back = read_label(path, source=src)
    lut = np.zeros(100, np.int32)
    for n, (v, _) in written.segments.items():
        lut[v] = n
    np.testing.assert_array_equal(back[0].numpy(), lut[labels])
    np.testing.assert_array_equal(back.affine.numpy(), affine)
    assert back.meta["medvit_label_names"] == {n: name for n, (_, name) in written.segments.items()}


def test_the_empty_class_is_warned_about(data_dir, tmp_path, caplog):
    src = data_dir / "dcmqi" / "segmentations" / "ct-3slice"
    labels = np.zeros((512, 512, 3), np.int32)
    labels[100:120, 200:230, 1] = 3
    with caplog.at_level(logging.WARNING):
        w = write_dicom_seg(labels, read_image(src).affine.numpy(), src, tmp_path / "x.dcm",
                            names={1: "liver", 3: "spleen"}, algorithm=ALGORITHM)
    assert w.segments == {1: (3, "spleen")} and w.empty == {1: "liver"}
    assert any("1 (liver)" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    ds = pydicom.dcmread(tmp_path / "x.dcm")
    assert int(ds.NumberOfFrames) == 1  # only the slice that holds the segment


def test_dcmqi_reads_our_seg_with_our_counts_and_geometry(ts_seg, tmp_path):
    tool = require_tool("segimage2itkimage")
    path, labels, affine, written, _ = ts_seg
    subprocess.run([tool, "--inputDICOM", str(path), "--outputDirectory", str(tmp_path)], check=True,
                   capture_output=True)
    meta = json.loads((tmp_path / "meta.json").read_text())
    said = {a["labelID"]: a["SegmentLabel"] for seg in meta["segmentAttributes"] for a in seg}
    assert said == {n: name for n, (_, name) in written.segments.items()}
    for n, (v, _) in written.segments.items():
        theirs = read_label(tmp_path / f"{n}.nrrd")  # ITK's LPS read as RAS by our reader
        assert np.abs(theirs.affine.numpy() - affine).max() < 1e-4
        mask = theirs[0].numpy() > 0
        assert int(mask.sum()) == int((labels == v).sum()) > 0
        np.testing.assert_array_equal(mask, labels == v)


def test_dciodvfy_finds_no_error_in_our_segs(ts_seg, liver_seg):
    tool = require_tool("dciodvfy")
    for path in (ts_seg[0], liver_seg[0]):
        run = subprocess.run([tool, str(path)], capture_output=True, text=True)
        lines = (run.stdout + run.stderr).splitlines()
        print(f"dciodvfy {path.name}:", *[line for line in lines if line.startswith("Warning")], sep="\n  ")
        assert not [line for line in lines if line.startswith("Error")], lines


def test_highdicom_reads_our_seg_on_the_source_study_and_slices(liver_seg):
    import highdicom as hd

    path, src = liver_seg
    seg = hd.seg.segread(path)
    s, _ = source_series(src)
    h0 = s.headers[0]
    for tag in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientName", "PatientID", "PatientBirthDate",
                "PatientSex"):
        assert seg.get(tag) == h0.get(tag), tag
    assert str(seg.PatientName) == "JANCT000"  # a value, not two blanks that agree
    assert seg.SeriesDescription == SERIES_DESCRIPTION and "research" in seg.SeriesDescription
    assert seg.SegmentationType == "BINARY" and seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    ipp = {str(h.SOPInstanceUID): np.asarray(h.ImagePositionPatient, float) for h in s.headers}
    assert int(seg.NumberOfFrames) == 3
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float)
        assert np.abs(pos - ipp[str(ref)]).max() < 1e-3
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "unetr" and "medvit" in algo.AlgorithmVersion
    assert ALGORITHM["sha256"] in algo.AlgorithmParameters


def test_anonymised_source_keeps_blank_patient_data_blank(ts_seg):
    path, *_ = ts_seg
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for tag in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "ReferringPhysicianName"):
        assert tag in ds and not str(ds.get(tag) or ""), tag  # present (type 2) and empty, not invented
    assert ds.StudyInstanceUID and ds.FrameOfReferenceUID  # derived: the series had none


def test_labelmap_type_round_trips(data_dir, tmp_path):
    src = data_dir / "dcmqi" / "segmentations" / "ct-3slice"
    ref = read_label(data_dir / "dcmqi" / "segmentations" / "liver_seg.nrrd")
    labels = ref[0].numpy().astype(np.int32)
    labels[:50, :50, :] = 4
    write_dicom_seg(labels, ref.affine.numpy(), src, tmp_path / "lm.dcm", names={1: "liver", 4: "spleen"},
                    algorithm=ALGORITHM, seg_type="labelmap")
    ds = pydicom.dcmread(tmp_path / "lm.dcm", stop_before_pixels=True)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and ds.SegmentationType == "LABELMAP"
    back = read_label(tmp_path / "lm.dcm", source=src)[0].numpy()
    np.testing.assert_array_equal(back, np.select([labels == 1, labels == 4], [1, 2], 0))


# ---------------------------------------------------------------- reading dcmqi's SEGs


def test_dcmqi_liver_seg_reads_onto_its_series(data_dir):
    d = data_dir / "dcmqi" / "segmentations"
    ours = read_label(d / "liver.dcm", source=d / "ct-3slice")
    nrrd = read_label(d / "liver_seg.nrrd")
    image = read_image(d / "ct-3slice")
    assert int((ours > 0).sum()) == 107_098
    np.testing.assert_array_equal(ours.affine.numpy(), image.affine.numpy())
    np.testing.assert_array_equal((ours[0].numpy() > 0), (nrrd[0].numpy() > 0))  # slice by slice, not just counts
    assert ours.meta["medvit_label_names"] == {1: "Liver"}


def test_overlapping_segments_take_the_highest_number(data_dir, caplog):
    import highdicom as hd

    d = data_dir / "dcmqi" / "segmentations"
    with caplog.at_level(logging.WARNING):
        ours = read_label(d / "partial_overlaps.dcm", source=d / "ct-3slice")[0].numpy()
    seg = hd.seg.segread(d / "partial_overlaps.dcm")
    s, _ = source_series(d / "ct-3slice")
    uids = [str(h.SOPInstanceUID) for h in s.headers]
    each = {n: seg.get_pixels_by_source_instance(uids, segment_numbers=[n], ignore_spatial_locations=True,
                                                 assert_missing_frames_are_empty=True)[..., 0].transpose(2, 1, 0) > 0
            for n in seg.segment_numbers}
    covered = sum(m.astype(int) for m in each.values())
    assert (covered > 1).any()
    top = np.zeros_like(ours)
    for n in sorted(each):
        top[each[n]] = n
    np.testing.assert_array_equal(ours, top)
    warned = [r.getMessage() for r in caplog.records if "more than one segment" in r.getMessage()]
    assert warned and f"{int((covered > 1).sum())} voxel" in warned[0]


def test_datalist_entries_take_a_seg_label(data_dir):
    d = data_dir / "dcmqi" / "segmentations"
    out = LoadVolumed(keys="image", label_keys="label")({"image": str(d / "ct-3slice"), "label": str(d / "liver.dcm")})
    assert out["label"].shape == out["image"].shape and int((out["label"] > 0).sum()) == 107_098


def test_a_seg_of_another_series_names_both_uids(data_dir, tmp_path):
    d = data_dir / "dcmqi" / "segmentations"
    uid = write_body_series(tmp_path / "other", n=3)
    with pytest.raises(Exception) as e:
        read_label(d / "liver.dcm", source=tmp_path / "other")
    assert type(e.value).__name__ == "InputError"
    msg = str(e.value)
    assert uid in msg and "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1" in msg and "\n" not in msg


def test_a_seg_of_another_frame_of_reference_names_both_uids(data_dir, tmp_path):
    d = data_dir / "dcmqi" / "segmentations"
    shutil.copytree(d / "ct-3slice", tmp_path / "ct")
    for f in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = "1.2.3.4.5"
        ds.save_as(f)
    with pytest.raises(Exception) as e:
        read_dicom_seg(d / "liver.dcm", tmp_path / "ct")
    assert "1.2.3.4.5" in str(e.value) and "1.2.392.200103.20080913.113635.3.2009.6.22.21.44.34.23882.1" in str(e.value)


# ---------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def labelling_ckpt(tmp_path_factory) -> Path:
    """A tiny UNETR whose output favours label 1 everywhere: a SEG with one segment, the
    checkpoint's other labels empty."""
    from medvit.checkpoint import save_checkpoint
    from medvit.config import parse_config
    from medvit.nets import build_net

    cfg = parse_config(copy.deepcopy(TINY))
    torch.manual_seed(0)
    net = build_net(cfg.model)
    last = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d) and m.out_channels == cfg.model.out_channels][-1]
    with torch.no_grad():
        last.bias[1] += 100.0
    return save_checkpoint(net, tmp_path_factory.mktemp("ck") / "tiny.safetensors", config=cfg)


def test_segment_writes_a_dicom_seg_listed_in_the_sidecar(data_dir, labelling_ckpt, tmp_path, capsys):
    src = data_dir / "dcmqi" / "segmentations" / "ct-3slice"
    code, out, err = run_cli(["segment", str(src), "-o", str(tmp_path), "--checkpoint", str(labelling_ckpt),
                              "--dicom-seg", "--no-progress"], capsys)
    assert code == 0, err
    seg = tmp_path / "ct-3slice_seg.dcm"
    side = json.loads((tmp_path / "ct-3slice_seg.json").read_text())
    assert seg.is_file() and "ct-3slice_seg.dcm" in side["outputs"] and str(seg) in out
    assert side["dicom_seg"]["segments"] == {"1": {"label": 1, "name": "liver"}}
    assert set(side["dicom_seg"]["left_out"].values()) == {"spleen", "kidney", "spine", "lung"}
    assert side["options"]["dicom_seg"] is True and side["options"]["seg_type"] == "binary"
    # evaluate the NIfTI against our SEG of it, on the source series
    code, out, err = run_cli(["evaluate", str(tmp_path / "ct-3slice_seg.nii.gz"), str(seg), "--image", str(src)], capsys)
    assert code == 0, err
    assert "liver" in out and "1.000" in out


def test_evaluate_takes_dcmqis_seg_as_reference(data_dir, tmp_path, capsys):
    d = data_dir / "dcmqi" / "segmentations"
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "background", "1": "liver"}))
    code, out, err = run_cli(["evaluate", str(d / "liver_seg.nrrd"), str(d / "liver.dcm"), "--image",
                              str(d / "ct-3slice"), "--labels", str(names), "-o", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["labels"]["liver"]["dice"] == pytest.approx(1.0)
    assert result["labels"]["liver"]["voxels_reference"] == 107_098


def test_evaluate_without_image_is_one_line(data_dir, capsys):
    d = data_dir / "dcmqi" / "segmentations"
    assert_user_error(["evaluate", str(d / "liver_seg.nrrd"), str(d / "liver.dcm")], capsys, "liver.dcm",
                      "DICOM SEG", "--image")


def test_segment_dicom_seg_refuses_a_nifti_input_before_the_net(data_dir, labelling_ckpt, tmp_path, capsys):
    ct = data_dir / "totalsegmentator" / "example_ct_sm.nii.gz"
    assert_user_error(["segment", str(ct), "-o", str(tmp_path / "o"), "--checkpoint", str(labelling_ckpt),
                       "--dicom-seg", "--no-progress"], capsys, "example_ct_sm.nii.gz", "--dicom-seg", "NIfTI",
                      out_dir=tmp_path / "o")


def test_seg_type_needs_dicom_seg(data_dir, labelling_ckpt, tmp_path, capsys):
    src = data_dir / "dcmqi" / "segmentations" / "ct-3slice"
    assert_user_error(["segment", str(src), "-o", str(tmp_path / "o"), "--checkpoint", str(labelling_ckpt),
                       "--seg-type", "labelmap"], capsys, "--seg-type", "--dicom-seg")


def test_segment_dicom_seg_refuses_a_series_with_a_gap(data_dir, labelling_ckpt, tmp_path, capsys):
    assert_user_error(["segment", str(data_dir / "monai" / "CT_DICOM"), "-o", str(tmp_path / "o"), "--checkpoint",
                       str(labelling_ckpt), "--dicom-seg", "--no-progress"], capsys, "slice gap", out_dir=tmp_path / "o")


def test_a_tilted_series_kept_on_its_slices_round_trips(tmp_path):
    from tests.helpers_dicom import write_tilted

    affine = write_tilted(tmp_path / "tilted")
    image = read_image(tmp_path / "tilted")  # tilt="keep": the slices' own sheared grid
    labels = (image[0].numpy() > 500).astype(np.int32)
    assert labels.any()
    write_dicom_seg(labels, affine, tmp_path / "tilted", tmp_path / "t.dcm", names={1: "liver"}, algorithm=ALGORITHM)
    back = read_label(tmp_path / "t.dcm", source=tmp_path / "tilted")
    np.testing.assert_array_equal(back[0].numpy(), labels)
    s, _ = source_series(tmp_path / "tilted")
    ipp = {str(h.SOPInstanceUID): np.asarray(h.ImagePositionPatient, float) for h in s.headers}
    for frame in pydicom.dcmread(tmp_path / "t.dcm").PerFrameFunctionalGroupsSequence:
        ref = str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        assert np.abs(np.asarray(frame.PlanePositionSequence[0].ImagePositionPatient, float) - ipp[ref]).max() < 1e-3


def test_segment_dicom_seg_refuses_a_tilted_series_without_tilt_keep(labelling_ckpt, tmp_path, capsys):
    from tests.helpers_dicom import write_tilted

    write_tilted(tmp_path / "tilted")
    assert_user_error(["segment", str(tmp_path / "tilted"), "-o", str(tmp_path / "o"), "--checkpoint",
                       str(labelling_ckpt), "--dicom-seg", "--no-progress"], capsys, "gantry-tilted", "--tilt keep",
                      out_dir=tmp_path / "o")


def test_evaluate_matches_a_seg_reference_by_segment_name(ts_seg, tmp_path, capsys):
    from medvit.io import write_label_map

    path, labels, affine, written, src = ts_seg
    write_label_map(labels, affine, tmp_path / "pred.nii.gz")  # the original ids 1, 5, 69, ...
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"0": "background", **{str(k): v for k, v in TS_LABELS.items()}}))
    code, out, err = run_cli(["evaluate", str(tmp_path / "pred.nii.gz"), str(path), "--image", str(src), "--labels",
                              str(names), "-o", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    scored = json.loads((tmp_path / "r.json").read_text())["labels"]
    for v, name in TS_LABELS.items():
        if v == 2:
            assert scored[name]["status"] == "absent in both"
        else:
            assert scored[name]["dice"] == pytest.approx(1.0), name


def test_writing_and_reading_a_seg_says_nothing_of_the_patient(data_dir, tmp_path, capsys, caplog, recwarn):
    d = data_dir / "dcmqi" / "segmentations"
    shutil.copytree(d / "ct-3slice", tmp_path / "ct")
    for f in (tmp_path / "ct").iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "CANARYNAME", "CANARYID", "19010101"
        ds.ReferringPhysicianName, ds.AccessionNumber = "CANARYDOC", "CANARYACC"
        ds.save_as(f)
    ref = read_label(d / "liver_seg.nrrd")
    with caplog.at_level(logging.DEBUG):
        write_dicom_seg(ref[0].numpy().astype(np.int32), ref.affine.numpy(), tmp_path / "ct", tmp_path / "s.dcm",
                        names={1: "liver", 2: "blob"}, algorithm=ALGORITHM)
        read_label(tmp_path / "s.dcm", source=tmp_path / "ct")
    out, err = capsys.readouterr()
    said = out + err + caplog.text + "\n".join(str(w.message) for w in recwarn)
    assert "CANARY" not in said and "19010101" not in said
    assert str(pydicom.dcmread(tmp_path / "s.dcm").PatientName) == "CANARYNAME"  # the SEG itself carries it


def test_segments_carry_the_preview_colours(data_dir, tmp_path):
    from pipelines.volume.report import label_color

    src = data_dir / "dcmqi" / "segmentations" / "ct-3slice"
    ref = read_label(data_dir / "dcmqi" / "segmentations" / "liver_seg.nrrd")
    labels = ref[0].numpy().astype(np.int32) * 6
    write_dicom_seg(labels, ref.affine.numpy(), src, tmp_path / "c.dcm", names={6: "liver"}, algorithm=ALGORITHM,
                    colors={6: label_color(6)})
    import highdicom as hd

    lab = pydicom.dcmread(tmp_path / "c.dcm").SegmentSequence[0].RecommendedDisplayCIELabValue
    rgb = hd.color.CIELabColor.from_dicom_value(lab).to_rgb()
    assert np.abs(np.asarray(rgb, float) - np.asarray(label_color(6), float)).max() <= 2


def test_training_renumbers_seg_segments_to_the_config_ids_by_name(ts_seg):
    from medvit.io.loader import LoadVolumed
    from medvit.transforms.checks import CheckCased

    path, labels, _, written, src = ts_seg
    names = {0: "background", **TS_LABELS}
    case = LoadVolumed(keys="image", label_keys="label")({"image": str(src), "label": str(path)})
    checked = CheckCased("image", "label", in_channels=1, n_classes=max(names) + 1, label_ids=set(names),
                         label_names=names)(case)
    np.testing.assert_array_equal(checked["label"][0].numpy(), labels)  # ids 1, 5, 69, ... again, not 1..6


def test_training_refuses_a_seg_segment_the_config_does_not_name(ts_seg):
    from medvit.core.errors import InputError
    from medvit.io.loader import LoadVolumed
    from medvit.transforms.checks import CheckCased

    path, _, _, _, src = ts_seg
    names = {0: "background", 1: "spleen", 5: "liver"}
    case = LoadVolumed(keys="image", label_keys="label")({"image": str(src), "label": str(path)})
    with pytest.raises(InputError) as e:
        CheckCased("image", "label", in_channels=1, n_classes=6, label_ids=set(names), label_names=names)(case)
    assert "'humerus_left'" in str(e.value) and "case_seg.dcm" in str(e.value) and "'liver'" in str(e.value)


def test_a_nifti_given_as_the_seg_source_is_one_line(data_dir):
    from medvit.core.errors import InputError

    d = data_dir / "dcmqi" / "segmentations"
    with pytest.raises(InputError) as e:
        read_label(d / "liver.dcm", source=d / "liver_seg.nrrd")
    assert "liver_seg.nrrd" in str(e.value) and "not a DICOM series" in str(e.value)
