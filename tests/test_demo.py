"""The embedded default job, `medvit demo`."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medvit.data.phantom import LABELS, make_phantom, phantom_axcodes
from pipelines.demo import DEMO_CONFIG, run_demo
from tests.helpers import TINY_UNETR


def test_phantoms_vary_geometry_and_hold_every_label():
    rng = np.random.default_rng(1)
    cases = [make_phantom(rng) for _ in range(6)]
    assert len({phantom_axcodes(p) for p in cases}) > 1
    assert len({tuple(np.round(np.linalg.norm(p.affine[:3, :3], axis=0), 2)) for p in cases}) == 6
    for p in cases:
        assert set(np.unique(p.label)) == set(LABELS)
        # each organ's mean HU is distinct from its neighbours by more than the noise
        means = [p.image[p.label == k].mean() for k in (1, 2, 3)]
        assert means[0] + 40 < means[1] < means[2] - 40


def test_phantom_liver_is_on_the_patients_right_whatever_the_axes():
    for codes in ("RAS", "LPS", "ASR"):
        p = make_phantom(np.random.default_rng(2), axcodes=codes)
        idx = np.argwhere(p.label == 1).mean(0)
        world = p.affine[:3, :3] @ idx + p.affine[:3, 3]
        assert world[0] > 20  # RAS: +x is the patient's right


def test_demo_path_on_a_tiny_set(tmp_path, capsys):
    cfg = json.loads(json.dumps(DEMO_CONFIG))
    cfg["preprocess"]["spacing"] = [8.0, 8.0, 8.0]
    cfg["model"].update(roi_size=[32, 32, 32], options=TINY_UNETR)
    cfg["train"].update(epochs=1, val_every=1)
    s = run_demo(tmp_path, config=cfg, counts=(2, 1, 1), phantom_spacing=(6.0, 6.0, 6.0))
    out = capsys.readouterr().out
    assert "mean Dice over 1 held-out phantoms" in out
    assert set(s["dice"]) == {"liver", "spleen", "kidney", "spine", "lung"}
    seg = nib.load(tmp_path / "segmentations" / "phantom_000_seg.nii.gz")
    img = nib.load(tmp_path / "phantoms" / "test" / "phantom_000.nii.gz")
    np.testing.assert_allclose(seg.affine, img.affine, atol=1e-4)
    assert seg.shape == img.shape
    dl = json.loads((tmp_path / "phantoms" / "datalist.json").read_text())
    assert len(dl["training"]) == 2 and len(dl["validation"]) == 1 and len(dl["test"]) == 1
    if s["real_ct_labels"]:
        real = nib.load(s["real_ct_labels"])
        assert real.shape == (122, 101, 112)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEDVIT_SKIP_FULL_DEMO") == "1", reason="MEDVIT_SKIP_FULL_DEMO=1")
def test_full_demo_reaches_target_dice_in_time(tmp_path):
    """The issue's bar: mean Dice >= 0.90 on held-out phantoms. (Its time, 10 minutes at most on
    2 cores, is printed by the demo and reported in the README, not asserted: this machine is shared.)"""
    s = run_demo(tmp_path)
    assert s["mean_dice"] >= 0.90, s["dice"]
