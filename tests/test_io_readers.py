"""NIfTI / NRRD / MetaImage reading, multi-file cases, non-finite voxels and bad inputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medvit.core.errors import InputError
from medvit.io import read_image, read_label, write_image

DATA = Path(os.environ.get("MEDVIT_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (set MEDVIT_TEST_DATA)")
    return DATA


def test_big_endian_nifti_matches_nibabel(data):
    path = data / "monai" / "anatomical.nii"
    ref = nib.load(path)
    assert ref.header.endianness == ">"
    img = read_image(path)
    assert img.shape == (1, 33, 41, 25) and img.dtype == torch.float32
    np.testing.assert_array_equal(img[0].numpy(), ref.get_fdata(dtype=np.float32))
    np.testing.assert_array_equal(img.affine.numpy(), ref.affine)
    assert img.affine.dtype == torch.float64
    meta = img.meta
    assert meta["filename_or_obj"] == str(path)
    np.testing.assert_array_equal(meta["original_affine"], ref.affine)
    assert list(meta["spatial_shape"]) == [33, 41, 25]
    assert meta["space"] == "RAS"
    assert meta["medvit_source"]["format"] == "nifti"
    assert meta["medvit_nonfinite_replaced"] == 0


def test_label_keeps_integer_type_and_values(data):
    path = data / "totalsegmentator" / "example_seg.nii.gz"
    ref = nib.load(path)
    lab = read_label(path)
    assert lab.shape == (1, 122, 101, 30) and lab.dtype == torch.uint8
    np.testing.assert_array_equal(lab[0].numpy(), np.asanyarray(ref.dataobj))
    np.testing.assert_array_equal(lab.affine.numpy(), ref.affine)


def test_sform_preferred_then_qform(tmp_path, caplog):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    s_aff = np.diag([2.0, 3.0, 4.0, 1.0])
    s_aff[:3, 3] = [1, 2, 3]
    q_aff = np.diag([-1.0, 1.0, 1.0, 1.0])
    img = nib.Nifti1Image(data, None)
    img.set_qform(q_aff, code=1)
    img.set_sform(s_aff, code=2)
    nib.save(img, tmp_path / "both.nii")
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(read_image(tmp_path / "both.nii").affine.numpy(), s_aff)
    # ITK-based viewers may place such a file by its qform: say so (found by review)
    assert "sform and qform disagree by up to" in caplog.text and "using the sform" in caplog.text
    img.set_sform(s_aff, code=0)
    nib.save(img, tmp_path / "qonly.nii")
    np.testing.assert_allclose(read_image(tmp_path / "qonly.nii").affine.numpy(), q_aff, atol=1e-6)


@pytest.mark.parametrize("bad", ["singular", "nan"])
def test_a_nifti_without_usable_geometry_is_refused(tmp_path, bad):
    """A zero row or a NaN in the sform ran the whole inference and then failed in the inverse."""
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    if bad == "singular":
        aff[2, 2] = 0.0
    else:
        aff[0, 3] = np.nan
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    img.set_sform(aff, code=1)
    img.set_qform(None, code=0)
    nib.save(img, tmp_path / f"{bad}.nii")
    with pytest.raises(InputError, match=rf"{bad}\.nii: has a NaN, infinite or singular voxel-to-world affine"):
        read_image(tmp_path / f"{bad}.nii")


def test_scaled_nifti_applies_slope(tmp_path):
    img = nib.Nifti1Image(np.array([[[0, 1], [2, 3]]], dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, -10)
    nib.save(img, tmp_path / "s.nii.gz")
    np.testing.assert_allclose(read_image(tmp_path / "s.nii.gz")[0].numpy(), [[[-10, -9.5], [-9, -8.5]]])


def test_4d_nifti_and_file_list_become_channels(data, tmp_path):
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 2.0, 2.5, 1.0])
    arr = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    write_image(arr, aff, tmp_path / "two.nii.gz")
    assert nib.load(tmp_path / "two.nii.gz").shape == (4, 5, 6, 2)
    two = read_image(tmp_path / "two.nii.gz")
    np.testing.assert_array_equal(two.numpy(), arr)
    write_image(arr[0], aff, tmp_path / "one.nii.gz")
    three = read_image([tmp_path / "two.nii.gz", tmp_path / "one.nii.gz"])
    assert three.shape == (3, 4, 5, 6)
    np.testing.assert_array_equal(three[2].numpy(), arr[0])
    assert three.meta["filename_or_obj"] == str(tmp_path / "two.nii.gz")
    # a case whose channels sit on different grids is refused, naming the odd file
    shifted = aff.copy()
    shifted[0, 3] = 0.01
    write_image(arr[0], shifted, tmp_path / "moved.nii.gz")
    with pytest.raises(InputError, match=r"moved\.nii\.gz: affine differs"):
        read_image([tmp_path / "one.nii.gz", tmp_path / "moved.nii.gz"])
    with pytest.raises(InputError, match=r"example_ct\.nii\.gz: grid \(122, 101, 112\) differs"):
        read_image([data / "totalsegmentator" / "example_ct_sm.nii.gz", data / "totalsegmentator" / "example_ct.nii.gz"])


def test_nrrd_and_mha_lps_to_ras(tmp_path):
    rng = np.random.default_rng(1)
    arr_zyx = rng.integers(0, 100, (3, 4, 5)).astype(np.int16)
    image = sitk.GetImageFromArray(arr_zyx)
    image.SetSpacing((0.5, 0.75, 2.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
    for name in ("a.nrrd", "a.mha"):
        sitk.WriteImage(image, str(tmp_path / name))
        img = read_image(tmp_path / name)
        assert img.shape == (1, 5, 4, 3)
        np.testing.assert_array_equal(img[0].numpy(), arr_zyx.transpose(2, 1, 0))
        for idx in ((0, 0, 0), (4, 3, 2), (1, 2, 1)):
            lps = np.array(image.TransformIndexToPhysicalPoint(idx))
            world = img.affine.numpy() @ [*idx, 1]
            np.testing.assert_allclose(world[:3], lps * [-1, -1, 1], atol=1e-6)
        assert img.meta["medvit_source"]["format"] == ("nrrd" if name.endswith("nrrd") else "mha")


def test_vector_mha_becomes_channels(tmp_path):
    arr = np.random.default_rng(2).normal(size=(3, 4, 5, 2)).astype(np.float32)  # (Z, Y, X, C)
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=True), str(tmp_path / "v.mha"))
    img = read_image(tmp_path / "v.mha")
    assert img.shape == (2, 5, 4, 3)
    np.testing.assert_array_equal(img.numpy(), arr.transpose(3, 2, 1, 0))


def test_mhd_without_its_data_file_and_a_truncated_mha(tmp_path, capfd):
    """ITK's MetaIO printed its own lines to the terminal and SimpleITK gave errno as the reason."""
    image = sitk.GetImageFromArray(np.random.default_rng(3).random((6, 7, 8)).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "sep.mhd"))
    (tmp_path / "sep.raw").rename(tmp_path / "elsewhere.raw")
    with pytest.raises(InputError, match=r"sep\.mhd: its data file sep\.raw is missing"):
        read_image(tmp_path / "sep.mhd")
    sitk.WriteImage(image, str(tmp_path / "whole.mha"))
    raw = (tmp_path / "whole.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(raw[: len(raw) // 2])
    capfd.readouterr()
    with pytest.raises(InputError, match=r"cut\.mha: not a readable mha image \(.*data not read completely"):
        read_image(tmp_path / "cut.mha")
    assert capfd.readouterr().err == ""  # nothing of ITK's own reached the terminal


def test_nonfinite_error_and_replace(tmp_path, caplog):
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5) - 7
    arr[0, 0, 0], arr[1, 2, 3], arr[2, 3, 4] = np.nan, np.inf, -np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"nan\.nii\.gz: 3 voxels are NaN or infinite"):
        read_image(tmp_path / "nan.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medvit.io"):
        img = read_image(tmp_path / "nan.nii.gz", nonfinite="replace")
    assert "replaced 3 NaN/infinite voxels" in caplog.text
    assert img.meta["medvit_nonfinite_replaced"] == 3
    assert torch.isfinite(img).all()
    assert img[0, 0, 0, 0] == img[0, 1, 2, 3] == img[0, 2, 3, 4] == -6  # the smallest finite value
    assert img[0, 0, 0, 1] == -6 and img[0, 2, 3, 3] == 51
    with pytest.raises(InputError, match="NaN or infinite"):
        read_label(tmp_path / "nan.nii.gz")


def test_float_label_must_be_whole(tmp_path):
    nib.save(nib.Nifti1Image(np.array([[[0.0, 2.0], [1.0, 300.0]]], np.float32), np.eye(4)), tmp_path / "ok.nii")
    lab = read_label(tmp_path / "ok.nii")
    assert lab.dtype == torch.int16 and lab.shape == (1, 1, 2, 2) and int(lab.max()) == 300
    nib.save(nib.Nifti1Image(np.array([[[0.5]]], np.float32), np.eye(4)), tmp_path / "bad.nii")
    with pytest.raises(InputError, match="non-integer"):
        read_label(tmp_path / "bad.nii")


def test_truncated_and_bad_nifti(data, tmp_path):
    raw = (data / "totalsegmentator" / "example_ct_sm.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: not a readable NIfTI file"):
        read_image(tmp_path / "cut.nii.gz")
    raw = (data / "monai" / "anatomical.nii").read_bytes()
    (tmp_path / "short.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=r"short\.nii: not a readable NIfTI file"):
        read_image(tmp_path / "short.nii")
    (tmp_path / "header.nii").write_bytes(b"\x07" * 400)
    with pytest.raises(InputError, match=r"header\.nii: not a readable NIfTI file"):
        read_image(tmp_path / "header.nii")
    (tmp_path / "x.nrrd").write_text("NRRD0004\ntype: nonsense\n")
    with pytest.raises(InputError, match=r"x\.nrrd: not a readable nrrd image"):
        read_image(tmp_path / "x.nrrd")


def test_missing_and_unknown(tmp_path):
    with pytest.raises(InputError, match="nothere.nii.gz: no such file or folder"):
        read_image(tmp_path / "nothere.nii.gz")
    with pytest.raises(InputError, match="no such file or folder"):
        read_label(tmp_path / "nothere.nii.gz")
    (tmp_path / "scan.png").write_bytes(b"\x89PNG....")
    with pytest.raises(InputError, match=r"unsupported file type '\.png'; supported: NIfTI .*NRRD.*MetaImage.*DICOM"):
        read_image(tmp_path / "scan.png")


def test_the_formats_table_names_every_accepted_suffix_and_output_stem(tmp_path):
    from medvit.io.formats import FORMATS, strip_suffix
    from medvit.io.reader import source_format

    for fmt in FORMATS:
        for suffix in fmt.suffixes:
            for name in (f"case{suffix}", f"CASE{suffix.upper()}"):
                (tmp_path / name).write_bytes(b"")
                assert source_format(tmp_path / name) == fmt.key, name
                assert strip_suffix(name) in ("case", "CASE")
    assert strip_suffix("notes.txt") == "notes.txt" and strip_suffix("scan.gz") == "scan.gz"
    (tmp_path / "scan.png").write_bytes(b"")
    with pytest.raises(InputError) as err:
        source_format(tmp_path / "scan.png")
    for fmt in FORMATS:
        assert f"{fmt.title} (" in str(err.value)
        assert all(s in str(err.value) for s in fmt.suffixes if fmt.key != "dicom")


def test_series_on_non_dicom_is_refused(data):
    with pytest.raises(InputError, match="input is not DICOM"):
        read_image(data / "monai" / "anatomical.nii", series="1.2.3")
