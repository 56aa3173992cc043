"""lidar segment against the checkpoint's training ranges: frame, intensity normalisation, width, --fill."""

import json
from pathlib import Path

import laspy
import numpy as np
import pytest
import torch

from pipelines.lidar.demo import write_kitti
from pointcloud.checkpoint import build_from_config, save_point_checkpoint
from pointcloud.config import parse_lidar_config
from pointcloud.ranges import training_stats
from tests.helpers import TINY_LIDAR, assert_user_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

# a sensor-frame training set: heights -2..12 m, KITTI intensity 0..0.86
TRAIN_Z, TRAIN_I = (-2.0, 12.0), (0.0, 0.86)


def tiny_stats(features=("intensity",)) -> dict:
    rng = np.random.default_rng(0)
    xyz = np.c_[rng.uniform(-30, 30, (5000, 2)), rng.uniform(*TRAIN_Z, 5000)]
    feats = rng.uniform(*TRAIN_I, (5000, len(features)))
    return training_stats([xyz], [feats], list(features), [dict.fromkeys(features, "kitti float32 as stored")])


def make_ckpt(folder: Path, stats: dict | None, **patch) -> Path:
    cfg = parse_lidar_config({**TINY_LIDAR, **patch})
    torch.manual_seed(0)
    return save_point_checkpoint(build_from_config(cfg), folder / "tiny.safetensors", config=cfg, stats=stats)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_ckpt(tmp_path_factory.mktemp("rck"), tiny_stats())


def survey_las(path: Path, n: int = 3000, seed: int = 0) -> Path:
    """An airborne-style LAS: 60 m square, heights 400..520 m, 16-bit intensity up to 56,000."""
    rng = np.random.default_rng(seed)
    las = laspy.create(point_format=1, file_version="1.2")
    las.header.scales, las.header.offsets = [0.01, 0.01, 0.01], [0.0, 0.0, 0.0]
    las.x, las.y = rng.uniform(-30, 30, n), rng.uniform(-30, 30, n)
    las.z = np.r_[rng.uniform(400, 402, n - n // 4), rng.uniform(402, 520, n // 4)]
    las.intensity = rng.integers(0, 56_000, n).astype(np.uint16)
    las.write(path)
    return path


def test_training_records_ranges_and_units(tmp_path, capsys):
    """lidar train writes the training scans' z and intensity percentiles and the intensity's unit."""
    from tests.helpers import lidar_train_set

    dl = lidar_train_set(tmp_path, n_scans=1)
    cfg = {**TINY_LIDAR, "augment": {"crop_points": 2000, "crop_size": 20.0},
           "train": {"datalist": str(dl), "output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 2}}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    code, _, err = run_cli(["lidar", "train", str(tmp_path / "c.json"), "--no-progress"], capsys)
    assert code == 0, err
    stats = json.loads((tmp_path / "run" / "last.json").read_text())["stats"]
    z = np.fromfile(tmp_path / "s0.bin", np.float32).reshape(-1, 4)[:, 2]
    assert stats["xyz"]["low"][2] == pytest.approx(np.percentile(z, 0.5), abs=1e-3)
    assert stats["xyz"]["high"][2] == pytest.approx(np.percentile(z, 99.5), abs=1e-3)
    i = stats["features"]["intensity"]
    assert 0 <= i["low"] < i["high"] <= 1 and i["unit"] == 1.0 and i["sources"] == ["kitti float32 as stored"]


def test_las_intensity_is_normalised_by_its_16_bit_range(ckpt, tmp_path):
    from pipelines.lidar.segment import checkpoint_units, scan_features
    from pointcloud.checkpoint import load_point_checkpoint
    from pointcloud.io import read_points

    m = load_point_checkpoint(ckpt)
    cloud = read_points(survey_las(tmp_path / "s.las"))
    values, how = scan_features(cloud, m.config, checkpoint_units(m.config, m.stats))["intensity"]
    assert np.allclose(values, np.asarray(laspy.read(tmp_path / "s.las").intensity) / 65535, atol=1e-6)
    assert values.max() <= 1 and "uint16 0..65535 as 0..1" in how
    old = make_ckpt(tmp_path, None)  # before ranges were recorded: intensity as stored, as it was trained
    mo = load_point_checkpoint(old)
    assert scan_features(cloud, mo.config, checkpoint_units(mo.config, mo.stats))["intensity"][0].max() > 50_000


def test_survey_heights_warn_and_z_offset_fixes_them(ckpt, tmp_path, capsys, caplog):
    scan = survey_las(tmp_path / "survey.las")
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(["lidar", "segment", str(scan), "-o", str(tmp_path / "a"), "--checkpoint", str(ckpt),
                                "--no-progress"], capsys)
    assert code == 0, err
    # (beside the range warning: the LAS classes and the format upgrade they need, said by the LAS writer)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "las_classes" not in r.getMessage()
              and "point format 1 -> 6" not in r.getMessage()]
    assert len(warned) == 1, warned
    msg = warned[0]
    assert "survey.las: z of 100 % of its points lies outside the checkpoint's training range -1.9" in msg
    assert "(this scan: 400" in msg and "--z-offset -40" in msg and "intensity" not in msg  # /65535: in range
    caplog.clear()
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(["lidar", "segment", str(scan), "-o", str(tmp_path / "b"), "--checkpoint", str(ckpt),
                                "--z-offset", "-402", "--no-progress"], capsys)
    assert code == 0, err
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "training range" in r.getMessage()], caplog.text
    out = laspy.read(tmp_path / "b" / "survey.las")
    assert np.array_equal(out.Z, laspy.read(scan).Z)  # the output keeps the file's heights
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert_user_error(["lidar", "segment", str(scan), "-o", str(tmp_path / "c"), "--checkpoint", str(ckpt),
                           "--strict"], capsys, "survey.las", "z of 100 %", "--z-offset", "(--strict)",
                          out_dir=tmp_path / "c")
    assert not caplog.records, caplog.text  # the refusal is the only line


def test_intensity_on_another_scale_warns_with_the_factor(ckpt, tmp_path, capsys, caplog):
    """A float intensity of 0..255 (nuScenes-style) against a 0..1 net, and a 0..1 one squeezed to 0..0.004."""
    rng = np.random.default_rng(1)
    xyz = np.c_[rng.uniform(-20, 20, (2000, 2)), rng.uniform(-1.5, 3, 2000)]
    write_kitti(xyz, rng.uniform(0, 255, 2000), None, tmp_path / "wide")
    write_kitti(xyz, rng.uniform(0, 0.004, 2000), None, tmp_path / "dim")
    with caplog.at_level("WARNING"):
        for name in ("wide", "dim"):
            code, _, err = run_cli(["lidar", "segment", str(tmp_path / f"{name}.bin"), "-o", str(tmp_path / name),
                                    "--checkpoint", str(ckpt), "--no-progress"], capsys)
            assert code == 0, err
    assert "wide.bin: intensity of 100 % of its points lies outside the checkpoint's training range 0.00" in caplog.text
    assert "--intensity-scale 0.00" in caplog.text and "dim.bin: intensity spans a small part of" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(["lidar", "segment", str(tmp_path / "wide.bin"), "-o", str(tmp_path / "w2"),
                                "--checkpoint", str(ckpt), "--intensity-scale", str(0.86 / 255), "--no-progress"], capsys)
    assert code == 0 and not caplog.records, caplog.text


def test_demo_config_has_a_point_range():
    from pipelines.lidar.demo import DEMO_LIDAR_CONFIG

    assert parse_lidar_config(DEMO_LIDAR_CONFIG).point_range is not None


INDOOR = ["mmdet3d/tests/data/s3dis/points/Area_1_office_2.bin", "mmdet3d/tests/data/scannet/points/scene0000_00.bin"]


@pytest.mark.parametrize("rel", INDOOR)
def test_an_indoor_six_column_bin_read_as_four_is_named(rel, ckpt, data_dir, tmp_path, capsys, caplog):
    """mmdet3d's 100-point x y z r g b samples read as KITTI's 4 columns give 150 points: warned, with the width."""
    scan = data_dir / rel
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(["lidar", "segment", str(scan), "-o", str(tmp_path / "a"), "--checkpoint", str(ckpt),
                                "--no-progress"], capsys)
    assert code == 0, err
    assert f"{scan.name}: reads as 4 float32 columns (150 points), but 6 columns (100 points) read it far better" \
        in caplog.text and "--bin-columns 6" in caplog.text
    assert len(caplog.records) == 1, caplog.text  # its values out of the training ranges follow from the width
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert_user_error(["lidar", "segment", str(scan), "-o", str(tmp_path / "b"), "--checkpoint", str(ckpt),
                           "--strict"], capsys, scan.name, "--bin-columns 6", "(--strict)", out_dir=tmp_path / "b")
    assert not caplog.records, caplog.text
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(["lidar", "segment", str(scan), "-o", str(tmp_path / "c"), "--checkpoint", str(ckpt),
                                "--bin-columns", "6", "--no-progress"], capsys)
    assert code == 0, err
    assert "columns" not in caplog.text


def test_a_written_six_column_bin_and_real_lidar_bins(data_dir, tmp_path):
    """A street-like x y z r g b file is named as 6 wide whatever the width it is read at; KITTI's and
    nuScenes' own files are left alone."""
    from pointcloud.io import read_points

    rng = np.random.default_rng(3)
    n = 3000
    xyz = np.cumsum(rng.normal(0, 0.05, (n, 3)), 0) + [12.0, -4.0, -1.5]
    rgb = rng.integers(0, 256, (n, 3))
    np.c_[xyz, rgb].astype(np.float32).tofile(tmp_path / "rgb.bin")
    for width in (None, 3, 4):
        hint = read_points(tmp_path / "rgb.bin", bin_columns=width).meta.get("width_hint")
        assert hint is not None and hint["better"] == 6, (width, hint)
    assert "width_hint" not in read_points(tmp_path / "rgb.bin", bin_columns=6).meta
    for rel in ["mmdet3d/demo/data/kitti/000008.bin", "mmdet3d/tests/data/kitti/training/velodyne/000000.bin",
                "mmdet3d/tests/data/semantickitti/sequences/00/velodyne/000000.bin",
                "mmdet3d/demo/data/nuscenes/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"]:
        assert "width_hint" not in read_points(data_dir / rel, sibling_labels=False).meta, rel


def test_fill_runs_an_intensity_net_on_an_xyz_only_pcd(ckpt, tmp_path, capsys, caplog):
    from pointcloud.io import PointCloud, write_pcd

    rng = np.random.default_rng(5)
    xyz = np.c_[rng.uniform(-20, 20, (1500, 2)), rng.uniform(-1.5, 4, 1500)]
    write_pcd(PointCloud(xyz=xyz, features=np.zeros((1500, 0)), feature_names=[]), tmp_path / "xyz.pcd")
    with caplog.at_level("WARNING"):
        msg = assert_user_error(["lidar", "segment", str(tmp_path / "xyz.pcd"), "-o", str(tmp_path / "a"),
                                 "--checkpoint", str(ckpt)], capsys, "xyz.pcd: has no 'intensity' field",
                                "--fill intensity=0.4", out_dir=tmp_path / "a")
    assert "(its training median)" in msg and not caplog.records
    with caplog.at_level("WARNING"):
        code, out, err = run_cli(["lidar", "segment", str(tmp_path / "xyz.pcd"), "-o", str(tmp_path / "b"),
                                  "--checkpoint", str(ckpt), "--fill", "intensity=0.4", "--no-progress"], capsys)
    assert code == 0, err
    lab = np.fromfile(tmp_path / "b" / "xyz.label", np.uint32)
    assert lab.shape == (1500,) and set(np.unique(lab)) <= set(range(5))
    assert "every point gets intensity 0.4 (--fill); the net was trained with it varying over 0.00" in caplog.text
    assert "less accurate" in caplog.text
    assert_user_error(["lidar", "segment", str(tmp_path / "xyz.pcd"), "-o", str(tmp_path / "c"), "--checkpoint",
                       str(ckpt), "--fill", "ring=3"], capsys, "--fill ring=3", "reads no 'ring'", out_dir=tmp_path / "c")
    assert_user_error(["lidar", "segment", str(tmp_path / "xyz.pcd"), "-o", str(tmp_path / "c"), "--checkpoint",
                       str(ckpt), "--fill", "intensity"], capsys, "--fill takes NAME=VALUE", out_dir=tmp_path / "c")


def test_fill_several_features_and_a_las_without_one(tmp_path, data_dir, capsys, caplog):
    """--fill a=1,b=2 fills several; a LAS lacking one of the net's dimensions is filled too."""
    ck = make_ckpt(tmp_path, tiny_stats(("intensity", "nir")), features={"intensity": 1.0, "nir": 1.0})
    scan = data_dir / "laspy" / "simple.las"
    assert_user_error(["lidar", "segment", str(scan), "-o", str(tmp_path / "a"), "--checkpoint", str(ck)], capsys,
                      "simple.las: has no 'nir' field", "--fill nir=", out_dir=tmp_path / "a")
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(["lidar", "segment", str(scan), "-o", str(tmp_path / "b"), "--checkpoint", str(ck),
                                "--fill", "nir=0.5,intensity=0.2", "--no-progress"], capsys)
    assert code == 0, err
    assert "every point gets nir 0.5" in caplog.text and "every point gets intensity" not in caplog.text
    assert len(laspy.read(tmp_path / "b" / "simple.las").points) == 1065


def test_a_refused_scan_prints_its_error_line_only(ckpt, tmp_path, capsys, caplog):
    """Warnings about a scan (NaN points, its frame) are said only once it is segmented: a scan that is
    then refused (no point in point_range; LAS output of NaN points; a missing feature) prints one line."""
    ck = make_ckpt(tmp_path, tiny_stats(), point_range=[-10, -10, -5, 10, 10, 5])
    rng = np.random.default_rng(9)
    xyz = rng.uniform(0, 50, (500, 3)) + [500000.0, 5400000.0, 100.0]
    xyz[:40, 0] = np.nan
    write_kitti(xyz, rng.uniform(0, 1, 500), None, tmp_path / "utm")
    from pointcloud.io import PointCloud, write_pcd

    near = rng.uniform(-5, 5, (300, 3))
    near[:7] = np.nan
    write_pcd(PointCloud(xyz=near, features=np.zeros((300, 0)), feature_names=[]), tmp_path / "bare.pcd")
    write_kitti(near, rng.uniform(0, 1, 300), None, tmp_path / "near")
    cases = [(tmp_path / "utm.bin", ck, [], "no point lies inside"),
             (tmp_path / "near.bin", ckpt, ["--format", "las"], "which a LAS file cannot store"),
             (tmp_path / "bare.pcd", ckpt, [], "--fill intensity=")]
    for scan, c, more, needle in cases:
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert_user_error(["lidar", "segment", str(scan), "-o", str(tmp_path / "o"), "--checkpoint", str(c), *more],
                              capsys, scan.name, needle, out_dir=tmp_path / "o")
        assert not caplog.records, (scan.name, caplog.text)


def test_survey_heights_against_a_point_range_name_the_offset(tmp_path, capsys):
    """With a point_range (the demo's config has one) a survey at absolute heights is refused, naming --z-offset."""
    ck = make_ckpt(tmp_path, tiny_stats(), point_range=[-50, -50, -5, 50, 50, 40])
    scan = survey_las(tmp_path / "survey.las")
    msg = assert_user_error(["lidar", "segment", str(scan), "-o", str(tmp_path / "a"), "--checkpoint", str(ck)], capsys,
                            "no point lies inside the checkpoint's point_range", "only its heights lie outside",
                            out_dir=tmp_path / "a")
    offset = float(msg.split("--z-offset ")[1].split()[0])
    assert -402.5 < offset < -401.5
    code, _, err = run_cli(["lidar", "segment", str(scan), "-o", str(tmp_path / "b"), "--checkpoint", str(ck),
                            "--z-offset", str(offset), "--no-progress"], capsys)
    assert code == 0, err
    out = laspy.read(tmp_path / "b" / "survey.las")
    # above point_range: unlabelled, LAS class 1; the rest train id + 64 (the checkpoint has no las_classes)
    cls, high = np.asarray(out.classification), np.asarray(out.z) + offset >= 40
    assert high.any() and (cls[high] == 1).all() and ((cls[~high] >= 64) & (cls[~high] < 69)).all()


def test_a_label_file_of_another_length_names_the_width_that_fits(tmp_path):
    from medvit.core.errors import InputError
    from pointcloud.io import read_points, write_labels

    rng = np.random.default_rng(4)
    xyz = np.cumsum(rng.normal(0, 0.05, (400, 3)), 0) + [8.0, 2.0, -1.0]
    np.c_[xyz, rng.integers(0, 256, (400, 3))].astype(np.float32).tofile(tmp_path / "room.bin")
    write_labels(np.zeros(400, np.int64), tmp_path / "room.label")
    with pytest.raises(InputError, match="holds 400 labels but the scan .* has 600 points as 4 float32 columns; "
                                         "read as 6 columns, which fit its values far better, it has 400"):
        read_points(tmp_path / "room.bin", label_path=tmp_path / "room.label")
