"""Gantry-tilted DICOM series: detected with their angle, kept, resampled or refused; and every
NIfTI we write has its qform agreeing with its sform or no qform."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medvit.checkpoint import LoadedModel
from medvit.config import parse_config
from medvit.core.errors import InputError
from medvit.io import read_image, read_label, write_image, write_label_map
from medvit.io.common import corner_offset_mm, itk_affine
from medvit.io.dicom import orthogonal_grid, tilt_degrees
from pipelines.volume.report import label_stats
from pipelines.volume.segment import segment_case
from tests.helpers import assert_user_error, run_cli
from tests.helpers_dicom import BLOCK_LPS, COLS, N, PIX, ROWS, STEP, TILT, write_slice, write_tilted

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture
def tilted(tmp_path):
    folder = tmp_path / "tilted"
    return folder, write_tilted(folder)


def world_ras(affine, idx) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.float64).reshape(-1, 3)
    return (affine[:3, :3] @ idx.T).T + affine[:3, 3]


def test_reader_keeps_the_sheared_grid_by_default_and_names_the_angle(tilted, caplog):
    folder, affine = tilted
    with caplog.at_level(logging.WARNING):
        img = read_image(folder)
    np.testing.assert_allclose(img.affine.numpy(), affine, atol=1e-6)
    assert tilt_degrees(img.affine.numpy()) == pytest.approx(TILT, abs=1e-6)
    assert img.shape == (1, COLS, ROWS, N)
    assert "gantry-tilted" in caplog.text and "14.0°" in caplog.text and "kept on its sheared grid" in caplog.text
    lab = read_label(folder)  # labels are never interpolated: the sheared grid too
    np.testing.assert_allclose(lab.affine.numpy(), affine, atol=1e-6)


def test_reader_refuses_when_asked(tilted):
    folder, _ = tilted
    with pytest.raises(InputError, match=r"gantry-tilted: its slices step 14\.0° off their normal") as e:
        read_image(folder, tilt="error")
    assert str(folder) in str(e.value)


def test_untilted_series_is_orthonormal_and_quiet(tmp_path, caplog):
    write_tilted(tmp_path / "straight", tilt_deg=0.0)
    with caplog.at_level(logging.WARNING):
        img = read_image(tmp_path / "straight", tilt="error")
    assert tilt_degrees(img.affine.numpy()) == 0.0 and "tilted" not in caplog.text
    # an oblique series whose positions drift by float noise only: orthonormal too, not "tilted"
    c, s = np.cos(0.3), np.sin(0.3)
    row, col = np.array([c, s, 0.0]), np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, col)
    (tmp_path / "oblique").mkdir()
    for k in range(5):
        ipp = np.array([3.3, -7.1, 12.9]) + k * 2.5 * normal + [0, 0, 1e-4 * (k % 2)]
        write_slice(tmp_path / "oblique" / f"{k}.dcm", series_uid="1.2.3.9", ipp=ipp, instance=k + 1,
                    pixels=np.zeros((3, 4), np.int16), iop=(*row, *col))
    a = read_image(tmp_path / "oblique", tilt="error").affine.numpy()[:3, :3]
    assert tilt_degrees(a) < 1e-9
    np.testing.assert_allclose(a.T @ a, np.diag(np.diag(a.T @ a)), atol=1e-12)


def test_resample_covers_the_series_on_an_orthogonal_grid_and_keeps_anatomy(tilted, caplog):
    folder, sheared = tilted
    kept = read_image(folder)
    with caplog.at_level(logging.WARNING):
        img = read_image(folder, tilt="resample")
    assert "resampled (linear)" in caplog.text and "14.0°" in caplog.text and "not on the slices' own" in caplog.text
    a = img.affine.numpy()
    m = a[:3, :3]
    np.testing.assert_allclose(m.T @ m, np.diag([PIX**2, PIX**2, (STEP * np.cos(np.radians(TILT))) ** 2]), atol=1e-9)
    # every voxel centre of the series lies inside the new grid
    x, y, z = img.shape[1:]
    assert z == N and y == ROWS + int(np.ceil((N - 1) * STEP * np.sin(np.radians(TILT)) / PIX - 1e-6)) and x == COLS
    corners = np.array(np.meshgrid([0, COLS - 1], [0, ROWS - 1], [0, N - 1], indexing="ij")).reshape(3, -1).T
    idx = world_ras(np.linalg.inv(a), world_ras(sheared, corners))
    assert idx.min() > -1e-6 and (idx.max(axis=0) < np.array(img.shape[1:]) - 1 + 1e-6).all()
    # a world point keeps its value: the bright block is bright where the world says it is
    vals = img[0].numpy()
    centres = world_ras(a, np.indices(img.shape[1:]).reshape(3, -1).T)
    lps = (LPS_TO_RAS[:3, :3] @ centres.T).T
    deep = np.all((lps >= BLOCK_LPS[0] + 2.0) & (lps <= BLOCK_LPS[1] - 2.0), axis=1)
    far = np.any((lps < BLOCK_LPS[0] - 4.0) | (lps > BLOCK_LPS[1] + 4.0), axis=1)
    inside_series = np.all((world_ras(np.linalg.inv(sheared), centres) >= 0)
                           & (world_ras(np.linalg.inv(sheared), centres) <= np.array([COLS, ROWS, N]) - 1), axis=1)
    assert deep.sum() > 10
    assert (vals.reshape(-1)[deep] == pytest.approx(1000.0))
    assert np.all(vals.reshape(-1)[far & inside_series] == 0.0)
    assert vals.min() == 0.0  # outside the slices: the series' minimum, not an invented value
    assert float(kept.max()) == float(img.max()) == 1000.0


def test_orthogonal_grid_of_an_orthogonal_grid_is_itself():
    a = np.diag([-0.8, 0.8, 2.5, 1.0])
    a[:3, 3] = [10, -20, 30]
    b, shape = orthogonal_grid(a, (7, 8, 9))
    np.testing.assert_allclose(b, a, atol=1e-12)
    assert shape == (7, 8, 9)


# ------------------------------------------------------------------ the writers' invariant


def _forms_ok(path, affine):
    img = nib.load(path)
    sform, s_code = img.get_sform(coded=True)
    qform, q_code = img.get_qform(coded=True)
    assert s_code > 0
    np.testing.assert_allclose(sform, affine, atol=1e-4)
    if q_code:
        assert corner_offset_mm(img.shape, sform, qform) <= 1e-3
    return s_code, q_code


@pytest.mark.parametrize("writer", ["label", "image"])
def test_written_qform_agrees_with_the_sform_or_is_unset(tmp_path, writer):
    rng = np.random.default_rng(1)
    rot, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    ortho = np.eye(4)
    ortho[:3, :3] = rot * [0.7, 1.3, 2.9]
    ortho[:3, 3] = [-231.2, 118.7, -402.05]
    shear = ortho.copy()
    shear[:3, 2] += 0.25 * ortho[:3, 1]  # a tilt: slices step sideways
    data = rng.integers(0, 3, (30, 40, 5)).astype(np.uint8)
    for name, aff, want_q in (("o", ortho, True), ("s", shear, False)):
        path = tmp_path / f"{name}.nii.gz"
        if writer == "label":
            write_label_map(data, aff, path)
        else:
            write_image(data.astype(np.float32), aff, path)
        s_code, q_code = _forms_ok(path, aff)
        assert (q_code > 0) == want_q and s_code == 1


@pytest.mark.parametrize("axcodes", ["RAS", "LPS", "PIR", "SLA"])
def test_demo_phantoms_are_written_with_agreeing_forms(tmp_path, axcodes):
    from medvit.data.phantom import make_phantom

    p = make_phantom(np.random.default_rng(2), spacing=(1.7, 2.3, 3.1), axcodes=axcodes)
    for path in (write_image(np.round(p.image).astype(np.int16), p.affine, tmp_path / "ct.nii.gz"),
                 write_label_map(p.label, p.affine, tmp_path / "label.nii.gz")):
        assert _forms_ok(path, p.affine) == (1, 1)


def test_evaluate_scores_a_kept_tilted_map_with_a_warning(tilted, tmp_path, caplog):
    from pipelines.volume.evaluate import evaluate_files

    folder, sheared = tilted
    labels = (read_image(folder)[0].numpy() > 500).astype(np.uint8)
    write_label_map(labels, sheared, tmp_path / "ref.nii.gz")
    with caplog.at_level(logging.WARNING):
        result = evaluate_files(tmp_path / "ref.nii.gz", tmp_path / "ref.nii.gz")
    assert "sheared" in caplog.text and "14.0°" in caplog.text and "approximate" in caplog.text
    assert "disagree" not in caplog.text  # the map we wrote has no qform to disagree with
    assert result["mean_dice"] == 1.0


def test_written_codes_follow_the_input(tmp_path):
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    data = np.zeros((3, 3, 3), np.uint8)
    for codes, want in (((2, 1), (2, 1)), ((0, 2), (2, 2)), ((3, 0), (3, 3)), ((0, 0), (1, 1))):
        path = write_label_map(data, aff, tmp_path / "c.nii.gz", codes=codes)
        h = nib.load(path).header
        assert (int(h["sform_code"]), int(h["qform_code"])) == want


def test_stats_use_the_sheared_voxel_volume(tilted):
    folder, affine = tilted
    img = read_image(folder)
    labels = (img[0].numpy() > 500).astype(np.uint8)
    (row,) = label_stats(labels, img[0].numpy(), img.affine.numpy())
    voxel = PIX * PIX * STEP * np.cos(np.radians(TILT))  # |det|: the slice spacing along the normal
    assert voxel < PIX * PIX * STEP  # the column norms' product would overstate it
    assert row["volume_mm3"] == pytest.approx(row["voxels"] * voxel)


# ------------------------------------------------------------------ segment


class BrightNet(torch.nn.Module):
    """Label 1 wherever the windowed CT is above 500 HU: a net whose answer we know."""

    def forward(self, x):
        hu = x * 1600.0 - 1000.0
        return torch.cat([torch.zeros_like(x), (hu - 500.0)], dim=1)


def bright_model():
    cfg = parse_config({
        "labels": {0: "background", 1: "block"},
        "preprocess": {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                       "intensity": {"modality": "ct", "window": [-1000.0, 600.0]}},
        "model": {"name": "unet", "roi_size": [16, 16, 16]},
        "infer": {"overlap": 0.25, "sw_batch_size": 1},
    })
    return LoadedModel(BrightNet(), cfg, {"checkpoint": "bright"})


@pytest.mark.parametrize("mode", ["resample", "keep"])
def test_segment_puts_the_block_where_the_world_has_it(tilted, tmp_path, mode):
    folder, sheared = tilted
    res = segment_case([str(folder)], bright_model(), tmp_path / mode, tilt=mode, progress=False, stats=True)
    img = nib.load(res.labels_path)
    (row,) = json.loads(res.stats_paths[1].read_text())
    assert row["volume_mm3"] == pytest.approx(row["voxels"] * abs(np.linalg.det(img.get_sform()[:3, :3])), rel=1e-5)
    sform, s_code = img.get_sform(coded=True)
    qform, q_code = img.get_qform(coded=True)
    if mode == "keep":
        assert q_code == 0 and s_code == 1 and img.shape == (COLS, ROWS, N)
        np.testing.assert_allclose(sform, sheared, atol=1e-4)
        with pytest.raises(RuntimeError, match="orthonormal"):  # ITK refuses it rather than misplace it
            sitk.ReadImage(str(res.labels_path))
    else:
        assert q_code == s_code == 1 and corner_offset_mm(img.shape, sform, qform) <= 1e-3
        im = sitk.ReadImage(str(res.labels_path))  # and ITK places the resampled map where we do
        assert corner_offset_mm(img.shape, itk_affine(im.GetOrigin(), im.GetSpacing(), im.GetDirection()), sform) < 1e-3
        np.testing.assert_allclose(sform[:3, :3].T @ sform[:3, :3], np.diag(np.diag(sform[:3, :3].T @ sform[:3, :3])),
                                   atol=1e-6)
        assert img.shape[1] > ROWS
    lab = np.asarray(img.dataobj)
    lps = (LPS_TO_RAS[:3, :3] @ world_ras(sform, np.argwhere(lab == 1)).T).T
    assert len(lps) > 10
    # labelled voxels sit in the block, up to one voxel's blur of the resampling
    assert np.all(lps >= BLOCK_LPS[0] - 3.0) and np.all(lps <= BLOCK_LPS[1] + 3.0)
    centre = (BLOCK_LPS[0] + BLOCK_LPS[1]) / 2
    at = np.rint(world_ras(np.linalg.inv(sform), LPS_TO_RAS[:3, :3] @ centre)).astype(int)[0]
    assert lab[tuple(at)] == 1


def test_segment_tilt_on_the_command_line(ckpt, tilted, tmp_path, capsys, caplog):  # noqa: F811
    folder, sheared = tilted
    err = assert_user_error(["segment", str(folder), "-o", str(tmp_path / "e"), "--checkpoint", str(ckpt), "--tilt", "error",
                             "--no-progress"], capsys, str(folder), "14.0°", out_dir=tmp_path / "e")
    assert "gantry-tilted" in err
    code, _, err = run_cli(["segment", str(folder), "-o", str(tmp_path / "k"), "--checkpoint", str(ckpt), "--tilt", "keep",
                            "--no-progress"], capsys)
    assert code == 0, err
    assert "14.0°" in caplog.text and "kept on its sheared grid" in caplog.text
    out = nib.load(tmp_path / "k" / "tilted_seg.nii.gz")
    assert int(out.header["qform_code"]) == 0
    np.testing.assert_allclose(out.get_sform(), sheared, atol=1e-4)
    code, _, err = run_cli(["segment", str(folder), "-o", str(tmp_path / "r"), "--checkpoint", str(ckpt), "--no-progress"],
                           capsys)
    assert code == 0, err
    assert "resampled (linear)" in caplog.text
    out = nib.load(tmp_path / "r" / "tilted_seg.nii.gz")
    assert int(out.header["qform_code"]) == int(out.header["sform_code"]) == 1
    np.testing.assert_allclose(out.get_qform(), out.get_sform(), atol=1e-4)
