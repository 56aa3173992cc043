"""Label statistics and previews: exact counts and means, files, orientation and overlay colours."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

import pipelines.volume.report as report
from pipelines.volume.report import HU_WINDOW, label_color, label_stats, write_preview, write_stats

DATA = Path(os.environ.get("MEDVIT_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
TS = DATA / "totalsegmentator"


def _ts(name: str) -> nib.Nifti1Image:
    path = TS / name
    if not path.is_file():
        pytest.skip(f"{path} not found (set MEDVIT_TEST_DATA)")
    return nib.load(str(path))


def test_label_stats_counts_volumes_means():
    lab = np.zeros((6, 5, 4), np.int16)
    lab[0:2, 0:2, 0:2] = 1  # 8 voxels
    lab[3:6, 1:4, 1:3] = 4  # 18 voxels
    img = np.arange(lab.size, dtype=np.float32).reshape(lab.shape)
    # a sheared, scaled affine: the voxel volume is |det| of its 3x3 part, not a product of diagonals
    aff = np.array([[2.0, 0.5, 0, 10], [0, 1.5, 0, -4], [0, 0, -3.0, 7], [0, 0, 0, 1]])
    vv = abs(np.linalg.det(aff[:3, :3]))
    assert vv == pytest.approx(9.0)
    rows = label_stats(lab, img, aff, names={0: "background", 1: "liver", 2: "spleen"})
    assert [r["id"] for r in rows] == [1, 2, 4]
    liver, spleen, four = rows
    assert liver == {"id": 1, "name": "liver", "voxels": 8, "volume_mm3": pytest.approx(8 * vv),
                     "mean_intensity": pytest.approx(float(img[lab == 1].mean()))}
    assert spleen == {"id": 2, "name": "spleen", "voxels": 0, "volume_mm3": 0.0, "mean_intensity": None}
    assert four["name"] is None and four["voxels"] == 18
    assert four["mean_intensity"] == pytest.approx(float(img[lab == 4].mean()))
    assert all(r["mean_intensity"] is None for r in label_stats(lab, None, aff))


def test_label_stats_slabs_agree(monkeypatch):
    """Summing over many small slabs gives the same as one pass."""
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 7, (16, 12, 9)).astype(np.int32)
    img = rng.normal(40, 100, lab.shape).astype(np.float32)
    whole = label_stats(lab, img, np.eye(4))
    monkeypatch.setattr(report, "_SLAB_VOXELS", 16 * 12 * 2)  # two slices per pass
    sliced = label_stats(lab, img, np.eye(4))
    assert [r["voxels"] for r in sliced] == [r["voxels"] for r in whole] == [int((lab == i).sum()) for i in range(1, 7)]
    for a, b in zip(sliced, whole):
        assert a["mean_intensity"] == pytest.approx(b["mean_intensity"], rel=1e-12)


def test_label_stats_real_totalsegmentator():
    seg, ct = _ts("example_seg.nii.gz"), _ts("example_ct_sm.nii.gz")
    lab = np.asanyarray(seg.dataobj)
    img = np.asanyarray(ct.dataobj).astype(np.float64)
    rows = label_stats(lab, img, seg.affine)
    ids, counts = np.unique(lab, return_counts=True)
    assert [r["id"] for r in rows] == ids[1:].tolist()  # 41 labels, background left out
    for r, c in zip(rows, counts[1:]):
        assert r["voxels"] == c
        assert r["volume_mm3"] == pytest.approx(27.0 * c)  # 3 mm voxels
        assert r["mean_intensity"] == pytest.approx(float(img[lab == r["id"]].mean()), rel=1e-9, abs=1e-9)
    lobe = next(r for r in rows if r["id"] == 13)
    assert lobe["voxels"] == 1 and lobe["mean_intensity"] == pytest.approx(float(img[lab == 13][0]))
    liver = next(r for r in rows if r["id"] == 5)
    assert 20 < liver["mean_intensity"] < 120  # soft tissue in HU


def test_write_stats(tmp_path):
    rows = [{"id": 1, "name": "liver", "voxels": 3, "volume_mm3": 81.0, "mean_intensity": 52.5},
            {"id": 7, "name": None, "voxels": 0, "volume_mm3": 0.0, "mean_intensity": None}]
    c, j = write_stats(rows, tmp_path / "s.csv", tmp_path / "s.json")
    with open(c, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == ["id", "name", "voxels", "volume_mm3", "mean_intensity"]
    assert read[0] == {"id": "1", "name": "liver", "voxels": "3", "volume_mm3": "81.0", "mean_intensity": "52.5"}
    assert read[1]["name"] == "" and read[1]["mean_intensity"] == ""
    assert json.loads(j.read_text()) == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.json"]


def _phantom():
    """CT-like volume (air, a 40 HU body) with one label cube at the patient's right, anterior, superior."""
    shape = (40, 30, 12)
    img = np.full(shape, -1000.0, np.float32)
    img[4:36, 3:27, :] = 40.0
    lab = np.zeros(shape, np.uint8)
    lab[26:34, 18:26, 7:11] = 3  # high x (R), high y (A), high z (S)
    aff = np.diag([1.0, 1.0, 4.0, 1.0])
    aff[:3, 3] = [-20.0, -15.0, -24.0]
    return img, lab, aff


def _coloured(rgb: np.ndarray) -> np.ndarray:
    return (rgb.max(axis=-1).astype(int) - rgb.min(axis=-1)) > 30


def test_preview_geometry_orientation_colours(tmp_path):
    img, lab, aff = _phantom()
    boxes = write_preview(img, lab, aff, tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        rgb = np.asarray(im)
    # physical aspect per panel (1 x 1 x 4 mm voxels): axial 40x30 mm, coronal 40x48 mm, sagittal 30x48 mm
    ratios = {"axial": 40 / 30, "coronal": 40 / 48, "sagittal": 30 / 48}
    for name, (left, top, w, h) in boxes.items():
        assert w / h == pytest.approx(ratios[name], rel=0.02), name
    assert max(max(b[2], b[3]) for b in boxes.values()) == 256  # small volumes are enlarged to be legible
    widths = sum(b[2] for b in boxes.values())
    assert rgb.shape[1] == widths + 2 * report._GAP
    panels_h = max(b[3] for b in boxes.values())
    assert rgb.shape[0] > panels_h  # the legend below
    assert rgb.shape[1] / panels_h == pytest.approx((40 + 40 + 30) / 48, rel=0.05)

    colour = np.asarray(label_color(3), float)
    body = np.asarray([128.0] * 3)  # 40 HU in [-160, 240]
    expected = (1 - report.OVERLAY_ALPHA) * body + report.OVERLAY_ALPHA * colour
    for name, (left, top, w, h) in boxes.items():
        panel = rgb[top : top + h, left : left + w]
        mask = _coloured(panel)
        assert mask.any(), name
        ys, xs = np.nonzero(mask)
        # radiological: the cube (R, A, S) shows left of centre and in the upper half of every view
        assert xs.mean() < w / 2 and ys.mean() < h / 2, name
        cy, cx = int(ys.mean()), int(xs.mean())
        np.testing.assert_allclose(panel[cy, cx], expected, atol=2)
    # away from the labels the body is plain grey at the soft-tissue window
    left, top, w, h = boxes["axial"]
    np.testing.assert_allclose(rgb[top + h // 2, left + int(w * 0.7)], body, atol=1)


def _white(rgb: np.ndarray) -> np.ndarray:
    return rgb.min(axis=-1) >= 200  # anti-aliased letters: near white


def test_preview_legend_and_orientation_letters(tmp_path):
    img, lab, aff = _phantom()
    lab[4:10, 3:9, 7:11] = 5  # a second label, in the slices shown
    boxes = write_preview(img, lab, aff, tmp_path / "p.png", names={3: "spleen", 5: "liver", 7: "absent"})
    rgb = np.asarray(Image.open(tmp_path / "p.png"))
    panels_h = max(b[3] for b in boxes.values())
    legend = rgb[panels_h:]
    # one swatch in each label's exact colour; text in white beside it; nothing for labels not shown
    for lid in (3, 5):
        ys, xs = np.nonzero(np.all(legend == label_color(lid), axis=-1))
        assert ys.size >= 100, lid
        beside = legend[ys.min() : ys.max() + 1, xs.max() + 1 : xs.max() + 80]
        assert _white(beside).sum() > 20, lid
    assert not np.all(legend == label_color(7), axis=-1).any()
    # no label, no legend
    plain = write_preview(img, np.zeros_like(lab), aff, tmp_path / "q.png")
    assert np.asarray(Image.open(tmp_path / "q.png")).shape[0] == max(b[3] for b in plain.values())

    # letters at the edges: the axial and coronal views both have R on the left and L on the right,
    # the sagittal A and P; axial's top (A) differs from coronal's (S)
    def edge(name: str, where: str) -> np.ndarray:
        left, top, w, h = boxes[name]
        y, x = {"left": (top + h // 2, left + 10), "right": (top + h // 2, left + w - 10), "top": (top + 9, left + w // 2)}[where]
        return _white(rgb[y - 9 : y + 9, x - 10 : x + 10])

    for where in ("left", "right", "top"):
        assert all(edge(n, where).sum() > 5 for n in boxes), where
    np.testing.assert_array_equal(edge("axial", "left"), edge("coronal", "left"))
    np.testing.assert_array_equal(edge("axial", "right"), edge("coronal", "right"))
    assert not np.array_equal(edge("axial", "left"), edge("axial", "right"))
    assert not np.array_equal(edge("axial", "left"), edge("sagittal", "left"))
    assert not np.array_equal(edge("axial", "top"), edge("coronal", "top"))


def test_preview_same_picture_from_another_orientation(tmp_path):
    """The same volume stored LPS (x and y flipped, affine to match) gives the same PNG pixels."""
    img, lab, aff = _phantom()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = img.shape[0] - 1, img.shape[1] - 1  # voxel i -> n-1-i
    aff_lps = aff @ flip
    write_preview(img, lab, aff, tmp_path / "ras.png")
    write_preview(img[::-1, ::-1], lab[::-1, ::-1], aff_lps, tmp_path / "lps.png")
    a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("ras.png", "lps.png"))
    np.testing.assert_array_equal(a, b)


def test_preview_without_labels_and_non_hu_window(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.uniform(100, 200, (20, 20, 20)).astype(np.float32)  # MR-like: positive, no air
    boxes = write_preview(img, np.zeros(img.shape, np.int32), np.eye(4), tmp_path / "p.png")
    rgb = np.asarray(Image.open(tmp_path / "p.png"))
    assert not _coloured(rgb).any()
    left, top, w, h = boxes["axial"]
    grey = rgb[top : top + h, left : left + w, 0]
    # 1st-99th percentile window spreads the values over the full grey range
    assert grey.min() < 20 and grey.max() > 235
    with pytest.raises(ValueError, match="window must rise"):
        write_preview(img, np.zeros(img.shape, np.int32), np.eye(4), tmp_path / "q.png", window=(5.0, 5.0))


def test_preview_real_ct(tmp_path):
    seg, ct = _ts("example_seg.nii.gz"), _ts("example_ct_sm.nii.gz")
    lab = np.asanyarray(seg.dataobj)
    img = np.asanyarray(ct.dataobj).astype(np.float32)
    boxes = write_preview(img, lab, seg.affine, tmp_path / "ct.png", window=HU_WINDOW)
    rgb = np.asarray(Image.open(tmp_path / "ct.png"))
    # 122 x 101 x 30 voxels of 3 mm: axial 366 x 303 mm, coronal 366 x 90, sagittal 303 x 90
    assert boxes["axial"][2] / boxes["axial"][3] == pytest.approx(122 / 101, rel=0.02)
    assert boxes["coronal"][2] / boxes["coronal"][3] == pytest.approx(122 / 30, rel=0.03)
    assert boxes["sagittal"][2] / boxes["sagittal"][3] == pytest.approx(101 / 30, rel=0.03)
    left, top, w, h = boxes["axial"]
    panel = rgb[top : top + h, left : left + w]
    assert _coloured(panel).mean() > 0.2  # the abdomen's organs cover much of the slice
    # the liver (label 5, patient right) lies on the viewer's left of the axial view
    liver = np.all(np.abs(panel.astype(float) - _on_soft_tissue(5)) < 40, axis=-1)
    assert liver.any() and np.nonzero(liver)[1].mean() < w / 2


def _on_soft_tissue(label_id: int) -> np.ndarray:
    """The overlay colour of a label on mid-grey soft tissue."""
    return (1 - report.OVERLAY_ALPHA) * 128.0 + report.OVERLAY_ALPHA * np.asarray(label_color(label_id), float)
