"""Inputs a clinic really sends, volume side: one or two slices, scaled integer masks, 4D time
series, several-file cases and sform codes other than scanner."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from medvit.core.errors import InputError
from pipelines.volume.segment import check_net_extent
from tests.helpers import assert_user_error, run_cli


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


def _four_d(path, *, time: bool):
    img = nib.Nifti1Image(np.zeros((8, 9, 10, 2), np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    if time:
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = 2.5  # a repetition time
    nib.save(img, path)
    return path


def test_a_4d_time_series_is_named_as_one(ckpt, tmp_path, capsys):  # noqa: F811
    ts = _four_d(tmp_path / "fmri.nii.gz", time=True)
    err = assert_user_error(["segment", str(ts), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)], capsys,
                            "fmri.nii.gz: is a 4D time series of 2 time points", "one volume a file",
                            out_dir=tmp_path / "o")
    assert "channel(s)" not in err
    stack = _four_d(tmp_path / "stack.nii.gz", time=False)  # two channels, as write_image stores them
    err = assert_user_error(["segment", str(stack), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)], capsys,
                            "stack.nii.gz: has 2 channel(s) but the checkpoint's unetr takes 1", out_dir=tmp_path / "o")
    assert "time series" not in err


def test_a_several_channel_refusal_names_every_file(ckpt, phantom, tmp_path, capsys):  # noqa: F811
    ts = _four_d(tmp_path / "fmri.nii.gz", time=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 9, 10), np.int16), np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "t1.nii.gz")
    group = f"{tmp_path / 't1.nii.gz'},{ts}"
    assert_user_error(["segment", group, "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)], capsys,
                      f"{group}: has 3 channel(s) (t1.nii.gz: 1, fmri.nii.gz: a 4D time series of 2 time points); "
                      "medvit reads one volume a file", "but the checkpoint's unetr takes 1", out_dir=tmp_path / "o")


def test_training_check_names_a_time_series(tmp_path):
    from medvit.io import read_image
    from medvit.transforms.checks import CheckCased

    ts = _four_d(tmp_path / "fmri.nii.gz", time=True)
    with pytest.raises(InputError, match=r"fmri\.nii\.gz: is a 4D time series of 2 time points.*config's unetr takes 1"):
        CheckCased("image", "label", in_channels=1, n_classes=2, net="unetr")({"image": read_image(ts)})


@pytest.mark.parametrize("codes", [(2, 2), (2, 0), (0, 2), (4, 1)])
def test_the_input_sform_and_qform_codes_are_kept(ckpt, phantom, tmp_path, capsys, codes):  # noqa: F811
    src = nib.load(phantom)
    img = nib.Nifti1Image(np.asarray(src.dataobj), None)
    img.set_sform(src.affine, code=codes[0])
    img.set_qform(src.affine, code=codes[1])
    nib.save(img, tmp_path / "aligned.nii.gz")
    code, _, err = run_cli(["segment", str(tmp_path / "aligned.nii.gz"), "-o", str(tmp_path / "o"), "--checkpoint",
                            str(ckpt), "--no-progress"], capsys)
    assert code == 0, err
    out = nib.load(tmp_path / "o" / "aligned_seg.nii.gz")
    s, q = codes[0] or codes[1], codes[1] or codes[0]  # an unset form takes the other's code
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (s, q)
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
