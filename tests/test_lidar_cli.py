"""medvit lidar segment / train: formats, order and count of labels, and every named bad input."""

import json
from pathlib import Path

import laspy
import numpy as np
import pytest
import torch
import yaml

from pipelines.lidar.demo import write_kitti
from pointcloud.checkpoint import build_from_config, load_point_checkpoint, save_point_checkpoint
from pointcloud.config import parse_lidar_config
from tests.helpers import TINY_LIDAR, assert_user_error, lidar_train_set, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def make_ckpt(folder: Path, **patch) -> Path:
    cfg = parse_lidar_config({**TINY_LIDAR, **patch})
    torch.manual_seed(0)
    return save_point_checkpoint(build_from_config(cfg), folder / "tiny.safetensors", config=cfg)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_ckpt(tmp_path_factory.mktemp("lck"))


def test_checkpoint_round_trip(ckpt):
    m = load_point_checkpoint(ckpt)
    assert m.config.num_classes == 5 and m.config.in_channels == 4
    from medvit.checkpoint import load_checkpoint
    from medvit.core.errors import CheckpointError

    with pytest.raises(CheckpointError, match="lidar checkpoint"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize("rel, n", [("mmdet3d/demo/data/kitti/000008.bin", 17238),
                                    ("mmdet3d/demo/data/nuscenes/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin", 34688)])
def test_segment_real_scans_keeps_order_and_count(rel, n, ckpt, data_dir, tmp_path, capsys):
    code, out, err = run_cli(["lidar", "segment", str(data_dir / rel), "-o", str(tmp_path), "--checkpoint", str(ckpt),
                              "--no-progress"], capsys)
    assert code == 0, err
    name = Path(rel).name.split(".")[0]
    lab = np.fromfile(tmp_path / f"{name}.label", dtype=np.uint32)
    assert lab.shape == (n,) and set(np.unique(lab & 0xFFFF)) <= set(range(5))
    assert f"{n:,} points" in out


def test_segment_las_writes_classification_and_keeps_coordinates(ckpt, data_dir, tmp_path, capsys):
    src = data_dir / "laspy" / "simple.las"
    code, _, err = run_cli(["lidar", "segment", str(src), "-o", str(tmp_path), "--checkpoint", str(ckpt), "--no-progress"], capsys)
    assert code == 0, err
    a, b = laspy.read(src), laspy.read(tmp_path / "simple.las")
    assert len(b.points) == 1065
    assert np.array_equal(a.X, b.X) and np.array_equal(a.Y, b.Y) and np.array_equal(a.Z, b.Z)
    assert set(np.unique(np.asarray(b.classification))) <= set(range(64, 69))  # no las_classes: train id + 64


ASPRS = {0: 2, 1: 6, 2: 64, 3: 65, 4: 5}  # ground, building, car (user), pole (user), high vegetation


def test_las_classes_map_train_ids_to_asprs_codes(tmp_path, capsys, caplog):
    """The same weights with and without ``las_classes``: LAS output holds the table's ASPRS codes, or train
    id + 64 (said once), and 1 'unclassified' for points outside point_range; the .npy of the same scan gives
    the train ids to check against. The sidecar carries the table."""
    rng = np.random.default_rng(3)
    n = 600
    header = laspy.LasHeader(point_format=1, version="1.2")
    header.scales, header.offsets = [0.001] * 3, [0.0] * 3
    las = laspy.LasData(header)
    las.x, las.y, las.z = rng.uniform(-15, 15, n), rng.uniform(-15, 15, n), rng.uniform(-3, 3, n)
    las.intensity = rng.integers(0, 3, n)
    las.classification = np.full(n, 2)
    las.write(tmp_path / "scan.las")
    rng_box = [-10, -10, -5, 10, 10, 5]
    plain = make_ckpt(tmp_path / "plain", point_range=rng_box)
    named = make_ckpt(tmp_path / "named", point_range=rng_box, las_classes=ASPRS)
    assert json.loads(named.with_suffix(".json").read_text())["config"]["las_classes"] == {str(k): v for k, v in ASPRS.items()}
    assert load_point_checkpoint(named).config.las_classes == ASPRS
    args = [str(tmp_path / "scan.las"), "--no-progress"]
    assert run_cli(["lidar", "segment", *args, "-o", str(tmp_path / "ids"), "--checkpoint", str(plain),
                    "--format", "npy"], capsys)[0] == 0
    train = np.load(tmp_path / "ids" / "scan.npy").astype(np.int64)
    outside = np.any(np.abs(laspy.read(tmp_path / "scan.las").xyz) > [10, 10, 5], 1)
    assert outside.any() and (train[outside] == 255).all() and set(train[~outside].tolist()) <= set(range(5))
    with caplog.at_level("WARNING", logger="pipelines.lidar.segment"):
        code, out, err = run_cli(["lidar", "segment", *args, "-o", str(tmp_path / "plain_out"), "--checkpoint", str(plain)], capsys)
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if "no las_classes" in r.getMessage()]
    assert len(said) == 1 and "train id + 64" in said[0] and "car 66" in said[0]
    assert f"{outside.sum()} outside point_range, labelled 1" in out
    got = np.asarray(laspy.read(tmp_path / "plain_out" / "scan.las").classification).astype(np.int64)
    np.testing.assert_array_equal(got, np.where(outside, 1, train + 64))
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipelines.lidar.segment"):
        code, _, err = run_cli(["lidar", "segment", *args, "-o", str(tmp_path / "named_out"), "--checkpoint", str(named)], capsys)
    assert code == 0, err
    assert not any("no las_classes" in r.getMessage() for r in caplog.records)
    got = laspy.read(tmp_path / "named_out" / "scan.las")
    table = np.array([ASPRS[i] for i in range(5)])
    np.testing.assert_array_equal(np.asarray(got.classification), np.where(outside, 1, table[np.where(outside, 0, train)]))
    assert got.point_format.id == 6  # car 64 and pole 65 do not fit formats 0-5


def _las_with_odd_header(path: Path, n: int = 400) -> bytes:
    """A format-3 LAS 1.2 whose header another tool could have written: creation day/year 0/0, bounds a
    metre outside the points (laspy would recompute them), its own system, software, source id and GUID."""
    rng = np.random.default_rng(11)
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales, header.offsets = [0.001] * 3, [600000.0, 4100000.0, 0.0]
    las = laspy.LasData(header)
    las.x, las.y, las.z = 600000 + rng.uniform(-8, 8, n), 4100000 + rng.uniform(-8, 8, n), rng.uniform(-2, 2, n)
    las.intensity, las.gps_time = rng.integers(0, 3, n), rng.uniform(0, 1e5, n)
    las.write(path)
    raw = bytearray(path.read_bytes())
    raw[4:6] = (77).to_bytes(2, "little")  # file source id
    raw[8:24] = bytes(range(16))  # GUID
    raw[26:58] = b"OTHER SYSTEM".ljust(32, b"\0")
    raw[58:90] = b"OTHER TOOL 1.0".ljust(32, b"\0")
    raw[90:94] = bytes(4)  # creation day and year 0/0: unknown
    lo, hi = np.array([600000 - 9, 4100000 - 9, -3.0]), np.array([600000 + 9, 4100000 + 9, 3.0])
    raw[179:227] = np.array([hi[0], lo[0], hi[1], lo[1], hi[2], lo[2]], "<f8").tobytes()
    path.write_bytes(bytes(raw))
    return bytes(raw)


def test_las_header_is_kept_byte_for_byte(tmp_path, capsys):
    """Classes that fit the format: every byte before the points equals the input's. Classes above 31
    move the file to format 7 (LAS 1.4): only the fields that move may change."""
    src = _las_with_odd_header(tmp_path / "scan.las")
    small = make_ckpt(tmp_path / "small", las_classes={0: 2, 1: 6, 2: 9, 3: 10, 4: 5})
    code, _, err = run_cli(["lidar", "segment", str(tmp_path / "scan.las"), "-o", str(tmp_path / "same"),
                            "--checkpoint", str(small), "--no-progress"], capsys)
    assert code == 0, err
    out = (tmp_path / "same" / "scan.las").read_bytes()
    n_head = int.from_bytes(src[96:100], "little")  # offset to point data: header and VLRs
    assert out[:n_head] == src[:n_head]
    assert set(np.unique(np.asarray(laspy.read(tmp_path / "same" / "scan.las").classification))) <= {2, 6, 9, 10, 5}

    wide = make_ckpt(tmp_path / "wide")  # train id + 64: above 31
    code, _, err = run_cli(["lidar", "segment", str(tmp_path / "scan.las"), "-o", str(tmp_path / "up"),
                            "--checkpoint", str(wide), "--no-progress"], capsys)
    assert code == 0, err
    up = (tmp_path / "up" / "scan.las").read_bytes()
    assert laspy.read(tmp_path / "up" / "scan.las").point_format.id == 7
    moved = {25: "version minor", 94: "header size", 95: "header size", 104: "point format", 105: "record length",
             106: "record length", **{i: "offset to points" for i in range(96, 100)},
             **{i: "legacy point counts (0 for formats 6-10)" for i in range(107, 131)}}
    differ = {i for i in range(227) if up[i] != src[i]}
    assert differ <= set(moved), sorted(differ - set(moved))
    assert up[90:94] == bytes(4) and up[179:227] == src[179:227]
    assert int.from_bytes(up[247:255], "little") == 400  # the LAS 1.4 point count


def test_nan_points_are_reported_and_written_unlabelled(ckpt, tmp_path, capsys, caplog):
    rng = np.random.default_rng(0)
    xyz = rng.uniform(-20, 20, (3000, 3))
    xyz[[5, 17], 0] = np.nan
    xyz[40, 2] = np.inf
    write_kitti(xyz, rng.uniform(0, 1, 3000), None, tmp_path / "scan")
    with caplog.at_level("WARNING"):
        code, out, err = run_cli(["lidar", "segment", str(tmp_path / "scan.bin"), "-o", str(tmp_path / "o"),
                                  "--checkpoint", str(ckpt), "--no-progress"], capsys)
    assert code == 0, err
    lab = np.fromfile(tmp_path / "o" / "scan.label", dtype=np.uint32)
    assert len(lab) == 3000 and set(lab[[5, 17, 40]]) == {255}
    assert "scan.bin -> " in out and "3,000 points" in out and "(3 with NaN/inf coordinates, labelled 255)" in out
    assert "scan.bin: 3 of 3,000 points have NaN or infinite coordinates: written as unlabelled (255)" in caplog.text
    assert "dropped" not in caplog.text


def _segment_uniform(folder: Path, ckpt: Path, n: int, half: float, seed: int, capsys):
    """``lidar segment`` on ``n`` points uniform in a cube of side ``2 * half``; ``(xyz, stdout, labels)``."""
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-half, half, (n, 3))
    write_kitti(xyz, rng.uniform(0, 1, n), None, folder / "scan")
    code, out, err = run_cli(["lidar", "segment", str(folder / "scan.bin"), "-o", str(folder / "o"), "--checkpoint",
                              str(ckpt), "--no-progress"], capsys)
    assert code == 0, err
    return xyz, out, np.fromfile(folder / "o" / "scan.label", dtype=np.uint32)


def test_points_outside_range_are_reported(tmp_path, capsys):
    ck = make_ckpt(tmp_path, point_range=[-10, -10, -5, 10, 10, 5])
    xyz, out, lab = _segment_uniform(tmp_path, ck, 2000, 20.0, 1, capsys)
    outside = ~np.all((xyz >= [-10, -10, -5]) & (xyz < [10, 10, 5]), 1)
    assert f"{int(outside.sum())} outside point_range" in out
    assert np.all(lab[outside] == 255) and np.all(lab[~outside] < 5)


def test_scan_with_no_point_in_range_is_refused(tmp_path, capsys):
    ck = make_ckpt(tmp_path, point_range=[-10, -10, -5, 10, 10, 5])
    rng = np.random.default_rng(2)
    xyz = rng.uniform(0, 50, (500, 3)) + [500000.0, 5400000.0, 100.0]  # UTM-like, far from the sensor frame
    write_kitti(xyz, rng.uniform(0, 1, 500), None, tmp_path / "utm")
    out = tmp_path / "o"
    msg = assert_user_error(["lidar", "segment", str(tmp_path / "utm.bin"), "-o", str(out), "--checkpoint", str(ck)],
                            capsys, "utm.bin", "no point lies inside", out_dir=out)
    assert "x 5e+05" in msg or "x 500" in msg


def test_bad_scans(ckpt, tmp_path, capsys):
    out = tmp_path / "o"
    (tmp_path / "empty.bin").write_bytes(b"")
    assert_user_error(["lidar", "segment", str(tmp_path / "empty.bin"), "-o", str(out), "--checkpoint", str(ckpt)],
                      capsys, "empty.bin", out_dir=out)
    (tmp_path / "odd.bin").write_bytes(np.zeros(4 * 10 + 3, np.uint8).tobytes())
    assert_user_error(["lidar", "segment", str(tmp_path / "odd.bin"), "-o", str(out), "--checkpoint", str(ckpt)],
                      capsys, "odd.bin", "43", out_dir=out)
    assert_user_error(["lidar", "segment", str(tmp_path / "none.bin"), "-o", str(out), "--checkpoint", str(ckpt)],
                      capsys, "none.bin", out_dir=out)
    assert_user_error(["lidar", "segment", str(tmp_path / "odd.bin"), "-o", str(out), "--checkpoint", str(ckpt),
                       "--max-points", "0"], capsys, "--max-points must be at least 1", out_dir=out)
    for bad in ("nan", "inf", "-5"):
        assert_user_error(["lidar", "segment", str(tmp_path / "odd.bin"), "-o", str(out), "--checkpoint", str(ckpt),
                           "--tile-size", bad], capsys, "--tile-size must be a positive number of metres", out_dir=out)
    nan = np.full((5, 4), np.nan, np.float32)
    nan.tofile(tmp_path / "allnan.bin")
    assert_user_error(["lidar", "segment", str(tmp_path / "allnan.bin"), "-o", str(out), "--checkpoint", str(ckpt)],
                      capsys, "allnan.bin", out_dir=out)


def test_ascii_pcd_with_more_lines_than_points_is_refused(ckpt, tmp_path, capsys):
    head = b"FIELDS x y z intensity\nSIZE 4 4 4 4\nTYPE F F F F\nWIDTH 2\nPOINTS 2\nDATA ascii\n"
    (tmp_path / "long.pcd").write_bytes(head + b"1 2 3 0.5\n4 5 6 0.5\n7 8 9 0.5\n")
    out = tmp_path / "o"
    assert_user_error(["lidar", "segment", str(tmp_path / "long.pcd"), "-o", str(out), "--checkpoint", str(ckpt)],
                      capsys, "long.pcd: PCD ascii data holds 3 point lines, its header's POINTS says 2", out_dir=out)


def test_nan_intensity_is_left_unlabelled_and_reported(ckpt, tmp_path, capsys):
    """A NaN in a feature the net reads crashed the voxeliser (all NaN) or labelled the point
    silently (a few): such points are now left unlabelled and counted, like NaN coordinates."""
    rng = np.random.default_rng(2)
    xyz, intensity = rng.uniform(-20, 20, (2000, 3)), rng.uniform(0, 1, 2000)
    intensity[[3, 9]] = np.nan
    intensity[11] = np.inf
    write_kitti(xyz, intensity, None, tmp_path / "scan")
    code, out, err = run_cli(["lidar", "segment", str(tmp_path / "scan.bin"), "-o", str(tmp_path / "o"), "--checkpoint",
                              str(ckpt), "--no-progress"], capsys)
    assert code == 0, err
    lab = np.fromfile(tmp_path / "o" / "scan.label", dtype=np.uint32)
    assert len(lab) == 2000 and set(lab[[3, 9, 11]]) == {255} and np.all(np.delete(lab, [3, 9, 11]) < 5)
    assert "3 with NaN/inf intensity" in out
    write_kitti(xyz, np.full(2000, np.nan), None, tmp_path / "allnan")
    code, out, err = run_cli(["lidar", "segment", str(tmp_path / "allnan.bin"), "-o", str(tmp_path / "o"), "--checkpoint",
                              str(ckpt), "--no-progress"], capsys)
    assert code == 0 and "2000 with NaN/inf intensity" in out, err


def test_outputs_never_overwrite_inputs_or_each_other(ckpt, tmp_path, capsys):
    """Checked before any scan runs (found by review): the SemanticKITTI labels read beside a
    scan were overwritten by its predictions, and two scans of one name wrote one file."""
    rng = np.random.default_rng(3)
    xyz, intensity = rng.uniform(-20, 20, (500, 3)), rng.uniform(0, 1, 500)
    seq = tmp_path / "seq"
    write_kitti(xyz, intensity, np.full(500, 40, np.uint32), seq / "velodyne" / "000")
    (seq / "labels").mkdir()
    (seq / "velodyne" / "000.label").rename(seq / "labels" / "000.label")
    truth = (seq / "labels" / "000.label").read_bytes()
    assert_user_error(["lidar", "segment", str(seq / "velodyne" / "000.bin"), "-o", str(seq / "labels"),
                       "--checkpoint", str(ckpt)], capsys, "000.label: is an input and would be overwritten")
    assert (seq / "labels" / "000.label").read_bytes() == truth
    # segmenting needs no ground truth: a label file of the wrong length beside the scan is not read
    (seq / "labels" / "000.label").write_bytes(truth[:-4])
    code, out_text, err = run_cli(["lidar", "segment", str(seq / "velodyne" / "000.bin"), "-o", str(tmp_path / "pred"),
                                   "--checkpoint", str(ckpt), "--no-progress"], capsys)
    assert code == 0, err
    assert np.fromfile(tmp_path / "pred" / "000.label", np.uint32).shape == (500,)
    for sub in ("a", "b"):
        write_kitti(xyz, intensity, None, tmp_path / sub / "scan")
    out = tmp_path / "o"
    assert_user_error(["lidar", "segment", str(tmp_path / "a" / "scan.bin"), str(tmp_path / "b" / "scan.bin"), "-o",
                       str(out), "--checkpoint", str(ckpt)], capsys, "would write the same output scan.label as",
                      out_dir=out)
    (tmp_path / "afile").write_text("")
    assert_user_error(["lidar", "segment", str(tmp_path / "a" / "scan.bin"), "-o", str(tmp_path / "afile"),
                       "--checkpoint", str(ckpt)], capsys, "afile: is a file; the output must be a folder")
    assert_user_error(["lidar", "segment", str(tmp_path / "a"), "-o", str(out), "--checkpoint", str(ckpt)],
                      capsys, "is a folder, not a scan file", out_dir=out)
    assert_user_error(["lidar", "segment", str(tmp_path / "a" / "scan.bin"), "-o", "/proc/medvit_no", "--checkpoint",
                       str(ckpt)], capsys, "/proc/medvit_no/scan.label: cannot be written")


def test_bin_columns_reads_a_six_column_bin(ckpt, data_dir, tmp_path, capsys):
    """mmdet3d's S3DIS sample .bin is 100 points of 6 float32 (x y z r g b): as KITTI's 4 it reads as
    150 points (which the width check warns about); --bin-columns 6 reads it as written."""
    scan = data_dir / "mmdet3d/tests/data/s3dis/points/Area_1_office_2.bin"
    code, out, err = run_cli(["lidar", "segment", str(scan), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                              "--bin-columns", "6", "--no-progress"], capsys)
    assert code == 0, err
    assert np.fromfile(tmp_path / "o" / "Area_1_office_2.label", np.uint32).shape == (100,)
    assert_user_error(["lidar", "segment", str(scan), "-o", str(tmp_path / "p"), "--checkpoint", str(ckpt),
                       "--bin-columns", "2"], capsys, "--bin-columns must be 3..64", out_dir=tmp_path / "p")


def test_a_plain_npy_for_an_intensity_net_says_how_to_name_the_column(ckpt, tmp_path, capsys):
    np.save(tmp_path / "plain.npy", np.random.default_rng(8).uniform(-10, 10, (300, 4)).astype(np.float32))
    assert_user_error(["lidar", "segment", str(tmp_path / "plain.npy"), "-o", str(tmp_path / "o"), "--checkpoint",
                       str(ckpt)], capsys, "has no 'intensity' field (it has: f0)",
                      "save a structured array with named fields", out_dir=tmp_path / "o")


def test_a_label_map_checkpoint_writes_raw_ids(tmp_path, capsys):
    """SemanticKITTI's tools read raw ids: with a label_map each class is written as the smallest raw id
    mapped to it (learning_map_inv), and unsegmented points as infer.unlabelled (0, 'unlabeled')."""
    raw = {10: 0, 252: 0, 40: 1, 60: 1, 50: 2, 80: 3, 70: 4}
    ckpt = make_ckpt(tmp_path, label_map=raw, point_range=[-10, -10, -5, 10, 10, 5],
                     infer={**TINY_LIDAR["infer"], "unlabelled": 0})
    xyz, _, got = _segment_uniform(tmp_path, ckpt, 800, 15.0, 5, capsys)
    got = got & 0xFFFF
    outside = np.any(np.abs(xyz) > [10, 10, 5], 1)
    assert outside.any() and (got[outside] == 0).all()
    assert set(np.unique(got[~outside]).tolist()) <= {10, 40, 50, 80, 70}


def test_las_output_of_ids_past_255_is_refused_before_the_net_runs(tmp_path, capsys):
    """Without las_classes, train ids go to LAS as id + 64: 193 classes would need class 256."""
    ck = make_ckpt(tmp_path, labels={i: f"c{i}" for i in range(193)}, infer={**TINY_LIDAR["infer"], "unlabelled": 300})
    rng = np.random.default_rng(7)
    write_kitti(rng.uniform(-20, 20, (500, 3)), rng.uniform(0, 1, 500), None, tmp_path / "scan")
    out = tmp_path / "o"
    assert_user_error(["lidar", "segment", str(tmp_path / "scan.bin"), "-o", str(out), "--checkpoint", str(ck),
                       "--format", "las"], capsys, "scan.bin: LAS classification holds 0..255: without las_classes",
                      "193 train ids as id + 64, up to 256", out_dir=out)


def test_las_output_of_a_scan_with_nan_points_is_refused(ckpt, tmp_path, capsys):
    """LAS cannot store NaN coordinates, so its output would lose the scan's point count."""
    rng = np.random.default_rng(4)
    xyz = rng.uniform(-20, 20, (500, 3))
    xyz[7, 1] = np.nan
    write_kitti(xyz, rng.uniform(0, 1, 500), None, tmp_path / "scan")
    out = tmp_path / "o"
    assert_user_error(["lidar", "segment", str(tmp_path / "scan.bin"), "-o", str(out), "--checkpoint", str(ckpt),
                       "--format", "las"], capsys, "1 points have NaN or infinite coordinates, which a LAS file cannot store",
                      out_dir=out)


def test_las_without_the_feature_the_net_needs(tmp_path, data_dir, capsys):
    ck = make_ckpt(tmp_path, features={"nir": 1.0})  # near infrared: only LAS point formats 8 and 10
    out = tmp_path / "o"
    assert_user_error(["lidar", "segment", str(data_dir / "laspy" / "simple.las"), "-o", str(out), "--checkpoint", str(ck)],
                      capsys, "simple.las", "nir", out_dir=out)


def test_lidar_train_writes_checkpoints_and_miou(tmp_path, capsys):
    dl = lidar_train_set(tmp_path)
    cfg = {**TINY_LIDAR, "augment": {"crop_points": 3000, "crop_size": 20.0},
           "train": {"datalist": str(dl), "output_dir": str(tmp_path / "run"), "epochs": 2, "batch_size": 2, "lr": 3e-3}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code, out, err = run_cli(["lidar", "train", str(p), "--no-progress"], capsys)
    assert code == 0, err
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and all(0 <= r["val_miou"] <= 1 for r in lines)
    assert set(lines[0]["val_iou"]) == set(TINY_LIDAR["labels"].values())
    assert (tmp_path / "run" / "best.safetensors").is_file() and load_point_checkpoint(tmp_path / "run" / "last.safetensors")
    code, out, err = run_cli(["lidar", "train", str(p), "--resume", "--no-progress"], capsys)  # nothing left to do
    assert code == 0 and "trained 2 epochs" in out
    assert_user_error(["lidar", "train", str(p), "--no-progress"], capsys, "already holds a training run")


def test_lidar_resume_into_a_missing_folder_creates_nothing(tmp_path, capsys):
    dl = lidar_train_set(tmp_path, n_scans=1)
    cfg = {**TINY_LIDAR, "train": {"datalist": str(dl), "output_dir": str(tmp_path / "runs" / "a"), "epochs": 1}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert_user_error(["lidar", "train", str(p), "--resume", "--no-progress"], capsys, "last_state.pt",
                      "nothing to resume: the output folder does not exist")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert_user_error(["lidar", "train", str(p), "--resume", "--no-progress"], capsys,
                      "nothing to resume: no resume checkpoint in the output folder")


def test_diverging_lidar_training_says_so(tmp_path, capsys):
    dl = lidar_train_set(tmp_path, n_scans=1)
    cfg = {**TINY_LIDAR, "augment": {"crop_points": 3000, "crop_size": 20.0},
           "train": {"datalist": str(dl), "output_dir": str(tmp_path / "run"), "epochs": 1, "batch_size": 2, "lr": 1e6}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert_user_error(["lidar", "train", str(p), "--no-progress"], capsys, "training diverged", "train.lr")


def test_label_length_mismatch_in_training_data(tmp_path, capsys):
    dl = lidar_train_set(tmp_path, n_scans=1)
    lab = np.fromfile(tmp_path / "s0.label", dtype=np.uint32)
    lab[:-3].tofile(tmp_path / "s0.label")
    cfg = {**TINY_LIDAR, "train": {"datalist": str(dl), "output_dir": str(tmp_path / "run"), "epochs": 1}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert_user_error(["lidar", "train", str(p)], capsys, "s0.label", out_dir=tmp_path / "run")


def test_training_data_with_no_usable_label_or_a_stray_far_point(tmp_path, capsys):
    dl = lidar_train_set(tmp_path, n_scans=1)
    cfg = {**TINY_LIDAR, "label_map": {90 + i: i for i in range(5)}, "train": {"datalist": str(dl), "output_dir": str(tmp_path / "run"),
                                                                         "epochs": 1}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    # no raw id of the scans is in the label map: nothing to learn (it trained on, reporting mIoU NaN)
    assert_user_error(["lidar", "train", str(p)], capsys, "dl.json", "no training scan has a point", out_dir=tmp_path / "run")
    # five points at x = 1e30 in the validation scan: planning its tiles would not end
    xyz = np.fromfile(tmp_path / "s1.bin", dtype=np.float32).reshape(-1, 4)
    xyz[:5, 0] = 1e30
    xyz.tofile(tmp_path / "s1.bin")
    p.write_text(yaml.safe_dump({**cfg, "label_map": None}))
    assert_user_error(["lidar", "train", str(p)], capsys, "s1.bin", "stray points", out_dir=tmp_path / "run")


@pytest.mark.parametrize("patch, needle", [({"labels": {0: "a", 2: "b"}}, "labels"), ({"voxel_size": -1}, "voxel_size"),
                                           ({"model": {"name": "nope"}}, "unknown point-cloud net"),
                                           ({"infer": {**TINY_LIDAR["infer"], "unlabelled": 70000}}, "unlabelled"),
                                           ({"infer": {**TINY_LIDAR["infer"], "unlabelled": 3}}, "unlabelled 3 is the train id of 'pole'"),
                                           ({"label_map": {10: 0, 11: 1, 12: 2, 13: 3, 255: 4}},
                                            "unlabelled 255 is a raw id in label_map (255 -> vegetation)"),
                                           ({"label_map": {10: 0, 11: 1}}, "maps no raw id to train ids [2, 3, 4]"),
                                           ({"loss": {"ce_weight": 0, "lovasz_weight": 0}}, "both 0"),
                                           ({"augment": {"scale": [1.05, 0.95]}}, "low <= high"),
                                           ({"labels": {0: "a"}}, "at least two classes"),
                                           ({"labels": {0: "a", 1: "b", 2: "a"}}, "labels 0 and 2 share the name 'a'"),
                                           ({"voxel_size": 1e-6}, "voxel_size"),
                                           ({"features": {"intensity": float("nan")}}, "features"),
                                           ({"las_classes": {0: 2, 1: 6, 2: 64, 3: 65}},
                                            "las_classes gives no ASPRS class to train ids [4] (vegetation)"),
                                           ({"las_classes": {0: 2, 1: 6, 2: 64, 3: 65, 4: 5, 5: 66}},
                                            "las_classes names train ids that are not labels: [5]"),
                                           ({"las_classes": {0: 2, 1: 6, 2: 64, 3: 64, 4: 5}},
                                            "las_classes gives car and pole the same class 64"),
                                           ({"las_classes": {0: 2, 1: 6, 2: 300, 3: 65, 4: 5}},
                                            "car class 300; LAS 1.4 classes are 0..255"),
                                           ({"las_classes": {0: 1, 1: 6, 2: 64, 3: 65, 4: 5}},
                                            "ground class 1, 'unclassified', given to unsegmented points"),
                                           ({"las_classes": {0: 2, 1: 6, 2: 40, 3: 65, 4: 5}},
                                            "car class 40, reserved by ASPRS")])
def test_bad_lidar_configs(patch, needle, tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**TINY_LIDAR, **patch, "train": {"datalist": "x.json"}}))
    assert_user_error(["lidar", "train", str(p)], capsys, needle)


@pytest.mark.parametrize("name", ["semantickitti_flatformer.yaml", "semantickitti_condaformer.yaml", "semantickitti_sparse_unet.yaml"])
def test_shipped_lidar_configs_build_their_nets(name):
    from pointcloud.config import load_lidar_config

    cfg = load_lidar_config(Path(__file__).resolve().parents[1] / "configs" / "lidar" / name)
    assert cfg.num_classes == 19 and cfg.label_map[252] == 0
    net = build_from_config(cfg)
    assert sum(p.numel() for p in net.parameters()) > 100_000


def test_label_ids_past_the_class_count_are_reported(tmp_path, caplog):
    """Without a label_map, ids outside 0..K-1 are ignored in training, and the scan says how many."""
    from pipelines.lidar.train import load_training_scan

    rng = np.random.default_rng(6)
    labels = np.r_[np.zeros(300, np.uint32), np.full(100, 7, np.uint32)]
    write_kitti(rng.uniform(-10, 10, (400, 3)), rng.uniform(0, 1, 400), labels, tmp_path / "s")
    cfg = parse_lidar_config(TINY_LIDAR)
    with caplog.at_level("WARNING"):
        scan = load_training_scan({"image": str(tmp_path / "s.bin"), "label": str(tmp_path / "s.label")}, cfg, -100)
    assert (scan.labels == -100).sum() == 100
    assert "100 of 400 points (25.0 %) carry label ids 7 outside the config's train ids 0..4" in caplog.text
