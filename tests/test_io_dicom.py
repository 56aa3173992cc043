"""DICOM series: real series (JPEG 2000, reversed slice order, a gap, a SEG) and synthetic ones."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medvit.core.errors import InputError
from medvit.io import list_dicom_series, read_image, read_label
from tests.helpers_dicom import write_slice

DATA = Path(os.environ.get("MEDVIT_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (set MEDVIT_TEST_DATA)")
    return DATA


def ras(ipp) -> np.ndarray:
    return (LPS_TO_RAS[:3, :3] @ np.asarray(ipp, dtype=np.float64))


def write_series(folder: Path, uid: str, positions, *, rows=4, cols=5, seed=0, **kw) -> list[np.ndarray]:
    """Slices at the given IPPs, written in reverse order of their names; returns their pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pix = [rng.integers(-1000, 1000, (rows, cols)).astype(np.int16) for _ in positions]
    for i, (p, px) in enumerate(zip(positions, pix)):
        write_slice(folder / f"{uid[-6:]}_{len(positions) - i:03d}.dcm", series_uid=uid, ipp=p, instance=i + 1, pixels=px, **kw)
    return pix


# ---------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def totalseg_ct(data):
    return read_image(data / "totalsegmentator" / "example_ct_dicom")


def test_totalsegmentator_jpeg2000_series_on_seg_grid(data, totalseg_ct):
    """The JPEG 2000 series lands on example_seg_dicom's grid: same voxel centres, Y axis reversed.

    The NIfTI's affine is ours with the row (Y) axis flipped: its voxel (i, 511 - j, k) is our
    (i, j, k). So compare through world coordinates, not indices.
    """
    seg = read_label(data / "totalsegmentator" / "example_seg_dicom.nii.gz")
    ct = totalseg_ct
    assert ct.shape == (1, 512, 512, 20) and seg.shape == (1, 512, 512, 20)
    assert ct.dtype == np.float32 or str(ct.dtype) == "torch.float32"
    a, b = ct.affine.numpy(), seg.affine.numpy()
    flip_y = np.array([[1, 0, 0, 0], [0, -1, 0, 511], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(a @ flip_y, b, atol=1e-3)
    assert not np.allclose(a, b, atol=1e-3)  # the raw affines do differ
    # our voxel -> seg voxel must be a signed permutation with integer offsets (same voxel centres)
    m = np.linalg.inv(b) @ a
    np.testing.assert_allclose(m, np.rint(m), atol=1e-6)
    # organs' HU through that mapping are plausible; by raw index they are not
    idx = np.indices(ct.shape[1:]).reshape(3, -1)
    sidx = np.rint(m[:3, :3] @ idx + m[:3, 3:]).astype(int)
    lab = seg[0].numpy()[tuple(sidx)].reshape(ct.shape[1:])
    hu = ct[0].numpy()
    assert 40 < hu[lab == 5].mean() < 150  # liver (contrast enhanced)
    assert 150 < hu[lab == 32].mean() < 600  # vertebra T12
    assert -50 < hu[lab == 86].mean() < 80  # autochthon muscle
    assert hu[seg[0].numpy() == 86].mean() < -500  # by raw index the muscle sits in air


def test_totalsegmentator_values_match_pylibjpeg(data, totalseg_ct):
    series = list_dicom_series(data / "totalsegmentator" / "example_ct_dicom")
    assert len(series) == 1 and series[0].n_files == 20 and series[0].description == "CT Body 3.0"
    s = series[0]
    for k in (0, 13):
        ds = pydicom.dcmread(s.files[k])
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # JPEG 2000 lossless
        raw = pydicom.pixels.pixel_array(ds, decoding_plugin="pylibjpeg")
        hu = raw.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(totalseg_ct[0, :, :, k].numpy(), hu.T)
        # slice k sits where its own IPP says
        np.testing.assert_allclose((totalseg_ct.affine.numpy() @ [0, 0, k, 1])[:3], ras(ds.ImagePositionPatient), atol=1e-4)
    assert totalseg_ct.min() == -1024 and 1000 < float(totalseg_ct.max()) < 3100
    assert totalseg_ct.meta["medvit_source"]["format"] == "dicom"
    assert totalseg_ct.meta["medvit_source"]["series_description"] == "CT Body 3.0"


def test_dcmqi_nrrd_labels_land_on_the_right_dicom_slices(data):
    """NRRD slice 0 is 03.dcm; each label voxel maps through world space onto a DICOM slice,
    and that slice is the one the DICOM SEG's frame references, with the same pixels."""
    folder = data / "dcmqi" / "segmentations"
    ct = read_image(folder / "ct-3slice")
    (series,) = list_dicom_series(folder / "ct-3slice")
    assert [f.name for f in series.files] == ["03.dcm", "02.dcm", "01.dcm"]
    assert series.instance_numbers == (3, 2, 1)
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in series.files]
    to_ct = np.linalg.inv(ct.affine.numpy())
    for name, value in (("liver_seg.nrrd", 1), ("spine_seg.nrrd", 2), ("heart_seg.nrrd", 3)):
        lab = read_label(folder / name)
        assert lab.shape == (1, 512, 512, 3) and not lab.dtype.is_floating_point
        vox = np.argwhere(lab[0].numpy() == value)
        world = lab.affine.numpy() @ np.c_[vox, np.ones(len(vox))].T
        ct_idx = (to_ct @ world)[:3].T
        np.testing.assert_allclose(ct_idx, np.rint(ct_idx), atol=1e-3)
        k = np.rint(ct_idx[:, 2]).astype(int)
        assert k.min() >= 0 and k.max() < 3
        np.testing.assert_array_equal(k, vox[:, 2])  # both sort inferior to superior
    liver = read_label(folder / "liver_seg.nrrd")[0].numpy() > 0
    assert liver.sum() == 107098
    seg = pydicom.dcmread(folder / "liver.dcm")
    frames = seg.pixel_array
    for f, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = sops.index(str(ref))
        np.testing.assert_array_equal(frames[f].T.astype(bool), liver[:, :, k])
        ipp = item.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose((ct.affine.numpy() @ [0, 0, k, 1])[:3], ras(ipp), atol=1e-3)
    # the CT slices themselves match pydicom's decode, in our X = column, Y = row order
    for k, f in enumerate(series.files):
        ds = pydicom.dcmread(f)
        np.testing.assert_array_equal(ct[0, :, :, k].numpy(), (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T)


def test_monai_ct_dicom_gap_is_refused(data):
    with pytest.raises(InputError) as e:
        read_image(data / "monai" / "CT_DICOM")
    msg = str(e.value)
    assert "202.5 mm" in msg and "instances 18 and 180" in msg and "1.25 mm" in msg and "\n" not in msg


def test_dicom_seg_as_image_is_refused(data):
    with pytest.raises(InputError, match=r"is a DICOM SEG \(Segmentation Storage\), not an image series"):
        read_image(data / "dcmqi" / "segmentations" / "liver.dcm")


def test_single_real_slice_uses_slice_thickness(data):
    ds = pydicom.dcmread(data / "pydicom" / "CT_small.dcm")
    img = read_image(data / "pydicom" / "CT_small.dcm")
    assert img.shape == (1, 128, 128, 1)
    np.testing.assert_allclose(np.linalg.norm(img.affine.numpy()[:3, 2]), float(ds.SliceThickness))
    np.testing.assert_allclose(img.affine.numpy()[:3, 3], ras(ds.ImagePositionPatient), atol=1e-4)
    np.testing.assert_array_equal(img[0, :, :, 0].numpy(),
                                  (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).T)


def test_truncated_slice_is_refused_naming_it(data, tmp_path):
    for n in ("01.dcm", "02.dcm", "03.dcm"):
        shutil.copy(data / "dcmqi" / "segmentations" / "ct-3slice" / n, tmp_path / n)
    raw = (tmp_path / "02.dcm").read_bytes()
    (tmp_path / "02.dcm").write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(InputError, match=r"02\.dcm.*pixel data cannot be decoded"):
        read_image(tmp_path)


@pytest.mark.parametrize("keep", [132, 300, 700])
def test_a_slice_cut_inside_its_header_is_refused_not_left_out(data, tmp_path, keep):
    """Cut inside the header, pydicom reads a slice as no elements or the few before the cut; it
    was skipped as 'not part of a series', and the other two slices read as the whole series."""
    for n in ("02.dcm", "03.dcm"):
        shutil.copy(data / "dcmqi" / "segmentations" / "ct-3slice" / n, tmp_path / n)
    raw = (data / "dcmqi" / "segmentations" / "ct-3slice" / "01.dcm").read_bytes()
    (tmp_path / "01.dcm").write_bytes(raw[:keep])
    with pytest.raises(InputError, match=r"01\.dcm: is a DICOM file that ends before its SeriesInstanceUID"):
        read_image(tmp_path)


# ---------------------------------------------------------------- synthetic series


def test_two_series_need_a_choice(tmp_path):
    a = write_series(tmp_path / "a", "1.2.826.0.1.3680043.8.498.101", [(0, 0, z) for z in (0, 2, 4)], description="axial")
    write_series(tmp_path / "b", "1.2.826.0.1.3680043.8.498.202", [(0, 0, z) for z in (0, 3)], description="coarse", seed=1)
    (tmp_path / "notes.txt").write_text("not dicom")
    with pytest.raises(InputError) as e:
        read_image(tmp_path)
    msg = str(e.value)
    for part in ("1.2.826.0.1.3680043.8.498.101 'axial' (3 slices", "1.2.826.0.1.3680043.8.498.202 'coarse' (2 slices",
                 "segment's --series UID, or a folder holding only that series"):
        assert part in msg
    img = read_image(tmp_path, series="1.2.826.0.1.3680043.8.498.101")
    assert img.shape == (1, 5, 4, 3)
    np.testing.assert_array_equal(img[0, :, :, 1].numpy(), a[1].T)
    assert img.meta["medvit_source"]["series_uid"] == "1.2.826.0.1.3680043.8.498.101"
    with pytest.raises(InputError, match=r"no DICOM series with UID 9\.9; available: .*498\.101.*498\.202"):
        read_image(tmp_path, series="9.9")


def test_oblique_tilted_series_geometry(tmp_path):
    """Rotated cosines and IPPs that shift in-plane (gantry tilt): every voxel lands where the tags say."""
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    row, col = np.array([c, s, 0.0]), np.array([-s, c, 0.0])
    normal = np.cross(row, col)
    ipps = [np.array([10.0, -5.0, 3.0]) + k * (2.0 * normal + np.array([0, 0.4, 0])) for k in range(4)]
    order = [2, 0, 3, 1]  # written out of order; instance numbers follow it
    rng = np.random.default_rng(3)
    pix = [rng.integers(-500, 500, (4, 6)).astype(np.int16) for _ in range(4)]
    for inst, k in enumerate(order, start=1):
        write_slice(tmp_path / f"s{inst}.dcm", series_uid="1.2.3.4", ipp=ipps[k], instance=inst, pixels=pix[k],
                    iop=(*row, *col), spacing=(0.7, 0.5), slope=2.0, intercept=-10.0)
    img = read_image(tmp_path)
    aff = img.affine.numpy()
    assert img.shape == (1, 6, 4, 4)
    for k in range(4):
        for i, j in ((0, 0), (5, 3), (2, 1)):
            lps = ipps[k] + i * 0.5 * row + j * 0.7 * col  # X along the row cosine, PixelSpacing[1]
            np.testing.assert_allclose((aff @ [i, j, k, 1])[:3], ras(lps), atol=1e-4)
            assert img[0, i, j, k] == pix[k][j, i] * 2.0 - 10.0


def test_single_file_without_thickness(tmp_path):
    write_slice(tmp_path / "one.dcm", series_uid="1.2.3", ipp=(0, 0, 7), instance=1,
                pixels=np.arange(12, dtype=np.int16).reshape(3, 4), thickness=None)
    img = read_image(tmp_path / "one.dcm")
    assert img.shape == (1, 4, 3, 1)
    np.testing.assert_allclose(img.affine.numpy()[:3, 2], [0, 0, 1.0])


def test_duplicate_positions_refused(tmp_path):
    write_series(tmp_path, "1.2.3.5", [(0, 0, 0), (0, 0, 2), (0, 0, 2), (0, 0, 4)])
    with pytest.raises(InputError, match="share one slice position"):
        read_image(tmp_path)


def test_a_file_copied_twice_is_named_as_a_copy(tmp_path):
    import shutil

    write_series(tmp_path, "1.2.3.7", [(0, 0, 0), (0, 0, 2), (0, 0, 4)])
    first = sorted(tmp_path.glob("*"))[1]
    shutil.copy(first, tmp_path / "copy_of_one.dcm")
    with pytest.raises(InputError, match=r"are the same instance \(SOPInstanceUID .*\) twice; remove one of the copies"):
        read_image(tmp_path)


def test_smaller_uneven_step_refused(tmp_path):
    write_series(tmp_path, "1.2.3.6", [(0, 0, z) for z in (0, 2, 4, 5, 7, 9)])
    with pytest.raises(InputError, match=r"uneven slice step of 1 mm between instances 3 and 4 where the other steps are 2 mm"):
        read_image(tmp_path)


def test_mismatched_slices_refused(tmp_path):
    write_slice(tmp_path / "a.dcm", series_uid="1.2.7", ipp=(0, 0, 0), instance=1, pixels=np.zeros((4, 5), np.int16))
    write_slice(tmp_path / "b.dcm", series_uid="1.2.7", ipp=(0, 0, 2), instance=2, pixels=np.zeros((4, 6), np.int16))
    with pytest.raises(InputError, match="Rows x Columns differs between instances 1"):
        read_image(tmp_path)


def test_per_slice_rescale_applied(data, tmp_path):
    src = data / "dcmqi" / "segmentations" / "ct-3slice"
    for n in ("01.dcm", "02.dcm", "03.dcm"):
        ds = pydicom.dcmread(src / n)
        if n == "02.dcm":
            ds.RescaleSlope, ds.RescaleIntercept = 2.5, -100.25
        ds.save_as(tmp_path / n)
    img = read_image(tmp_path)
    for k, f in enumerate(list_dicom_series(tmp_path)[0].files):
        ds = pydicom.dcmread(f)
        ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(img[0, :, :, k].numpy(), ref.T.astype(np.float32))


@pytest.mark.parametrize("content", ["empty", "junk"])
def test_no_dicom_files(tmp_path, content):
    if content == "junk":
        (tmp_path / "a.txt").write_text("hello")
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "b.bin").write_bytes(os.urandom(300))
    with pytest.raises(InputError, match="no DICOM files"):
        read_image(tmp_path)
