"""Transform chains built from the config, and the inversion of predictions onto the input grid.

Inputs are MetaTensors built here (RAS voxel->world affines, as medvit.io returns them), so
these tests need no reader; one test at the end goes through medvit.io.LoadVolumed.
"""

from __future__ import annotations

import pickle

import nibabel as nib
import numpy as np
import pytest
from monai.transforms import Orientationd
import torch
from monai.data import MetaTensor
from scipy import ndimage

from medvit.config import AugmentConfig, Config, IntensityConfig, ModelConfig, PreprocessConfig
from medvit.transforms import (
    infer_transforms,
    invert_prediction,
    preprocess_transforms,
    train_transforms,
    val_transforms,
)

SHAPE = (40, 36, 16)
"""Voxel counts along the input's three voxel axes."""
IN_MM = {"R": 1.0, "A": 1.25, "S": 3.0}
"""Input spacing per world axis: anisotropic, thick slices."""
FINER_MM = {"R": 0.5, "A": 1.25, "S": 1.5}
"""Divides IN_MM on every axis: every input voxel centre lies on the new grid."""
COARSER_MM = {"R": 1.5, "A": 1.5, "S": 2.0}
"""Does not: resampling there and back loses detail at label borders."""
HU = {0: -1000.0, 1: 100.0, 2: 250.0}
"""CT value of each label of the synthetic volume."""
MRI = {0: 0.0, 1: 300.0, 2: 600.0, 3: 120.0}
"""MRI value of each label (3: unlabelled tissue around the labels, dimmer than them)."""
WINDOW = (-100.0, 300.0)


def axis_of(code: str) -> str:
    return {"L": "R", "R": "R", "P": "A", "A": "A", "I": "S", "S": "S"}[code]


def make_affine(codes: str, mm: dict[str, float] = IN_MM, origin=(12.5, -30.0, 41.0)) -> np.ndarray:
    """RAS voxel->world (4, 4) whose voxel axes point along ``codes`` (LPS, RAS, ...)."""
    a = np.eye(4)
    for i, c in enumerate(codes):
        w = "RAS".index(axis_of(c))
        a[w, i] = (1.0 if c in "RAS" else -1.0) * mm[axis_of(c)]
    a[:3, 3] = origin
    return a


def spacing_for(orientation: str, mm: dict[str, float]) -> tuple[float, float, float]:
    """Target pixdim in output axis order for per-world-axis millimetres."""
    return tuple(mm[axis_of(c)] for c in orientation)


def make_label() -> np.ndarray:
    """(1, X, Y, Z) int32: a block of 1 holding a block of 2, and a separate small block of 2."""
    lab = np.zeros((1, *SHAPE), np.int32)
    lab[0, 6:30, 6:28, 3:13] = 1
    lab[0, 12:22, 12:22, 5:10] = 2
    lab[0, 32:38, 28:34, 2:8] = 2
    return lab


def make_image(label: np.ndarray, modality: str) -> np.ndarray:
    """Image derived from the label: CT in HU (1 channel); MRI with 2 channels of different scale."""
    if modality == "ct":
        return np.vectorize(HU.get)(label).astype(np.float32)
    tissue = label.copy()
    tissue[0, 2:36, 2:32, 1:15][tissue[0, 2:36, 2:32, 1:15] == 0] = 3
    rng = np.random.default_rng(0)
    base = np.vectorize(MRI.get)(tissue).astype(np.float32)
    noise = rng.normal(0.0, 10.0, base.shape).astype(np.float32) * (base > 0)
    return np.concatenate([base + noise, 3.0 * (base + noise) + 50.0 * (base > 0)]).astype(np.float32)


def meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.from_numpy(array), affine=torch.from_numpy(affine), meta={"filename_or_obj": "x"})


def case(modality: str, codes: str) -> dict:
    """An image and label pair on the same grid, in the voxel orientation ``codes``."""
    lab = make_label()
    aff = make_affine(codes)
    return {"image": meta(make_image(lab, modality), aff), "label": meta(lab, aff)}


def pre_cfg(modality: str, *, orientation="RAS", spacing=None, crop=False, **kw) -> PreprocessConfig:
    if modality == "ct":
        intensity = IntensityConfig(modality="ct", window=WINDOW)
    else:
        intensity = IntensityConfig(modality="mri", nonzero=True)
    return PreprocessConfig(
        orientation=orientation, spacing=spacing, intensity=intensity, crop_foreground=crop, crop_margin=2, **kw
    )


def full_cfg(pre: PreprocessConfig, roi=(16, 16, 8), **augment) -> Config:
    # the MRI cases have two channels (see case())
    return Config(
        labels={0: "background", 1: "organ", 2: "lesion"},
        preprocess=pre,
        augment=AugmentConfig(**augment),
        model=ModelConfig(name="unetr", roi_size=roi, in_channels=2 if pre.intensity.modality == "mri" else 1),
    )


def world(affine, index) -> np.ndarray:
    return (np.asarray(affine, dtype=np.float64) @ np.r_[np.asarray(index, dtype=np.float64), 1.0])[:3]


def voxel(affine, point) -> np.ndarray:
    return (np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.r_[point, 1.0])[:3]


def pixdim(affine) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def near_border(label: np.ndarray) -> np.ndarray:
    """Voxels with a different label within one voxel (26-neighbourhood)."""
    return ndimage.maximum_filter(label, size=3) != ndimage.minimum_filter(label, size=3)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("crop", [False, True], ids=["nocrop", "crop"])
@pytest.mark.parametrize("codes", ["LPS", "RAS"])
@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_preprocess_geometry_and_intensity(modality, codes, crop):
    spacing = spacing_for("RAS", COARSER_MM)
    chain = val_transforms(full_cfg(pre_cfg(modality, spacing=spacing, crop=crop)), load=False)
    data = case(modality, codes)
    in_aff = data["image"].affine.numpy().copy()
    out = chain(data)
    img, lab = out["image"], out["label"]
    assert isinstance(img, MetaTensor) and img.dtype == torch.float32
    aff = img.affine.numpy()
    assert nib.aff2axcodes(aff) == ("R", "A", "S")
    np.testing.assert_allclose(pixdim(aff), spacing, atol=1e-6)
    assert lab.shape[1:] == img.shape[1:] and np.allclose(lab.affine.numpy(), aff)
    assert set(np.unique(lab.numpy())) <= {0.0, 1.0, 2.0}
    # the centre of the label-2 block keeps its value and its label at the same world point
    centre = world(in_aff, (16.5, 16.5, 7.0))
    j = np.round(voxel(aff, centre)).astype(int)
    assert np.abs(world(aff, j) - centre).max() <= max(spacing) / 2 + 1e-6
    assert lab[0][tuple(j)] == 2
    if modality == "ct":
        v = img.numpy()
        assert v.min() >= 0.0 and v.max() <= 1.0
        assert img[0][tuple(j)].item() == pytest.approx((HU[2] - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), abs=1e-5)
    elif not crop:  # z-scores over the non-zero voxels, each channel on its own
        for c in range(2):
            x = img[c][img[c] != 0].double()
            assert abs(x.mean().item()) < 1e-4 and abs(x.std(unbiased=False).item() - 1.0) < 1e-3


@pytest.mark.parametrize("codes", ["LPS", "RAS", "PIL"])
@pytest.mark.parametrize("target", ["RAS", "LPS", "SAR"])
def test_orientation_and_spacing_follow_the_config(codes, target):
    spacing = spacing_for(target, COARSER_MM)
    chain = infer_transforms(pre_cfg("ct", orientation=target, spacing=spacing), load=False)
    out = chain({"image": meta(make_image(make_label(), "ct"), make_affine(codes))})["image"]
    assert nib.aff2axcodes(out.affine.numpy()) == tuple(target)
    np.testing.assert_allclose(pixdim(out.affine), spacing, atol=1e-6)


@pytest.mark.parametrize("target", ["RAS", "SPL"])
def test_bright_voxel_keeps_its_world_position(target):
    """One bright voxel of an LPS input lands at the same world point after Orientationd + Spacingd."""
    aff = make_affine("LPS")
    img = np.full((1, *SHAPE), -1000.0, np.float32)
    src = (7, 5, 4)
    img[(0, *src)] = 1000.0
    cfg = pre_cfg("ct", orientation=target, spacing=spacing_for(target, FINER_MM))
    cfg.intensity.window = (-1000.0, 1000.0)
    out = infer_transforms(cfg, load=False)({"image": meta(img, aff)})["image"]
    flat = int(torch.argmax(out[0]))
    j = np.unravel_index(flat, out.shape[1:])
    np.testing.assert_allclose(world(out.affine, j), world(aff, src), atol=1e-4)
    assert out[0][j].item() == pytest.approx(1.0, abs=1e-6)
    # bilinear spreads it to its new neighbours symmetrically: the weighted centre stays put
    idx = np.argwhere(out[0].numpy() > 0)
    w = out[0].numpy()[tuple(idx.T)]
    centre = np.array([world(out.affine, i) for i in idx]).T @ w / w.sum()
    np.testing.assert_allclose(centre, world(aff, src), atol=1e-4)


def test_ct_window_maps_known_values():
    hu = np.array([-1000.0, -100.0, 0.0, 100.0, 300.0, 700.0], np.float32)
    vol = np.broadcast_to(hu[:, None, None], (6, 4, 3))[None].copy()
    for clip, expected in ((True, [0, 0, 0.25, 0.5, 1, 1]), (False, [-2.25, 0, 0.25, 0.5, 1, 2.0])):
        cfg = PreprocessConfig(intensity=IntensityConfig(modality="ct", window=WINDOW, clip=clip))
        out = infer_transforms(cfg, load=False)({"image": meta(vol, np.eye(4))})["image"]
        np.testing.assert_allclose(out[0, :, 0, 0].numpy(), expected, atol=1e-6)
        assert torch.all(out == out[:, :, :1, :1])


def test_mri_zscore_is_per_channel_and_ignores_zeros():
    vol = make_image(make_label(), "mri")
    cfg = pre_cfg("mri")
    out = infer_transforms(cfg, load=False)({"image": meta(vol, np.eye(4))})["image"].numpy()
    for c in range(2):
        nz = vol[c] != 0
        assert np.all(out[c][~nz] == 0)
        ref = (vol[c][nz] - vol[c][nz].mean()) / vol[c][nz].std()
        np.testing.assert_allclose(out[c][nz], ref, atol=1e-4)


@pytest.mark.parametrize("codes", ["LPS", "RAS"])
@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_crop_is_the_box_above_threshold_plus_margin(modality, codes):
    """The crop runs on the reoriented input grid, with the threshold in the input's units."""
    cfg = pre_cfg(modality)
    whole = infer_transforms(cfg, load=False)(case(modality, codes))["image"]
    cut = infer_transforms(pre_cfg(modality, crop=True), load=False)(case(modality, codes))["image"]
    # the crop is a sub-block of the uncropped grid, same spacing, offset by a whole voxel count
    off = voxel(whole.affine, cut.affine.numpy()[:3, 3])
    np.testing.assert_allclose(off, np.round(off), atol=1e-5)
    lo = np.round(off).astype(int)
    hi = lo + np.array(cut.shape[1:])
    np.testing.assert_allclose(cut.affine.numpy()[:3, :3], whole.affine.numpy()[:3, :3])
    raw = Orientationd(keys="image", axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(case(modality, codes))["image"]
    fg = np.argwhere((raw.numpy() > cfg.crop_threshold()).any(0))
    expect_lo = np.maximum(fg.min(0) - 2, 0)
    expect_hi = np.minimum(fg.max(0) + 1 + 2, np.array(whole.shape[1:]))
    np.testing.assert_array_equal(lo, expect_lo)
    np.testing.assert_array_equal(hi, expect_hi)
    if modality == "ct":  # (the MRI tissue fills the volume to within the margin)
        assert np.prod(cut.shape[1:]) < np.prod(whole.shape[1:])
        # intensity scaling does not depend on the crop
        assert torch.equal(cut, whole[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]])


def test_default_crop_thresholds_are_in_input_units():
    assert pre_cfg("ct").crop_threshold() == -500.0
    assert pre_cfg("mri").crop_threshold() == 0.0
    assert pre_cfg("ct", foreground_threshold=-200.0).crop_threshold() == -200.0


def test_crop_keeps_a_volume_with_nothing_above_threshold():
    img = np.full((1, 12, 10, 8), -1000.0, np.float32)
    out = infer_transforms(pre_cfg("ct", crop=True), load=False)({"image": meta(img, np.eye(4))})["image"]
    assert out.shape == (1, 12, 10, 8)


def test_preprocess_list_order_and_spacing_skip():
    names = [type(t).__name__ for t in preprocess_transforms(pre_cfg("ct", spacing=(1.0, 1.0, 1.0), crop=True))]
    assert names == ["Orientationd", "CropForegroundd", "CheckResampleSized", "Spacingd", "ScaleIntensityRanged", "EnsureTyped"]
    names = [type(t).__name__ for t in preprocess_transforms(pre_cfg("mri"), label_key="label")]
    assert names == ["Orientationd", "NormalizeIntensityd", "EnsureTyped"]


def test_chains_pickle():
    cfg = full_cfg(pre_cfg("ct", spacing=(1.0, 1.0, 1.0), crop=True))
    for chain in (train_transforms(cfg, load=False), val_transforms(cfg, load=False)):
        pickle.loads(pickle.dumps(chain))


# ---------------------------------------------------------------- inversion


@pytest.mark.parametrize("crop", [False, True], ids=["nocrop", "crop"])
@pytest.mark.parametrize("codes", ["LPS", "RAS"])
@pytest.mark.parametrize("modality", ["ct", "mri"])
@pytest.mark.parametrize("grid", ["finer", "coarser"])
def test_inverted_label_matches_the_original(grid, modality, codes, crop):
    """Exact when the target spacing divides the input's (every input voxel centre is a grid
    point, and nearest resampling there and back copies it); otherwise the coarser grid cannot
    hold every border voxel, so we ask that mismatches lie only at label borders (how many
    there are depends on where the grid's phase falls: up to 2.2 % of these small blocks when
    the crop box sets the origin of the coarser grid)."""
    mm = FINER_MM if grid == "finer" else COARSER_MM
    chain = val_transforms(full_cfg(pre_cfg(modality, spacing=spacing_for("RAS", mm), crop=crop)), load=False)
    data = case(modality, codes)
    orig_lab = data["label"].numpy().copy()
    orig_aff = data["image"].affine.numpy().copy()
    out = chain(data)
    inv = invert_prediction(out["label"], out, chain)
    assert isinstance(inv, MetaTensor) and inv.shape == orig_lab.shape
    np.testing.assert_allclose(inv.affine.numpy(), orig_aff, atol=1e-4)
    got = inv.numpy()
    if grid == "finer":
        np.testing.assert_array_equal(got, orig_lab)
    else:
        bad = got[0] != orig_lab[0]
        assert bad.mean() <= 0.03
        assert not (bad & ~near_border(orig_lab[0])).any()


@pytest.mark.parametrize("codes", ["LPS", "RAS"])
def test_cropped_away_region_inverts_to_background(codes):
    spacing = spacing_for("RAS", COARSER_MM)
    chain = infer_transforms(pre_cfg("ct", spacing=spacing, crop=True), load=False)
    data = chain({"image": case("ct", codes)["image"]})
    ones = invert_prediction(torch.ones((1, *data["image"].shape[1:]), dtype=torch.int32), data, chain)
    assert ones.dtype == torch.int32 and ones.shape == (1, *SHAPE)
    m = ones[0].numpy()
    assert set(np.unique(m)) == {0, 1}
    inside = np.argwhere(m == 1)
    lo, hi = inside.min(0), inside.max(0) + 1
    assert m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].all()  # a box of ones, zeros around
    lab = make_label()[0]
    assert m[lab > 0].all()  # the box holds the whole foreground


@pytest.mark.parametrize("grid", ["finer", "coarser"])
def test_inverted_scores_argmax_to_the_original(grid):
    """Class scores go back with the image's (bilinear) interpolation; argmax afterwards."""
    mm = FINER_MM if grid == "finer" else COARSER_MM
    chain = val_transforms(full_cfg(pre_cfg("ct", spacing=spacing_for("RAS", mm), crop=True)), load=False)
    data = case("ct", "LPS")
    orig = data["label"].numpy()[0].copy()
    out = chain(data)
    scores = torch.nn.functional.one_hot(out["label"][0].long(), 3).permute(3, 0, 1, 2).float()
    inv = invert_prediction(scores, out, chain, mode="bilinear")
    assert inv.shape == (3, *SHAPE) and inv.dtype == torch.float32
    assert float(inv.min()) >= -1e-6 and float(inv.max()) <= 1 + 1e-6
    got = inv.argmax(0).numpy()
    if grid == "finer":
        np.testing.assert_array_equal(got, orig)
        # between two label values, bilinear gives fractions; nearest would not
    else:
        bad = got != orig
        assert bad.mean() <= 0.02 and not (bad & ~near_border(orig)).any()
        assert ((inv > 0.01) & (inv < 0.99)).any()


def test_invert_refuses_a_prediction_on_another_grid():
    chain = infer_transforms(pre_cfg("ct", spacing=(2.0, 2.0, 2.0)), load=False)
    data = chain({"image": case("ct", "LPS")["image"]})
    with pytest.raises(ValueError, match="preprocessed grid"):
        invert_prediction(torch.zeros(1, 5, 5, 5), data, chain)
    with pytest.raises(ValueError, match="MetaTensor"):
        invert_prediction(torch.zeros(1, *data["image"].shape[1:]), {"image": data["image"].as_tensor()}, chain)
    bare = MetaTensor(torch.zeros(1, *data["image"].shape[1:]))
    with pytest.raises(ValueError, match="no record"):
        invert_prediction(torch.zeros(1, *data["image"].shape[1:]), {"image": bare}, chain)
    with pytest.raises(ValueError, match="mode"):
        invert_prediction(torch.zeros(1, *data["image"].shape[1:]), data, chain, mode="cubic")


# ---------------------------------------------------------------- training chain


@pytest.mark.parametrize("codes", ["LPS", "RAS"])
def test_train_patches_have_roi_size_and_aligned_labels(codes):
    """Image = 0.5 * label after windowing, so any misalignment from flips/rot90 shows."""
    roi = (16, 16, 8)
    pre = pre_cfg("ct", spacing=None, crop=True)
    pre.intensity.window = (0.0, 200.0)
    cfg = full_cfg(pre, roi=roi, num_samples=3, pos=1.0, neg=0.0, flip_prob=1.0, rot90_prob=1.0,
                   shift_prob=0.0, scale_prob=0.0)
    lab = make_label()
    aff = make_affine(codes)
    chain = train_transforms(cfg, load=False)
    chain.set_random_state(seed=1)
    patches = chain({"image": meta(lab.astype(np.float32) * 100.0, aff), "label": meta(lab, aff)})
    assert isinstance(patches, list) and len(patches) == 3
    for p in patches:
        img, lab_p = p["image"], p["label"]
        assert img.shape == (1, *roi) and lab_p.shape == (1, *roi)
        assert img.dtype == torch.float32 and lab_p.dtype == torch.float32
        assert torch.equal(img.as_tensor(), 0.5 * lab_p.as_tensor())
        assert (lab_p > 0).any()  # pos=1, neg=0: centred on foreground
        ops = [op["class"] for op in img.applied_operations]
        assert ops.count("RandFlipd") == 3 and "RandRotate90d" in ops
        assert np.allclose(img.affine.numpy(), lab_p.affine.numpy())


def test_train_pads_small_volumes_and_augments_intensity_only_on_the_image():
    roi = (24, 24, 20)
    cfg = full_cfg(pre_cfg("mri", spacing=(2.0, 2.0, 2.0)), roi=roi, num_samples=2, shift_prob=1.0, scale_prob=1.0,
                   shift_intensity=0.5, scale_intensity=0.5)
    data = case("mri", "LPS")
    chain = train_transforms(cfg, load=False)
    chain.set_random_state(seed=0)
    fixed = val_transforms(cfg, load=False)(case("mri", "LPS"))
    assert any(a < b for a, b in zip(fixed["image"].shape[1:], roi))  # smaller than the patch on some axis
    patches = chain(data)
    assert len(patches) == 2
    for p in patches:
        assert p["image"].shape == (2, *roi) and p["label"].shape == (1, *roi)
        assert set(np.unique(p["label"].numpy())) <= {0.0, 1.0, 2.0}
    names = [type(t).__name__ for t in chain.transforms]
    assert names.index("SpatialPadd") < names.index("RandCropByPosNegLabeld")
    assert "RandShiftIntensityd" in names and "RandScaleIntensityd" in names


def test_rot90_only_in_a_plane_of_equal_sides():
    pre = pre_cfg("ct")
    rot = [t for t in train_transforms(full_cfg(pre, roi=(16, 12, 16)), load=False).transforms
           if type(t).__name__ == "RandRotate90d"]
    assert len(rot) == 1 and tuple(rot[0].spatial_axes) == (0, 2)
    names = [type(t).__name__ for t in train_transforms(full_cfg(pre, roi=(16, 12, 8)), load=False).transforms]
    assert "RandRotate90d" not in names and names.count("RandFlipd") == 3


# ---------------------------------------------------------------- through the reader


def test_val_chain_from_nifti_files_inverts_onto_the_file_grid(tmp_path):
    io = pytest.importorskip("medvit.io")
    if not hasattr(io, "LoadVolumed"):
        pytest.skip("medvit.io has no LoadVolumed yet")
    lab = make_label()
    aff = make_affine("LPS")
    nib.save(nib.Nifti1Image(make_image(lab, "ct")[0].astype(np.int16), aff), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(lab[0].astype(np.uint8), aff), tmp_path / "ct_label.nii.gz")
    cfg = full_cfg(pre_cfg("ct", spacing=spacing_for("RAS", FINER_MM), crop=True))
    chain = val_transforms(cfg)
    out = chain({"image": str(tmp_path / "ct.nii.gz"), "label": str(tmp_path / "ct_label.nii.gz")})
    assert nib.aff2axcodes(out["image"].affine.numpy()) == ("R", "A", "S")
    np.testing.assert_allclose(pixdim(out["image"].affine), spacing_for("RAS", FINER_MM), atol=1e-6)
    inv = invert_prediction(out["label"], out, chain)
    ref = nib.load(tmp_path / "ct_label.nii.gz")
    np.testing.assert_allclose(inv.affine.numpy(), ref.affine, atol=1e-4)
    np.testing.assert_array_equal(inv.numpy()[0], np.asarray(ref.dataobj))
