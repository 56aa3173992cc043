"""Evaluation metrics: hand-computable cases, statuses, grid checks and the TotalSegmentator pair."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medvit.core.errors import InputError
from pipelines.volume.evaluate import (
    STATUS_ABSENT,
    STATUS_MISSING_PRED,
    STATUS_MISSING_REF,
    STATUS_OK,
    evaluate_files,
    evaluate_labels,
    format_table,
    read_label_names,
    write_json,
)

DATA = Path(os.environ.get("MEDVIT_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TS = DATA / "totalsegmentator"
SPACING = (0.8, 1.5, 2.5)


def _cube(shape=(30, 30, 30), start=(5, 6, 7), size=10, shift=(0, 0, 0), value=1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    lo = [s + d for s, d in zip(start, shift)]
    a[lo[0] : lo[0] + size, lo[1] : lo[1] + size, lo[2] : lo[2] + size] = value
    return a


def _write(a: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(a, affine), str(path))
    return path


def test_identical_maps_are_perfect():
    a = _cube() + _cube(start=(18, 18, 18), size=6, value=2)
    r = evaluate_labels(a, a.copy(), SPACING)
    assert set(r["labels"]) == {"1", "2"}
    for row in r["labels"].values():
        assert row["status"] == STATUS_OK
        assert row["dice"] == pytest.approx(1.0)
        assert row["hd95_mm"] == pytest.approx(0.0)
        assert row["surface_dice"] == pytest.approx(1.0)
    assert r["mean_dice"] == pytest.approx(1.0)


@pytest.mark.parametrize("big", [np.int32(2_000_000_000), np.uint32(4_000_000_000)])
def test_label_ids_in_the_billions_are_scored(big):
    """find_objects keeps a slot per id up to the largest: ids near 2**32 ran out of memory."""
    a = (_cube() * big).astype(type(big)) + _cube(start=(18, 18, 18), size=6, value=2).astype(type(big))
    r = evaluate_labels(a, a.copy(), SPACING)
    assert set(r["labels"]) == {str(int(big)), "2"} and r["mean_dice"] == pytest.approx(1.0)
    full = np.full((6, 6, 6), big)  # no background voxel at all
    assert evaluate_labels(full, full.copy(), SPACING)["labels"][str(int(big))]["dice"] == pytest.approx(1.0)


@pytest.mark.parametrize("axis,k", [(0, 2), (1, 1), (2, 3)])
def test_shifted_cubes(axis, k):
    """A 10-voxel cube shifted by k voxels along one axis: Dice (10-k)/10, HD95 = k x spacing (mm)."""
    shift = [0, 0, 0]
    shift[axis] = k
    gt, pred = _cube(), _cube(shift=tuple(shift))
    shift_mm = k * SPACING[axis]
    r = evaluate_labels(pred, gt, SPACING, labels={1: "cube"}, tolerance_mm=1.0)
    row = r["labels"]["cube"]
    assert row["id"] == 1 and row["status"] == STATUS_OK
    assert row["voxels_prediction"] == row["voxels_reference"] == 1000
    assert row["dice"] == pytest.approx((10 - k) / 10, abs=1e-6)
    assert row["hd95_mm"] == pytest.approx(shift_mm, abs=1e-5)
    # every surface voxel lies within the shift of the other surface, and some lie exactly at it
    assert evaluate_labels(pred, gt, SPACING, tolerance_mm=shift_mm)["labels"]["1"]["surface_dice"] == pytest.approx(1.0)
    below = evaluate_labels(pred, gt, SPACING, tolerance_mm=shift_mm * 0.99)["labels"]["1"]["surface_dice"]
    assert 0.0 < below < 1.0


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy")
def test_cropping_matches_monai_on_the_full_volume():
    """Per-label boxes give exactly what MONAI returns on the whole one-hot volume."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
    from monai.networks.utils import one_hot

    rng = np.random.default_rng(0)
    gt = np.zeros((28, 24, 20), np.int64)
    gt[2:12, 3:15, 0:9] = 1  # touches the volume's edge
    gt[14:26, 10:22, 6:18] = 2
    gt[5:9, 16:20, 12:16] = 3
    pred = gt.copy()
    noise = rng.random(gt.shape) < 0.08
    pred[noise] = rng.integers(0, 4, noise.sum())
    r = evaluate_labels(pred, gt, SPACING, tolerance_mm=2.0)

    yp = one_hot(torch.from_numpy(pred)[None, None], 4)
    yg = one_hot(torch.from_numpy(gt)[None, None], 4)
    dice = compute_dice(yp, yg, include_background=False)[0]
    hd = compute_hausdorff_distance(yp, yg, percentile=95, spacing=SPACING)[0]
    sd = compute_surface_dice(yp, yg, [2.0, 2.0, 2.0], spacing=SPACING)[0]
    for c in (1, 2, 3):
        row = r["labels"][str(c)]
        assert row["dice"] == pytest.approx(float(dice[c - 1]), abs=1e-6)
        assert row["hd95_mm"] == pytest.approx(float(hd[c - 1]), abs=1e-5)
        assert row["surface_dice"] == pytest.approx(float(sd[c - 1]), abs=1e-6)


@pytest.mark.parametrize("flat", [0, 1, 2])
def test_a_map_one_voxel_thick_is_scored_in_its_plane(flat):
    """A 2D file (or one slice) scored as a 3D slab made every voxel surface: a 16 mm square
    against an 8 mm one in it gave surface Dice 0.61 and HD95 2.24 mm; MONAI in 2D: 0 and 2.83."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    g = np.zeros((20, 20), np.int64)
    g[2:18, 2:18] = 1
    p = np.zeros_like(g)
    p[6:14, 6:14] = 1
    plane = [s for i, s in enumerate((0.5, 0.7, 0.9)) if i != flat]
    r = evaluate_labels(np.expand_dims(p, flat), np.expand_dims(g, flat), (0.5, 0.7, 0.9), tolerance_mm=1.0)["labels"]["1"]
    t = lambda a: torch.from_numpy(a == 1)[None, None].float()  # noqa: E731
    assert r["hd95_mm"] == pytest.approx(float(compute_hausdorff_distance(t(p), t(g), percentile=95, spacing=plane)), abs=1e-5)
    assert r["surface_dice"] == pytest.approx(float(compute_surface_dice(t(p), t(g), [1.0], spacing=plane)), abs=1e-6)
    assert r["surface_dice"] == 0.0 and r["dice"] == pytest.approx(2 * 64 / (64 + 256))


def test_statuses_and_mean_over_reference_labels():
    gt = _cube() + _cube(start=(18, 18, 18), size=6, value=2)
    pred = _cube(shift=(0, 0, 1)) + _cube(start=(20, 2, 2), size=4, value=3)  # no 2, an extra 3
    names = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 5: "pancreas"}
    r = evaluate_labels(pred, gt, SPACING, labels=names)
    rows = r["labels"]
    assert list(rows) == ["liver", "spleen", "kidney", "pancreas"]  # by id, background left out
    assert rows["liver"]["status"] == STATUS_OK and rows["liver"]["dice"] == pytest.approx(0.9)
    sp = rows["spleen"]
    assert (sp["status"], sp["dice"], sp["surface_dice"], sp["hd95_mm"]) == (STATUS_MISSING_PRED, 0.0, 0.0, None)
    assert sp["voxels_reference"] == 216 and sp["voxels_prediction"] == 0
    kd = rows["kidney"]
    assert (kd["status"], kd["dice"], kd["surface_dice"], kd["hd95_mm"]) == (STATUS_MISSING_REF, 0.0, 0.0, None)
    pa = rows["pancreas"]
    assert pa["status"] == STATUS_ABSENT
    assert pa["dice"] is None and pa["hd95_mm"] is None and pa["surface_dice"] is None
    # mean over labels in the reference (liver 0.9, spleen 0): not kidney, not pancreas
    assert r["n_reference_labels"] == 2
    assert r["mean_dice"] == pytest.approx(0.45)
    json.dumps(r, allow_nan=False)  # no NaN anywhere


def test_evaluate_labels_refuses_bad_arrays():
    a = _cube()
    with pytest.raises(ValueError, match="shape"):
        evaluate_labels(a, a[:-1], SPACING)
    with pytest.raises(ValueError, match="non-integer"):
        evaluate_labels(a + 0.5, a, SPACING)
    with pytest.raises(ValueError, match="spacing"):
        evaluate_labels(a, a, (1.0, 0.0, 1.0))


def test_evaluate_files_and_json(tmp_path):
    aff = np.diag([*SPACING, 1.0])
    aff[:3, 3] = [-10.0, 20.0, 5.0]
    gt = _write(_cube(), aff, tmp_path / "gt.nii.gz")
    pred = _write(_cube(shift=(0, 0, 3)), aff, tmp_path / "pred.nii.gz")
    r = evaluate_files(pred, gt, labels={1: "cube"})
    assert r["prediction"] == str(pred) and r["reference"] == str(gt)
    assert r["spacing"] == pytest.approx(list(SPACING))
    assert r["labels"]["cube"]["hd95_mm"] == pytest.approx(7.5, abs=1e-5)

    (tmp_path / "out").mkdir()
    out = write_json(r, tmp_path / "out" / "eval.json")
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    assert sorted(p.name for p in out.parent.iterdir()) == ["eval.json"]  # no temporary left behind


def test_grid_mismatch_names_the_prediction(tmp_path):
    aff = np.diag([*SPACING, 1.0])
    gt = _write(_cube(), aff, tmp_path / "gt.nii.gz")
    short = _write(_cube()[:, :, :28], aff, tmp_path / "short.nii.gz")
    with pytest.raises(InputError, match=r"short\.nii\.gz.*shape 30x30x28 vs 30x30x30"):
        evaluate_files(short, gt)

    moved = aff.copy()
    moved[0, 3] += 0.5
    off = _write(_cube(), moved, tmp_path / "off.nii.gz")
    with pytest.raises(InputError, match=r"off\.nii\.gz.*affine differs by up to 0\.5 mm"):
        evaluate_files(off, gt)

    nudged = aff.copy()
    nudged[:3, 3] += 2e-4  # within 1e-3 mm: the same grid
    ok = _write(_cube(), nudged, tmp_path / "ok.nii.gz")
    assert evaluate_files(ok, gt)["labels"]["1"]["dice"] == pytest.approx(1.0)


def test_format_table():
    gt = _cube()
    r = evaluate_labels(_cube(shift=(1, 0, 0)), gt, SPACING, labels={1: "liver", 4: "gallbladder"})
    lines = format_table(r).splitlines()
    head = lines[0].split()
    assert head[:4] == ["id", "name", "Dice", "HD95"] and head[-1] == "status"
    liver = lines[2].split()
    assert liver[:5] == ["1", "liver", "0.900", "0.80", liver[4]] and liver[-1] == "ok"
    gb = lines[3].split()
    assert gb[:5] == ["4", "gallbladder", "-", "-", "-"] and " ".join(gb[5:]) == STATUS_ABSENT
    assert lines[-1] == "mean Dice over 1 reference labels: 0.900"


def test_read_label_names(tmp_path):
    p = tmp_path / "names.json"
    p.write_text(json.dumps({"0": "background", "1": "liver"}))
    assert read_label_names(p) == {0: "background", 1: "liver"}
    p.write_text(json.dumps({"config": {"labels": {"1": "spleen"}, "model": {}}, "version": "0.1"}))
    assert read_label_names(p) == {1: "spleen"}
    p.write_text(json.dumps({"labels": {"2": "kidney"}}))
    assert read_label_names(p) == {2: "kidney"}
    for twice in ('{"1": "spleen", "01": "liver"}', '{"-1": "spleen"}'):  # one id named twice; a negative id
        p.write_text(twice)
        with pytest.raises(InputError, match="distinct ids of at least 0"):
            read_label_names(p)
    p.write_text(json.dumps({"total": {"1": "spleen"}, "other": {"1": "x"}}))  # TotalSegmentator's class map
    with pytest.raises(InputError, match=r"names.json: holds several label maps \(total, other\); save the one"):
        read_label_names(p)
    p.write_text(json.dumps({"total": "spleen"}))
    with pytest.raises(InputError, match="names.json: expected a JSON object of label id"):
        read_label_names(p)
    p.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_label_names(p)
    with pytest.raises(InputError, match="no such file"):
        read_label_names(tmp_path / "missing.json")


@pytest.fixture(scope="module")
def ts_pair() -> tuple[Path, Path]:
    pred, ref = TS / "example_seg_fast.nii.gz", TS / "example_seg.nii.gz"
    if not (pred.is_file() and ref.is_file()):
        pytest.skip(f"TotalSegmentator examples not found under {TS} (set MEDVIT_TEST_DATA)")
    return pred, ref


def test_totalsegmentator_fast_against_full(ts_pair):
    pred, ref = ts_pair
    names = {int(k): v for k, v in json.loads((TS / "totalsegmentator_class_map.json").read_text())["total"].items()}
    r = evaluate_files(pred, ref, labels={k: names[k] for k in (1, 5, 13)})
    assert r["spacing"] == pytest.approx([3.0, 3.0, 3.0])
    assert r["n_reference_labels"] == 41
    # measured 0.902: two runs of the same model family at 3 mm agree closely but not exactly
    assert 0.88 <= r["mean_dice"] <= 0.92
    liver = r["labels"]["liver"]
    assert liver["status"] == STATUS_OK and liver["dice"] > 0.97
    assert liver["voxels_reference"] == 38634 and liver["voxels_prediction"] == 39350
    assert liver["hd95_mm"] == pytest.approx(3.0, abs=1e-4)  # one voxel
    # label 13 (lung_middle_lobe_right): a single voxel in the reference, none in the fast run
    lobe = r["labels"]["lung_middle_lobe_right"]
    assert lobe["voxels_reference"] == 1 and lobe["voxels_prediction"] == 0
    assert (lobe["status"], lobe["dice"], lobe["hd95_mm"], lobe["surface_dice"]) == (STATUS_MISSING_PRED, 0.0, None, 0.0)
    assert "lung_middle_lobe_right" in format_table(r)

    swapped = evaluate_files(ref, pred)
    assert swapped["labels"]["13"]["status"] == STATUS_MISSING_REF
    assert swapped["n_reference_labels"] == 40
    assert swapped["labels"]["1"]["dice"] == pytest.approx(r["labels"]["spleen"]["dice"], abs=1e-6)


def test_a_reference_stored_flipped_or_transposed_is_the_same_grid(tmp_path):
    """The same voxels written in another axis order or direction (the TotalSegmentator DICOM
    reference is stored flipped along j) are reoriented, not refused; a real offset still is."""
    aff = np.diag([*SPACING, 1.0])
    pred_arr = _cube(shift=(3, -2, 1))
    pred = _write(pred_arr, aff, tmp_path / "pred.nii.gz")
    gt_arr = _cube()
    flip_j = aff.copy()
    flip_j[:3, 1] *= -1
    flip_j[1, 3] = (gt_arr.shape[1] - 1) * SPACING[1]  # voxel j of the flipped file is voxel n-1-j
    flipped = _write(np.ascontiguousarray(gt_arr[:, ::-1]), flip_j, tmp_path / "flipped.nii.gz")
    transposed = _write(np.ascontiguousarray(gt_arr.transpose(2, 1, 0)), aff[:, [2, 1, 0, 3]],
                        tmp_path / "transposed.nii.gz")
    plain = _write(gt_arr, aff, tmp_path / "gt.nii.gz")
    want = evaluate_files(pred, plain)["labels"]["1"]
    assert want["dice"] < 1
    for ref in (flipped, transposed):
        got = evaluate_files(pred, ref)["labels"]["1"]
        assert got["dice"] == pytest.approx(want["dice"]) and got["hd95_mm"] == pytest.approx(want["hd95_mm"])
    flip_j[1, 3] += 0.5
    off = _write(np.ascontiguousarray(gt_arr[:, ::-1]), flip_j, tmp_path / "off.nii.gz")
    with pytest.raises(InputError, match=r"pred\.nii\.gz.*affine differs"):
        evaluate_files(pred, off)
