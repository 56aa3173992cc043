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
