"""Inputs a clinic really sends, volume side: one or two slices, scaled integer masks, 4D time
series, several-file cases and sform codes other than scanner."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from medvit.errors import InputError
from pipelines.volume import check_net_extent
from tests.test_cli import assert_user_error, ckpt, phantom, run_cli  # noqa: F401  (fixtures)


def test_one_slice_is_warned_about_naming_axis_and_window(ckpt, phantom, tmp_path, capsys, caplog):  # noqa: F811
    src = nib.load(phantom)
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[:, :, 5:6], src.affine), tmp_path / "one.nii.gz")
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(["segment", str(phantom), "-o", str(tmp_path / "full"), "--checkpoint", str(ckpt),
                                "--no-progress"], capsys)
    assert code == 0, err
    assert "padding" not in caplog.text  # a whole phantom is not thin
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(["segment", str(tmp_path / "one.nii.gz"), "-o", str(tmp_path / "o"), "--checkpoint",
                                str(ckpt), "--no-progress"], capsys)
    assert code == 0, err
    assert "the net sees 1 voxel along axis 2 (S) for a window of 32" in caplog.text
    assert "one.nii.gz" in caplog.text and "mostly padding" in caplog.text


def test_an_axis_of_no_voxels_is_refused():
    with pytest.raises(InputError, match=r"case\.nii\.gz: after preprocessing has no voxel along axis 1 \(A\)"):
        check_net_extent((12, 0, 40), (32, 32, 32), "case.nii.gz")
    check_net_extent((8, 8, 8), (32, 32, 32), "fine.nii.gz")  # a quarter of the window: no warning, no error


def _scaled_mask(path, slope: float, inter: float = 0.0):
    mask = np.zeros((6, 5, 4), np.int32)
    mask[1:4, 2:4, 1:3] = 1
    img = nib.Nifti1Image(mask, np.diag([0.8, 0.8, 2.0, 1.0]))
    img.header.set_data_dtype(np.int32)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, path)
    return mask


def test_a_scaled_integer_mask_is_read_as_its_integers(tmp_path, capsys):
    from medvit.io import read_label

    mask = _scaled_mask(tmp_path / "m.nii.gz", np.float32(0.99999997))
    assert np.asarray(nib.load(tmp_path / "m.nii.gz").dataobj).max() != 1.0  # the scaling does reach the values
    lab = read_label(tmp_path / "m.nii.gz")
    assert not lab.dtype.is_floating_point
    np.testing.assert_array_equal(lab[0].numpy(), mask)
    _scaled_mask(tmp_path / "two.nii.gz", 2.0, 1.0)  # whole numbers after scaling: 1 and 3
    assert set(np.unique(read_label(tmp_path / "two.nii.gz").numpy())) == {1, 3}
    _scaled_mask(tmp_path / "half.nii.gz", 0.5)
    with pytest.raises(InputError, match=r"half\.nii\.gz: label map holds non-integer values: .*scl_slope 0\.5"):
        read_label(tmp_path / "half.nii.gz")
    # evaluate reads labels the same way: a scaled mask scored against itself
    code, out, err = run_cli(["evaluate", str(tmp_path / "m.nii.gz"), str(tmp_path / "m.nii.gz")], capsys)
    assert code == 0, err
    assert "mean Dice over 1 reference labels: 1.000" in out
