"""LAS/LAZ: UTM-size coordinates stay bit-exact through classification writes, point format upgrades
for classes above 31, subsets, CRS in meta, and corrupt files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import laspy
import numpy as np
import pytest
from laspy.vlrs.known import GeoKeyDirectoryVlr, WktCoordinateSystemVlr

from medvit.core.errors import InputError
from pointcloud.io import PointCloud, crop_to_range, read_points, write_las

DATA = Path(os.environ.get("MEDVIT_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
WKT = 'PROJCS["WGS 84 / UTM zone 32N",GEOGCS["WGS 84"],UNIT["metre",1]]'


@pytest.fixture()
def utm_las(tmp_path) -> Path:
    """500 points near (500000.123, 5400000.456) at 1 mm scale, point format 3, with a WKT VLR."""
    rng = np.random.default_rng(0)
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.scales = [0.001, 0.001, 0.001]
    header.offsets = [500000.0, 5400000.0, 0.0]
    header.vlrs.append(WktCoordinateSystemVlr(WKT))
    las = laspy.LasData(header)
    n = 500
    las.x = 500000.123 + rng.uniform(-50, 50, n)
    las.y = 5400000.456 + rng.uniform(-50, 50, n)
    las.z = rng.uniform(100, 120, n)
    las.intensity = rng.integers(0, 65535, n)
    las.gps_time = rng.uniform(3e8, 3.1e8, n)
    las.red, las.green, las.blue = (rng.integers(0, 65535, n) for _ in range(3))
    las.return_number, las.number_of_returns = np.ones(n, np.uint8), np.full(n, 2, np.uint8)
    las.classification = rng.integers(0, 3, n)
    las.scan_angle_rank = rng.integers(-90, 91, n)
    las.synthetic = rng.integers(0, 2, n).astype(bool)
    las.user_data = rng.integers(0, 256, n)
    las.point_source_id = rng.integers(0, 65535, n)
    path = tmp_path / "utm.las"
    las.write(path)
    return path


def test_utm_read_keeps_mm(utm_las):
    cloud = read_points(utm_las)
    ref = laspy.read(utm_las)
    np.testing.assert_array_equal(cloud.xyz[:, 0], ref.X * 0.001 + 500000.0)  # laspy's scaled float64
    np.testing.assert_array_equal(cloud.xyz[:, 1], ref.Y * 0.001 + 5400000.0)
    assert np.all(np.abs(cloud.xyz[:, 0] * 1000 - np.round(cloud.xyz[:, 0] * 1000)) < 1e-3)  # still on the mm grid
    assert cloud.meta["scale"] == [0.001] * 3 and cloud.meta["offset"] == [500000.0, 5400000.0, 0.0]
    assert cloud.meta["crs"] == {"wkt": WKT}


@pytest.mark.parametrize("top, fmt, version", [(31, 3, "1.2"), (200, 7, "1.4")])
def test_write_classification_keeps_points_bit_exact(utm_las, tmp_path, top, fmt, version):
    cloud = read_points(utm_las, fields=["intensity", "gps_time"])
    labels = np.arange(len(cloud)) % (top + 1)
    out = write_las(cloud, labels, tmp_path / "out.las")
    back = laspy.read(out)
    ref = laspy.read(utm_las)
    assert back.point_format.id == fmt and str(back.header.version) == version
    np.testing.assert_array_equal(np.asarray(back.classification), labels)
    for dim in ("X", "Y", "Z", "intensity", "gps_time", "red", "green", "blue", "return_number", "number_of_returns",
                "synthetic", "user_data", "point_source_id"):
        np.testing.assert_array_equal(np.asarray(back[dim]), np.asarray(ref[dim]), err_msg=dim)
    # the scan angle survives the upgrade: whole degrees in formats 0-5, 0.006 degree steps in 6-10
    angle = np.asarray(back.scan_angle) * 0.006 if fmt >= 6 else np.asarray(back.scan_angle_rank)
    np.testing.assert_allclose(angle, np.asarray(ref.scan_angle_rank), atol=0.003)
    np.testing.assert_array_equal(back.header.scales, ref.header.scales)
    np.testing.assert_array_equal(back.header.offsets, ref.header.offsets)
    again = read_points(out)
    np.testing.assert_array_equal(again.xyz, cloud.xyz)
    np.testing.assert_array_equal(again.labels, labels)
    assert again.meta["crs"] == {"wkt": WKT}


def test_laz_round_trip_and_protection(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    cloud = read_points(DATA / "laspy/simple.laz")
    labels = np.where(cloud.labels == 2, 2, 6)
    out = write_las(cloud, labels, tmp_path / "labelled.laz")
    assert laspy.read(out).header.are_points_compressed
    src, got = (DATA / "laspy/simple.laz").read_bytes(), out.read_bytes()
    assert got[:227] == src[:227]  # its creation date 0/0 and bounds included
    back = read_points(out)
    np.testing.assert_array_equal(back.xyz, cloud.xyz)
    np.testing.assert_array_equal(back.labels, labels)
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_las(cloud, labels, cloud.source)
    with pytest.raises(ValueError, match="0..255"):
        write_las(cloud, labels + 250, tmp_path / "x.las")
    with pytest.raises(InputError, match=r"x\.ply: LAS output must be named"):
        write_las(cloud, labels, tmp_path / "x.ply")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labelled.laz"]


def test_cropped_subset_written(utm_las, tmp_path):
    cloud = read_points(utm_las)
    c = cloud.xyz.mean(axis=0)
    cropped, outside = crop_to_range(cloud, (*(c - [20, 20, 100]), *(c + [20, 20, 100])))
    assert 0 < outside < len(cloud)
    out = write_las(cropped, np.full(len(cropped), 40), tmp_path / "crop.las")
    back = read_points(out)
    np.testing.assert_array_equal(back.xyz, cropped.xyz)
    assert back.meta["point_format"] == 7 and set(back.labels.tolist()) == {40}
    head = laspy.read(out).header  # a subset's bounds and count are its own, not the source's
    np.testing.assert_allclose(head.mins, cropped.xyz.min(0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(head.maxs, cropped.xyz.max(0), rtol=0, atol=1e-9)
    assert head.point_count == len(cropped)
    moved = cropped.select(np.arange(len(cropped)))
    moved.xyz = moved.xyz + 0.001
    with pytest.raises(ValueError, match="differs from its LAS source"):
        write_las(moved, np.zeros(len(moved), np.int64), tmp_path / "moved.las")


def test_non_las_cloud_written_at_mm(tmp_path):
    xyz = np.array([[1.0004, 2.0, 3.0], [-4.2, 5.5, 6.25], [7.0, 8.0, 9.0]])
    cloud = PointCloud(xyz=xyz, features=np.zeros((3, 0)), feature_names=[], meta={"format": "kitti"})
    back = read_points(write_las(cloud, np.array([1, 2, 40]), tmp_path / "k.las"))
    np.testing.assert_allclose(back.xyz, xyz, rtol=0, atol=5e-4 + 1e-9)
    assert back.labels.tolist() == [1, 2, 40] and back.meta["point_format"] == 6


def test_a_cloud_wider_than_int32_millimetres_gets_a_coarser_scale(tmp_path):
    """3,000 km across does not fit LAS int32 at 1 mm: that axis is written at 1 cm instead of failing."""
    xyz = np.array([[0.0, 0.0, 0.0], [3e6, 10.0, 1.0]])
    cloud = PointCloud(xyz=xyz, features=np.zeros((2, 0)), feature_names=[], meta={"format": "npy"})
    back = read_points(write_las(cloud, np.array([1, 2]), tmp_path / "wide.las"))
    assert back.meta["scale"] == [0.01, 0.001, 0.001]
    np.testing.assert_allclose(back.xyz, xyz, rtol=0, atol=0.005)


def test_corrupt_las(tmp_path, utm_las):
    raw = utm_las.read_bytes()
    (tmp_path / "cut.las").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(InputError, match=r"cut\.las: LAS file is truncated: \d+ bytes, its header promises \d+"):
        read_points(tmp_path / "cut.las")
    zero = laspy.read(utm_las)
    zero.header.scales = [0.001, 0.0, 0.001]
    zero.write(tmp_path / "zero.las")
    with pytest.raises(InputError, match=r"zero\.las: LAS header scale \[0\.001, 0\.0, 0\.001\] has a zero"):
        read_points(tmp_path / "zero.las")
    (tmp_path / "junk.las").write_bytes(b"not a las file at all" * 20)
    (tmp_path / "zeros.las").write_bytes(b"LASF" + bytes(300))  # a signature, then a header of zeros
    with pytest.raises(InputError, match=r"zeros\.las: not a readable LAS/LAZ file"):
        read_points(tmp_path / "zeros.las")
    with pytest.raises(InputError, match=r"junk\.las: not a readable LAS/LAZ file"):
        read_points(tmp_path / "junk.las")
    if DATA.is_dir():
        laz = (DATA / "laspy/simple.laz").read_bytes()
        (tmp_path / "cut.laz").write_bytes(laz[: len(laz) // 2])
        with pytest.raises(InputError, match=r"cut\.laz: LAZ data is corrupt or truncated"):
            read_points(tmp_path / "cut.laz")


def _geotiff_las(path: Path, *, point_format: int = 1) -> Path:
    """Two points at UTM 33N size with the CRS as GeoTIFF keys (laspy + pyproj write EPSG:32633 that way for
    formats 0-5)."""
    pyproj = pytest.importorskip("pyproj")
    header = laspy.LasHeader(point_format=point_format, version="1.2")
    header.add_crs(pyproj.CRS.from_epsg(32633))
    assert any(isinstance(v, GeoKeyDirectoryVlr) for v in header.vlrs)
    las = laspy.LasData(header)
    las.x, las.y, las.z = [500000.5, 500001.25], [5400000.0, 5400000.75], [1.0, 2.0]
    las.write(path)
    return path


def test_geotiff_keys_become_wkt_on_upgrade(tmp_path, caplog):
    """LAS 1.4 requires WKT for point formats 6-10: the GeoTIFF keys are converted, the WKT bit set."""
    import pyproj

    cloud = read_points(_geotiff_las(tmp_path / "g.las"))
    assert cloud.meta["crs"] == {"epsg": 32633} and cloud.meta["point_format"] == 1
    with caplog.at_level("WARNING", logger="pointcloud.io"):
        out = write_las(cloud, np.array([3, 64]), tmp_path / "g64.las")
    assert not any("GeoTIFF" in r.getMessage() for r in caplog.records)
    back = laspy.read(out)
    assert back.point_format.id == 6 and back.header.global_encoding.wkt
    wkt = [v for v in back.header.vlrs if isinstance(v, WktCoordinateSystemVlr)]
    assert len(wkt) == 1 and not any(isinstance(v, GeoKeyDirectoryVlr) for v in back.header.vlrs)
    assert wkt[0].string.startswith('PROJCS["WGS 84 / UTM zone 33N"')  # WKT1, as LAS 1.4 names it
    assert back.header.parse_crs().to_epsg() == 32633 == pyproj.CRS.from_wkt(wkt[0].string).to_epsg()
    again = read_points(out)
    np.testing.assert_array_equal(again.xyz, cloud.xyz)
    assert again.labels.tolist() == [3, 64]


def test_upgrade_keeps_an_existing_wkt_and_sets_its_bit(utm_las, tmp_path):
    back = laspy.read(write_las(read_points(utm_las), np.full(500, 40), tmp_path / "w.las"))
    assert back.point_format.id == 7 and back.header.global_encoding.wkt
    assert [v.string for v in back.header.vlrs if isinstance(v, WktCoordinateSystemVlr)] == [WKT]


def test_geotiff_keys_pyproj_cannot_convert_are_kept_with_a_warning(tmp_path, caplog):
    keys = np.array([1, 1, 0, 2,  1024, 0, 1, 1,  3072, 0, 1, 32767], dtype="<u2")  # a user-defined projection
    vlr = GeoKeyDirectoryVlr()
    vlr.parse_record_data(keys.tobytes())
    header = laspy.LasHeader(point_format=1, version="1.2")
    header.vlrs.append(vlr)
    las = laspy.LasData(header)
    las.x, las.y, las.z = [500000.5, 500001.25], [5400000.0, 5400000.75], [1.0, 2.0]
    las.write(tmp_path / "u.las")
    cloud = read_points(tmp_path / "u.las")
    with caplog.at_level("WARNING", logger="pointcloud.io"):
        out = write_las(cloud, np.array([3, 64]), tmp_path / "u64.las")
    said = [r.getMessage() for r in caplog.records if "GeoTIFF" in r.getMessage()]
    assert len(said) == 1 and "without the WKT LAS 1.4 requires" in said[0] and "no EPSG CRS" in said[0]
    back = laspy.read(out)
    assert back.point_format.id == 6 and not back.header.global_encoding.wkt
    assert any(isinstance(v, GeoKeyDirectoryVlr) for v in back.header.vlrs)
    assert read_points(out).labels.tolist() == [3, 64]


def test_without_pyproj_geotiff_keys_are_kept_with_a_warning(tmp_path, caplog, monkeypatch):
    cloud = read_points(_geotiff_las(tmp_path / "g.las"))
    monkeypatch.setitem(sys.modules, "pyproj", None)  # import pyproj now raises ImportError
    monkeypatch.setitem(sys.modules, "pyproj.exceptions", None)
    with caplog.at_level("WARNING", logger="pointcloud.io"):
        out = write_las(cloud, np.array([3, 64]), tmp_path / "g64.las")
    assert any("pyproj, which converts them to WKT, is not installed" in r.getMessage() for r in caplog.records)
    back = laspy.read(out)
    assert back.point_format.id == 6 and not back.header.global_encoding.wkt
    assert read_points(out).meta["crs"] == {"epsg": 32633}
