"""medvit.core: what both sides share, without torch or MONAI at import; one Registry for both."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from medvit.core.config import StrictModel, TrainConfig, validate_mapping
from medvit.core.errors import CheckpointError, ConfigError
from medvit.core.registry import Registry
from medvit.core.values import triple
from medvit.core.weights import FORMAT, FORMAT_VERSION, check_fit, read_weights, write_weights
from medvit.nets import NETS
from pointcloud.checkpoint import build_from_config, save_point_checkpoint
from pointcloud.config import parse_lidar_config
from pointcloud.nets import POINT_NETS

ROOT = Path(__file__).resolve().parents[1]
CORE_MODULES = ["medvit.core", "medvit.core.errors", "medvit.core.files", "medvit.core.config",
                "medvit.core.registry", "medvit.core.weights", "medvit.core.values"]


def _modules_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_core_imports_neither_torch_nor_monai():
    loaded = _modules_after("\n".join(f"import {m}" for m in CORE_MODULES))
    assert "medvit" in loaded
    assert not loaded & {"torch", "monai", "nibabel", "SimpleITK"}, loaded & {"torch", "monai", "nibabel", "SimpleITK"}


def test_pointcloud_and_a_lidar_checkpoint_load_without_monai(tmp_path):
    cfg = parse_lidar_config({"labels": {0: "ground", 1: "car"}, "features": {"intensity": 1.0}, "voxel_size": 0.5,
                              "model": {"name": "sparse_unet", "options": {"channels": [4, 4], "point_mlp": 0}}})
    ckpt = save_point_checkpoint(build_from_config(cfg), tmp_path / "tiny.safetensors", config=cfg)
    loaded = _modules_after(
        "import pointcloud, pointcloud.nets, pointcloud.io, pointcloud.config, pointcloud.checkpoint\n"
        f"m = pointcloud.checkpoint.load_point_checkpoint({str(ckpt)!r})\n"
        "assert m.net.head.out_features == 2 and m.config.labels == {0: 'ground', 1: 'car'}\n")
    assert "torch" in loaded and "pointcloud" in loaded
    assert "monai" not in loaded


# --- Registry ------------------------------------------------------------------------------------


class Box(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, size: float, width: int = 4, scale: float = 1.0,
                 mode: str = "a") -> None:
        super().__init__()
        if mode not in ("a", "b"):
            raise ValueError(f"mode must be 'a' or 'b', got {mode!r}")
        if width % 2:
            raise ValueError(f"width must be even, got {width}")
        self.lin = nn.Linear(in_channels, out_channels)
        self.size, self.width, self.scale = size, width, scale


@pytest.fixture
def boxes() -> Registry:
    reg = Registry("box net", {"in_channels": "model.in_channels", "out_channels": "labels", "size": "model.size"})
    reg.register("box")(Box)
    return reg


def test_both_sides_are_registries_with_the_same_verbs():
    for reg in (NETS, POINT_NETS):
        assert isinstance(reg, Registry)
        assert reg.names() == sorted(reg.names()) and reg.names()
        assert set(reg.fixed) >= {"in_channels", "out_channels"}
    assert "unetr" in NETS and "sparse_unet" in POINT_NETS and "unetr" not in POINT_NETS


def test_build_passes_the_fixed_arguments_and_the_options(boxes):
    net = boxes.build("box", {"width": 6, "scale": 2}, in_channels=3, out_channels=5, size=0.5)
    assert isinstance(net, Box) and net.lin.weight.shape == (5, 3)
    assert (net.size, net.width, net.scale) == (0.5, 6, 2)


@pytest.mark.parametrize(("name", "options", "message"), [
    ("boks", {}, "model.name: unknown box net 'boks'; available: box"),
    ("box", {"widht": 4}, "model.options.widht: box (Box) takes no option 'widht'; it takes: width, scale, mode"),
    ("box", {"width": "wide"}, "model.options.width: expected int, got 'wide'"),
    ("box", {"scale": True}, "model.options.scale: expected float, got True"),
    ("box", {"size": 2.0}, "model.options.size: box sets size from model.size; remove it from the options"),
    ("box", {"width": 3}, "model.options.width: box: width must be even, got 3"),
    ("box", {"mode": "c"}, "model.options.mode: box: mode must be 'a' or 'b', got 'c'"),
])
def test_refusals_name_the_key(boxes, name, options, message):
    with pytest.raises(ConfigError) as err:
        boxes.build(name, options, in_channels=3, out_channels=5, size=0.5)
    assert str(err.value) == message


def test_registry_programming_errors_keep_their_type(boxes):
    with pytest.raises(ValueError, match="already registered"):
        boxes.register("box")(lambda **kw: None)
    boxes.register("box")(Box)  # the same builder again is fine
    with pytest.raises(TypeError, match="take in_channels, out_channels, size"):
        boxes.build("box", in_channels=3, out_channels=5)


def test_the_registries_refuse_alike():
    with pytest.raises(ConfigError, match=r"^model\.name: unknown point-cloud net 'unetr'; available: .*sparse_unet"):
        POINT_NETS.build("unetr", in_channels=4, out_channels=2, voxel_size=0.1)
    with pytest.raises(ConfigError, match=r"^model\.name: unknown net 'sparse_unet'; available: .*unetr"):
        NETS.build("sparse_unet", in_channels=1, out_channels=2, roi_size=(16, 16, 16))
    with pytest.raises(ConfigError, match=r"^model\.options\.voxel_size: sparse_unet sets voxel_size from voxel_size"):
        POINT_NETS.build("sparse_unet", {"voxel_size": 1.0}, in_channels=4, out_channels=2, voxel_size=0.1)
    with pytest.raises(ConfigError, match=r"^model\.options\.roi_size: unet sets roi_size from model\.roi_size"):
        NETS.build("unet", {"roi_size": [16, 16, 16]}, in_channels=1, out_channels=2, roi_size=(16, 16, 16))


# --- config, weights, values ----------------------------------------------------------------------


class Outer(StrictModel):
    RELATIVE_PATHS = {"train": ("datalist", "data_root")}

    name: str
    train: TrainConfig | None = None


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    cfg = validate_mapping(Outer, {"name": "x", "train": {"datalist": "d/list.json", "output_dir": "out"}},
                           tmp_path / "c.yaml")
    assert cfg.train.datalist == (tmp_path / "d" / "list.json").resolve()
    assert cfg.train.output_dir == Path("out")  # outputs go where the command runs
    with pytest.raises(ConfigError, match=r"c\.yaml: key 'train\.epochs': expected a number, not a boolean"):
        validate_mapping(Outer, {"name": "x", "train": {"datalist": "d", "epochs": True}}, tmp_path / "c.yaml")


def test_weights_round_trip_checks_the_kind_and_the_fit(tmp_path):
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    sidecar = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "lidar", "net": {}, "labels": {}}
    path = write_weights(net, tmp_path / "w.safetensors", sidecar)
    state, meta = read_weights(path, kind="lidar")
    assert meta["kind"] == "lidar" and torch.equal(state["weight"], net.weight.detach())
    with pytest.raises(CheckpointError, match=r"w\.safetensors: this is a lidar checkpoint, not a volume one"):
        read_weights(path, kind="volume")
    check_fit(path, state, net, "linear")
    with pytest.raises(CheckpointError, match=r"key 'weight' has shape \(2, 3\) in the checkpoint but \(2, 4\) in lin"):
        check_fit(path, state, nn.Linear(4, 2), "lin")


@pytest.mark.parametrize(("args", "kw", "expected"), [
    ((2, "k"), {}, (2, 2, 2)),
    (([1, 2, 3], "k"), {}, (1, 2, 3)),
    ((np.array([1, 2, 3]), "k"), {}, (1, 2, 3)),
    ((0, "padding"), {"minimum": 0}, (0, 0, 0)),
    ((0.1, "voxel_size"), {"kind": float}, (0.1, 0.1, 0.1)),
    (((1, 2, 3), "v"), {"kind": float}, (1.0, 2.0, 3.0)),
])
def test_triple_accepts(args, kw, expected):
    out = triple(*args, **kw)
    assert out == expected and all(type(v) is type(expected[0]) for v in out)


@pytest.mark.parametrize(("args", "kw", "message"), [
    ((0, "stride"), {"axes": "z, y, x"}, "stride must be a positive integer or three positive integers (z, y, x), got 0"),
    ((-1, "padding"), {"minimum": 0}, "padding must be an int >= 0 or three ints >= 0 (x, y, z), got -1"),
    ((2.5, "k"), {}, "k must be a positive integer"),
    ((True, "k"), {}, "k must be a positive integer"),
    (([1, 2], "k"), {}, "got [1, 2]"),
    (([8, 8], "group_size"), {"scalar": False, "axes": "D, H, W"}, "group_size needs three positive integers (D, H, W), got [8, 8]"),
    ((4, "patch_size"), {"scalar": False, "axes": "D, H, W"}, "patch_size needs three positive integers (D, H, W), got 4"),
    (([0.1, 0, 0.1], "voxel_size"), {"kind": float}, "voxel_size must be a positive number or three positive numbers"),
    ((float("nan"), "voxel_size"), {"kind": float}, "got nan"),
])
def test_triple_refuses_naming_the_argument(args, kw, message):
    with pytest.raises(ValueError) as err:
        triple(*args, **kw)
    assert message in str(err.value)
