"""LoadVolumed at the head of a MONAI chain: reorient, resample, then invert back exactly."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, Orientationd, Spacingd

from medvit.core.errors import InputError
from medvit.io import LoadVolumed, write_image, write_label_map

KEYS = ["image", "label"]


@pytest.fixture()
def lps_case(tmp_path):
    """A small LPS-oriented case with anisotropic spacing; returns paths, label and affine."""
    rng = np.random.default_rng(0)
    aff = np.diag([-1.5, -0.8, 3.0, 1.0])
    aff[:3, 3] = [20.0, -10.0, 5.0]
    assert nib.aff2axcodes(aff) == ("L", "P", "S")
    label = rng.integers(0, 4, (11, 9, 7)).astype(np.uint8)
    image = rng.normal(size=(11, 9, 7)).astype(np.float32)
    write_image(image, aff, tmp_path / "img.nii.gz")
    write_label_map(label, aff, tmp_path / "lab.nii.gz")
    return {"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")}, label, image, aff


def chain(pixdim):
    return Compose([
        LoadVolumed("image", label_keys="label"),
        Orientationd(KEYS, axcodes="RAS"),
        Spacingd(KEYS, pixdim=pixdim, mode=("bilinear", "nearest")),
    ])


def test_invertd_restores_label_grid_exactly(lps_case):
    paths, label, _, aff = lps_case
    pre = chain((0.5, 0.4, 1.0))  # divides the input spacing: nearest resampling loses nothing
    d = pre(dict(paths))
    assert nib.aff2axcodes(d["label"].affine.numpy()) == ("R", "A", "S")
    assert d["label"].shape == (1, 31, 17, 19)
    d["pred"] = d["label"].clone()  # a prediction on the image's grid, inverted through the image's record
    out = Invertd(["label", "pred"], transform=pre, orig_keys=["label", "image"], nearest_interp=True)(d)
    for key in ("label", "pred"):
        back = out[key]
        assert back.shape == (1, 11, 9, 7)
        np.testing.assert_allclose(back.affine.numpy(), aff, atol=1e-6)
        np.testing.assert_array_equal(back[0].numpy(), label)


def test_invertd_grid_for_coarser_spacing(lps_case):
    paths, _, _, aff = lps_case
    pre = chain((2.0, 2.0, 2.0))
    d = pre(dict(paths))
    out = Invertd("label", transform=pre, orig_keys="image", nearest_interp=True)(d)
    assert out["label"].shape == (1, 11, 9, 7)
    np.testing.assert_allclose(out["label"].affine.numpy(), aff, atol=1e-6)


def test_loadvolumed_types_and_meta(lps_case):
    paths, label, image, aff = lps_case
    d = LoadVolumed("image", label_keys="label")({**paths, "id": 7})
    assert d["id"] == 7
    assert isinstance(d["image"], MetaTensor) and d["image"].dtype == torch.float32
    assert d["label"].dtype == torch.uint8 and d["label"].shape == (1, 11, 9, 7)
    np.testing.assert_allclose(d["image"][0].numpy(), image)
    np.testing.assert_array_equal(d["label"][0].numpy(), label)
    assert d["image"].meta["filename_or_obj"] == paths["image"]
    assert d["image"].meta["space"] == "RAS"
    np.testing.assert_allclose(d["label"].meta["original_affine"], aff, atol=1e-6)
    # a list of paths stacks channels; MetaTensors pass through untouched
    two = LoadVolumed("image")({"image": [paths["image"], paths["image"]]})
    assert two["image"].shape == (2, 11, 9, 7)
    again = LoadVolumed("image")(two)
    assert again["image"] is two["image"]


def test_loadvolumed_reports_bad_paths(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        LoadVolumed("image")({"image": str(tmp_path / "gone.nii.gz")})
