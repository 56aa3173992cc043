"""The embedded default job, `medvit demo`."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medvit.data.phantom import LABELS, make_phantom, phantom_axcodes
from medvit.config import ModelConfig
from medvit.nets import NETS, build_net
from pipelines.cli import main
from pipelines.volume.demo import DEMO_CONFIG, DEMO_NETS, default_output, demo_config, run_demo
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


def test_every_registered_net_has_a_demo_configuration_that_builds():
    assert set(NETS.names()) <= set(DEMO_NETS), "a registered volume net without a DEMO_NETS entry"
    assert demo_config("unetr") == DEMO_CONFIG  # the default job is unchanged
    for name in NETS.names():
        cfg = demo_config(name)
        assert cfg["model"]["name"] == name and cfg["labels"] == DEMO_CONFIG["labels"]
        net = build_net(ModelConfig(**cfg["model"], out_channels=len(LABELS)))
        assert sum(p.numel() for p in net.parameters()) > 0


def test_demo_net_picks_the_config_and_a_folder_naming_the_net(tmp_path, monkeypatch):
    from pipelines.volume import demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: calls.append((out, kw["config"])))
    monkeypatch.chdir(tmp_path)
    for args in (["demo"], ["demo", "--net", "unet"], ["demo", "--net", "swin_unetr", "-o", "mine"]):
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0
    assert [(str(o), c["model"]["name"]) for o, c in calls] == [
        ("demo_out", "unetr"), ("demo_unet_out", "unet"), ("mine", "swin_unetr")]
    assert calls[0][1] == DEMO_CONFIG and default_output("unet").name == "demo_unet_out"


@pytest.mark.parametrize("name, says", [("nonet", "is not a registered net"), ("Unetr", "is not a registered net")])
def test_unknown_demo_net_is_one_line_listing_the_nets(name, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["demo", "--net", name])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and says in err and f"--net {name!r}" in err
    assert err.endswith("choose one of: " + ", ".join(n for n in NETS.names() if n in DEMO_NETS))
    assert not list(tmp_path.iterdir())  # nothing made


def test_demo_of_another_net_on_a_tiny_set(tmp_path):
    cfg = demo_config("unet")
    cfg["preprocess"]["spacing"] = [8.0, 8.0, 8.0]
    cfg["model"].update(roi_size=[32, 32, 32], options={"features": [4, 4, 8, 8, 16, 4]})
    cfg["train"].update(epochs=1, val_every=1)
    s = run_demo(tmp_path, config=cfg, counts=(2, 1, 1), phantom_spacing=(6.0, 6.0, 6.0))
    assert s["net"] == "unet" and set(s["dice"]) == {"liver", "spleen", "kidney", "spine", "lung"}
    assert json.loads((tmp_path / "run" / "best.json").read_text())["net"]["name"] == "unet"
    assert nib.load(tmp_path / "segmentations" / "phantom_000_seg.nii.gz").shape == \
        nib.load(tmp_path / "phantoms" / "test" / "phantom_000.nii.gz").shape


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEDVIT_SKIP_FULL_DEMO") == "1", reason="MEDVIT_SKIP_FULL_DEMO=1")
def test_full_demo_reaches_target_dice_in_time(tmp_path):
    """The issue's bar: mean Dice >= 0.90 on held-out phantoms. (Its time, 10 minutes at most on
    2 cores, is printed by the demo and reported in the README, not asserted: this machine is shared.)"""
    s = run_demo(tmp_path)
    assert s["mean_dice"] >= 0.90, s["dice"]


def test_demo_net_with_lidar_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["demo", "--lidar", "--net", "unet"])
    assert done.value.code == 2 and "--net" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
