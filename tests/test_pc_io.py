"""Scan readers on the real sample scans, label files, non-finite points, ranges and bad inputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from medvit.core.errors import InputError
from pointcloud.io import (
    PointCloud,
    crop_to_range,
    points_in_range,
    read_label_file,
    read_points,
    to_file_order,
    write_labels,
)

DATA = Path(os.environ.get("MEDVIT_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
KITTI = "mmdet3d/demo/data/kitti/000008.bin"
NUSC = "mmdet3d/demo/data/nuscenes/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin"
SEMKITTI = "mmdet3d/tests/data/semantickitti/sequences/00"
F32 = np.float32


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (set MEDVIT_TEST_DATA)")
    return DATA


def _check_ranges(cloud: PointCloud, col_min, col_max, atol: float = 0.0) -> None:
    """Column minima/maxima of [x, y, z, features...] match the manifest's values."""
    table = np.concatenate([cloud.xyz, cloud.features.astype(np.float64)], axis=1)
    np.testing.assert_allclose(table.min(axis=0), np.asarray(col_min, F32), rtol=0, atol=atol)
    np.testing.assert_allclose(table.max(axis=0), np.asarray(col_max, F32), rtol=0, atol=atol)


def test_kitti_demo_scan(data):
    cloud = read_points(data / KITTI)
    assert cloud.xyz.shape == (17238, 3) and cloud.xyz.dtype == np.float64
    assert cloud.features.dtype == np.float32 and cloud.feature_names == ["intensity"]
    assert cloud.labels is None and cloud.meta["format"] == "kitti" and cloud.meta["n_points_file"] == 17238
    _check_ranges(cloud, [2.8889999389648438, -26.420000076293945, -3.6070001125335693, 0.0],
                  [76.83499908447266, 10.277999877929688, 2.865999937057495, 0.9900000095367432])
    raw = np.fromfile(data / KITTI, dtype=F32).reshape(-1, 4)
    np.testing.assert_array_equal(cloud.xyz, raw[:, :3])  # float32 -> float64 is exact


def test_nuscenes_demo_sweep_has_32_rings(data):
    cloud = read_points(data / NUSC)
    assert cloud.xyz.shape == (34688, 3) and cloud.feature_names == ["intensity", "ring"]
    assert cloud.meta["format"] == "nuscenes"
    np.testing.assert_array_equal(np.unique(cloud.feature("ring")), np.arange(32, dtype=F32))
    _check_ranges(cloud, [-57.99599838256836, -96.29000091552734, -3.4170000553131104, 0.0, 0.0],
                  [96.85299682617188, 98.59200286865234, 19.027999877929688, 255.0, 31.0],
                  atol=5e-4)  # the manifest rounds this sweep's coordinates to mm (file: -57.995846...)


@pytest.mark.parametrize("name, n, x_min, ring_max", [
    ("mmdet3d/tests/data/kitti/training/velodyne/000000.bin", 800, 11.569999694824219, None),
    ("mmdet3d/tests/data/nuscenes/samples/LIDAR_TOP/"
     "n015-2018-08-02-17-16-37+0800__LIDAR_TOP__1533201470948018.pcd.bin", 100, -22.03499984741211, 31.0),
])
def test_small_test_scans(data, name, n, x_min, ring_max):
    cloud = read_points(data / name)
    assert len(cloud) == n
    assert abs(cloud.xyz[:, 0].min() - x_min) < 5e-4  # manifest values are rounded to mm
    if ring_max is not None:
        assert cloud.feature("ring").max() == ring_max


def test_semantickitti_labels_found_beside_scan(data):
    cloud = read_points(data / SEMKITTI / "velodyne" / "000000.bin")
    assert len(cloud) == 50
    assert Path(cloud.meta["label_path"]) == data / SEMKITTI / "labels" / "000000.label"
    ids, counts = np.unique(cloud.labels, return_counts=True)
    assert dict(zip(ids.tolist(), counts.tolist())) == {0: 2, 50: 25, 52: 1, 70: 17, 71: 3, 80: 2}
    assert cloud.instance.dtype == np.int64 and set(cloud.instance.tolist()) == {0}
    raw = np.fromfile(data / SEMKITTI / "labels" / "000000.label", dtype=np.uint32)
    np.testing.assert_array_equal(cloud.labels, raw & 0xFFFF)


def test_las_and_laz_read_identically(data):
    las = read_points(data / "laspy/simple.las")
    laz = read_points(data / "laspy/simple.laz")
    assert len(las) == len(laz) == 1065
    np.testing.assert_array_equal(las.xyz, laz.xyz)
    np.testing.assert_array_equal(las.features, laz.features)
    assert las.feature_names == ["intensity"]
    assert dict(zip(*[a.tolist() for a in np.unique(las.labels, return_counts=True)])) == {1: 789, 2: 276}
    np.testing.assert_allclose(las.xyz.min(axis=0), [635619.85, 848899.7, 406.59], rtol=0, atol=1e-9)
    np.testing.assert_allclose(las.xyz.max(axis=0), [638982.55, 853535.43, 586.38], rtol=0, atol=1e-9)
    assert (las.meta["format"], laz.meta["format"]) == ("las", "laz")
    assert las.meta["scale"] == [0.01] * 3 and las.meta["point_format"] == 3 and las.meta["version"] == "1.2"


def test_las_fields(data):
    cloud = read_points(data / "laspy/simple.laz", fields=["red", "green", "blue", "gps_time", "return_number"])
    assert cloud.feature_names == ["red", "green", "blue", "gps_time", "return_number"]
    import laspy

    ref = laspy.read(data / "laspy/simple.las")
    for name in cloud.feature_names:
        np.testing.assert_array_equal(cloud.feature(name), np.asarray(ref[name], dtype=F32))
    assert cloud.feature("return_number").min() >= 1 and cloud.feature("red").max() == 249
    with pytest.raises(InputError, match=r"simple\.las.*no field nir"):
        read_points(data / "laspy/simple.las", fields=["intensity", "nir"])


@pytest.mark.parametrize("name, n, lo, hi", [
    ("pcl/bunny.pcd", 397, [-0.094, 0.037, -0.055], [0.06, 0.184, 0.058]),
    ("pcl/lamppost.pcd", 1771, [-11.172, -0.375, -5.448], [-9.766, 0.594, 0.467]),
])
def test_pcd_ascii_old_headers(data, name, n, lo, hi):
    cloud = read_points(data / name)
    assert len(cloud) == n and cloud.feature_names == [] and cloud.meta["pcd_data"] == "ascii"
    np.testing.assert_allclose(cloud.xyz.min(axis=0), lo, atol=5e-4)
    np.testing.assert_allclose(cloud.xyz.max(axis=0), hi, atol=5e-4)
    first = (data / name).read_text().split("DATA ascii")[1].split("\n")[1]
    np.testing.assert_array_equal(cloud.xyz[0], np.array(first.split(), dtype=F32))


def test_ply_mesh_vertices(data):
    cloud = read_points(data / "ply/trimesh_bunny.ply")
    assert len(cloud) == 8171 and cloud.feature_names == ["confidence", "intensity"]
    # the manifest rounds to 0.1 mm
    np.testing.assert_allclose(cloud.xyz.min(axis=0), [-0.0946, 0.0334, -0.0619], rtol=0, atol=5e-5)
    np.testing.assert_allclose(cloud.xyz.max(axis=0), [0.0609, 0.1866, 0.0587], rtol=0, atol=5e-5)
    np.testing.assert_array_equal(cloud.xyz[0], np.array([-0.036872, 0.127727, 0.00440925], F32))
    np.testing.assert_allclose(cloud.features[0], [0.850855, 0.5], atol=1e-6)  # first vertex row
    assert cloud.meta["ply_elements"] == {"vertex": 8171, "face": 16301}


@pytest.mark.parametrize("order", ["<", ">"])
def test_ply_every_property_type_is_read(order, tmp_path):
    """open3d's reader dropped ushort/short/uint/char properties without a word (a ushort intensity)."""
    dt = np.dtype([("x", order + "f8"), ("y", order + "f8"), ("z", order + "f4"), ("intensity", order + "u2"),
                   ("s", order + "i2"), ("u", order + "u4"), ("c", "i1"), ("red", "u1"), ("label", order + "i4")])
    rows = np.zeros(3, dt)
    rows["x"], rows["y"], rows["z"] = [500000.125, 1.5, 2.0], [4000000.25, 0, 0], [1.5, 2.5, 3.5]
    rows["intensity"], rows["s"], rows["u"], rows["c"], rows["red"], rows["label"] = \
        [65535, 7, 0], -3, 4_000_000_000, -5, 200, [1, 2, 3]
    kinds = {"f8": "double", "f4": "float", "u2": "ushort", "i2": "short", "u4": "uint", "i1": "char", "u1": "uchar", "i4": "int"}
    props = "".join(f"property {kinds[dt[n].str[1:]]} {n}\n" for n in dt.names)
    fmt = "binary_little_endian" if order == "<" else "binary_big_endian"
    (tmp_path / "s.ply").write_bytes(f"ply\nformat {fmt} 1.0\nelement vertex 3\n{props}end_header\n".encode() + rows.tobytes())
    cloud = read_points(tmp_path / "s.ply")
    assert cloud.feature_names == ["intensity", "s", "u", "c", "r"]
    np.testing.assert_array_equal(cloud.xyz[:, 0], [500000.125, 1.5, 2.0])  # doubles stay doubles
    np.testing.assert_array_equal(cloud.feature("intensity"), [65535, 7, 0])
    np.testing.assert_array_equal(cloud.features[0, 1:], [-3, 4e9, -5, 200])
    assert cloud.labels.tolist() == [1, 2, 3]


def test_npy_plain_and_structured(tmp_path):
    arr = np.arange(20, dtype=np.float64).reshape(4, 5)
    np.save(tmp_path / "a.npy", arr)
    cloud = read_points(tmp_path / "a.npy")
    assert cloud.feature_names == ["f0", "f1"]
    np.testing.assert_array_equal(cloud.xyz, arr[:, :3])
    rec = np.zeros(3, dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), ("intensity", "f4"), ("label", "u2")])
    rec["x"], rec["intensity"], rec["label"] = [1, 2, 3], [0.5, 0.25, 1], [7, 8, 9]
    np.save(tmp_path / "s.npy", rec)
    cloud = read_points(tmp_path / "s.npy", fields=["intensity"])
    assert cloud.feature_names == ["intensity"] and cloud.labels.tolist() == [7, 8, 9]
    np.testing.assert_array_equal(cloud.xyz[:, 0], [1, 2, 3])
    # fields that are not one number a point, and labels that are not whole numbers (found by review)
    for name, extra in [("text", ("name", "U4")), ("triple", ("rgb", "f4", (3,)))]:
        bad = np.zeros(2, dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), extra])
        np.save(tmp_path / f"{name}.npy", bad)
        with pytest.raises(InputError, match=rf"{name}\.npy: structured \.npy field '{extra[0]}' is .*one number a point"):
            read_points(tmp_path / f"{name}.npy")
    rec = np.zeros(2, dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), ("label", "f4")])
    rec["label"] = [1, np.nan]
    np.save(tmp_path / "nanlabel.npy", rec)
    with pytest.raises(InputError, match=r"nanlabel\.npy: field 'label' holds nan"):
        read_points(tmp_path / "nanlabel.npy")
    with pytest.raises(InputError, match=r"is a folder, not a scan file"):
        read_points(tmp_path)


def test_nonfinite_dropped_with_kept_index(tmp_path, caplog):
    pts = np.arange(40, dtype=F32).reshape(10, 4)
    pts[2, 0], pts[5, 2], pts[9, 1] = np.nan, np.inf, -np.inf
    scan = tmp_path / "seq" / "velodyne" / "000001.bin"
    scan.parent.mkdir(parents=True)
    pts.tofile(scan)
    (tmp_path / "seq" / "labels").mkdir()
    semantic = np.arange(10) + 40
    write_labels(semantic, tmp_path / "seq" / "labels" / "000001.label", instance=np.arange(10) % 3)
    with caplog.at_level(logging.WARNING, logger="pointcloud.io"):
        cloud = read_points(scan)
    assert len([r for r in caplog.records if "dropped 3 of 10" in r.getMessage()]) == 1
    assert cloud.meta["dropped_nonfinite"] == 3 and cloud.meta["n_points_file"] == 10
    np.testing.assert_array_equal(cloud.meta["kept_index"], [0, 1, 3, 4, 6, 7, 8])
    np.testing.assert_array_equal(cloud.labels, semantic[cloud.meta["kept_index"]])
    np.testing.assert_array_equal(cloud.instance, (np.arange(10) % 3)[cloud.meta["kept_index"]])
    np.testing.assert_array_equal(cloud.feature("intensity"), pts[[0, 1, 3, 4, 6, 7, 8], 3])
    # predictions for the kept points go back to the file's order and count
    back = to_file_order(cloud, cloud.labels, fill=0)
    np.testing.assert_array_equal(back, np.where(np.isin(np.arange(10), [2, 5, 9]), 0, semantic))
    with pytest.raises(InputError, match=r"000001\.bin: 3 of 10 points have NaN or infinite"):
        read_points(scan, nonfinite="error")


def test_label_round_trip_with_instances(tmp_path):
    rng = np.random.default_rng(0)
    semantic, inst = rng.integers(0, 260, 1000), rng.integers(0, 65536, 1000)
    out = write_labels(semantic, tmp_path / "x.label", instance=inst)
    raw = np.fromfile(out, dtype="<u4")
    np.testing.assert_array_equal(raw, semantic.astype(np.uint32) | (inst.astype(np.uint32) << 16))
    s, i = read_label_file(out)
    np.testing.assert_array_equal(s, semantic)
    np.testing.assert_array_equal(i, inst)
    npy = write_labels(semantic, tmp_path / "x.npy")
    assert np.load(npy).dtype == np.uint16 and np.array_equal(read_label_file(npy)[0], semantic)
    s, i = read_label_file(write_labels(semantic, tmp_path / "y.npy", instance=inst))
    assert np.array_equal(s, semantic) and np.array_equal(i, inst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.label", "x.npy", "y.npy"]  # no temp files left
    with pytest.raises(ValueError, match="0..65535"):
        write_labels(np.array([70000]), tmp_path / "big.label")
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_labels(semantic, tmp_path / "x.label", protect=[tmp_path / "x.label"])
    with pytest.raises(InputError, match=r"\.label.*or \.npy"):
        write_labels(semantic, tmp_path / "x.txt")


def test_range_and_crop(tmp_path):
    xyz = np.array([[0, 0, 0], [1, 1, 1], [2, 0.5, 0.5], [-0.1, 0.5, 0.5], [0.5, 0.5, 2.0], [0.5, 0.5, 1.99]])
    cloud = PointCloud(xyz=xyz, features=np.arange(6, dtype=F32)[:, None], feature_names=["i"],
                       labels=np.arange(6), meta={"n_points_file": 6})
    rng = (0, 0, 0, 2, 2, 2)
    np.testing.assert_array_equal(points_in_range(cloud, rng), [True, True, False, False, False, True])
    np.testing.assert_array_equal(points_in_range(xyz, rng), points_in_range(cloud, rng))
    cropped, outside = crop_to_range(cloud, rng)
    assert outside == 3 and len(cropped) == 3
    np.testing.assert_array_equal(cropped.meta["kept_index"], [0, 1, 5])
    np.testing.assert_array_equal(cropped.feature("i"), [0, 1, 5])
    again, outside = crop_to_range(cropped, (0.5, 0, 0, 2, 2, 2))  # kept_index composes through crops
    assert outside == 1 and again.meta["kept_index"].tolist() == [1, 5]
    assert to_file_order(again, np.array([7, 9])).tolist() == [0, 7, 0, 0, 0, 9]
    with pytest.raises(ValueError, match="min < max"):
        points_in_range(cloud, (0, 0, 0, 1, -1, 1))


def test_bad_inputs(tmp_path, data):
    with pytest.raises(InputError, match=r"nothing\.bin: file not found"):
        read_points(tmp_path / "nothing.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.bin: holds no points"):
        read_points(tmp_path / "empty.bin")
    bad = tmp_path / "odd.bin"
    bad.write_bytes(np.zeros(4 * 7, F32).tobytes() + b"abc")  # 7 points and 3 bytes
    with pytest.raises(InputError, match=r"odd\.bin: file size 115 bytes is not a multiple of the 16-byte "
                                         r"kitti point.*7 whole records and 3 bytes left over"):
        read_points(bad)
    nus = tmp_path / "odd.pcd.bin"
    nus.write_bytes(np.zeros(5 * 3, F32).tobytes() + b"\0" * 8)
    with pytest.raises(InputError, match=r"68 bytes is not a multiple of the 20-byte nuscenes.*8 bytes left"):
        read_points(nus)
    with pytest.raises(InputError, match=r"scan\.xyz: unknown point-cloud suffix; supported: KITTI.*\.las, \.laz"):
        (tmp_path / "scan.xyz").write_text("1 2 3\n")
        read_points(tmp_path / "scan.xyz")
    with pytest.raises(InputError, match=r"000000\.label: holds 50 labels but the scan .*000008\.bin has 17238 points"):
        read_points(data / KITTI, label_path=data / SEMKITTI / "labels" / "000000.label")
    np.zeros((5, 2)).tofile(tmp_path / "flat.npy")
    with pytest.raises(InputError, match=r"flat\.npy: not a readable \.npy"):
        read_points(tmp_path / "flat.npy")
    np.save(tmp_path / "thin.npy", np.zeros((5, 2)))
    with pytest.raises(InputError, match=r"thin\.npy: expected an \(N, >=3\)"):
        read_points(tmp_path / "thin.npy")
    all_nan = tmp_path / "nan.bin"
    np.full((3, 4), np.nan, F32).tofile(all_nan)
    with pytest.raises(InputError, match="all 3 points have NaN"):
        read_points(all_nan)


def test_ply_colours_labels_and_corrupt_files(tmp_path):
    rows = "\n".join(f"{i} {2 * i} {-i} {10 * i} 20 30 {i % 3}" for i in range(5))
    head = ("ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nproperty float y\nproperty float z\n"
            "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty int label\nend_header\n")
    (tmp_path / "c.ply").write_text(head + rows + "\n")
    cloud = read_points(tmp_path / "c.ply")
    assert cloud.feature_names == ["r", "g", "b"] and cloud.labels.tolist() == [0, 1, 2, 0, 1]
    np.testing.assert_array_equal(cloud.features[:, 0], [0, 10, 20, 30, 40])
    np.testing.assert_array_equal(cloud.xyz[:, 1], [0, 2, 4, 6, 8])
    (tmp_path / "short.ply").write_text(head + "\n".join(rows.split("\n")[:3]) + "\n")
    with pytest.raises(InputError, match=r"short\.ply: PLY ascii data ends at row 3 of element 'vertex', the header promises 5"):
        read_points(tmp_path / "short.ply")
    # open3d only prints a warning for these and hands back garbage coordinates (found by review)
    (tmp_path / "text.ply").write_text(head + rows.replace("2 -1", "a -1") + "\n")
    with pytest.raises(InputError, match=r"text\.ply: PLY ascii row 1 of element 'vertex' holds a non-numeric value"):
        read_points(tmp_path / "text.ply")
    (tmp_path / "narrow.ply").write_text(head + rows.replace(" 20 30 1\n", " 20 1\n") + "\n")
    with pytest.raises(InputError, match=r"narrow\.ply: PLY ascii row 1 of element 'vertex' holds 6 values, its 7"):
        read_points(tmp_path / "narrow.ply")
    (tmp_path / "nan_label.ply").write_text(head.replace("int label", "float label") + rows.replace(" 30 2\n", " 30 nan\n") + "\n")
    with pytest.raises(InputError, match=r"nan_label\.ply: field 'label' holds nan, which is not a whole-number label"):
        read_points(tmp_path / "nan_label.ply")
    (tmp_path / "none.ply").write_text(head.replace("vertex 5", "vertex 0"))
    with pytest.raises(InputError, match=r"none\.ply: holds no points"):
        read_points(tmp_path / "none.ply")
    (tmp_path / "negative.ply").write_text(head.replace("vertex 5", "vertex -3"))
    with pytest.raises(InputError, match=r"negative\.ply: corrupt PLY header line: element vertex -3"):
        read_points(tmp_path / "negative.ply")
    binary = ("ply\nformat binary_little_endian 1.0\nelement vertex 4\nproperty float x\nproperty float y\n"
              "property float z\nend_header\n").encode()
    (tmp_path / "cut.ply").write_bytes(binary + np.zeros(10, F32).tobytes())
    with pytest.raises(InputError, match=r"cut\.ply: PLY binary data holds 40 bytes, the header promises at least 48"):
        read_points(tmp_path / "cut.ply")
    # a face list before the vertices: its rows are walked to find where the vertices start
    faces_first = ("ply\nformat binary_little_endian 1.0\nelement face 2\nproperty list uchar int vertex_indices\n"
                   "element vertex 3\nproperty float x\nproperty float y\nproperty float z\nend_header\n").encode()
    face = np.array([3], np.uint8).tobytes() + np.array([0, 1, 2], "<i4").tobytes()
    xyz = np.arange(9, dtype="<f4").tobytes()
    (tmp_path / "faces_first.ply").write_bytes(faces_first + face * 2 + xyz)
    np.testing.assert_array_equal(read_points(tmp_path / "faces_first.ply").xyz, np.arange(9.0).reshape(3, 3))
    (tmp_path / "faces_cut.ply").write_bytes(faces_first + face * 2 + xyz[:20])
    with pytest.raises(InputError, match=r"faces_cut\.ply: PLY binary data holds 46 bytes, the header promises at least 62"):
        read_points(tmp_path / "faces_cut.ply")
    (tmp_path / "faces.ply").write_text("ply\nformat ascii 1.0\nelement face 0\nproperty list uchar int "
                                        "vertex_indices\nend_header\n")
    with pytest.raises(InputError, match=r"faces\.ply: PLY has no vertex element"):
        read_points(tmp_path / "faces.ply")
    (tmp_path / "no.ply").write_text("solid cube\n")
    with pytest.raises(InputError, match=r"no\.ply: not a PLY file"):
        read_points(tmp_path / "no.ply")


def test_a_transposed_npy_is_warned_about_and_missing_fields_listed_short(tmp_path, caplog):
    np.save(tmp_path / "t.npy", np.zeros((4, 2000), np.float32))  # (columns, points) by mistake
    with caplog.at_level(logging.WARNING):
        cloud = read_points(tmp_path / "t.npy")
    assert len(cloud) == 4 and "reads as 4 points of 2000 columns" in caplog.text
    with pytest.raises(InputError, match=r"no field intensity .*\(it has f0, f1, .*f9, \.\.\. \(1997 in all\)\)"):
        read_points(tmp_path / "t.npy", fields=["intensity"])


def test_the_scan_formats_table_names_every_suffix_longest_first(tmp_path):
    from pointcloud.io.readers import FORMATS, SUPPORTED, detect_format, scan_stem

    for fmt in FORMATS:
        for suffix in fmt.suffixes:
            assert detect_format(tmp_path / f"SCAN{suffix.upper()}") == fmt.key
            assert scan_stem(f"a.b{suffix}") == "a.b"
        assert fmt.described in SUPPORTED
    assert detect_format("x.pcd.bin") == "nuscenes" and scan_stem("x.pcd.bin") == "x"
    assert scan_stem("notes.txt") == "notes.txt"
    (tmp_path / "a.bin").write_bytes(bytes(16))
    with pytest.raises(ValueError, match="format must be one of kitti, nuscenes, pcd, ply, las, laz, npy"):
        read_points(tmp_path / "a.bin", format="xyz")
