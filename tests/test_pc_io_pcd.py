"""PCD reader/writer (ascii, binary, binary_compressed), our LZF codec, and corrupt PCD headers."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest

from medvit.core.errors import InputError
from pointcloud.io import PointCloud, read_points, write_pcd
from pointcloud.io.lzf import LZFError, lzf_compress, lzf_decompress

DATA = Path(os.environ.get("MEDVIT_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _header(fields, sizes, types, n, data, counts=None):
    counts = counts or [1] * len(fields)
    return (f"VERSION 0.7\nFIELDS {' '.join(fields)}\nSIZE {' '.join(map(str, sizes))}\n"
            f"TYPE {' '.join(types)}\nCOUNT {' '.join(map(str, counts))}\nWIDTH {n}\nHEIGHT 1\n"
            f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {data}\n").encode()


def test_lzf_round_trip_and_overlapping_references():
    rng = np.random.default_rng(0)
    samples = [b"", b"a", b"abcabcabcabcabcabcabcabc" * 40, bytes(1000), rng.integers(0, 4, 5000, np.uint8).tobytes(),
               rng.normal(size=2000).astype(np.float32).tobytes()]
    for raw in samples:
        packed = lzf_compress(raw)
        assert lzf_decompress(packed, len(raw)) == raw
    assert len(lzf_compress(bytes(1000))) < 30  # runs become back-references of up to 264 bytes
    # hand-written stream: literal "ab", then copy 7 bytes from 2 back (overlapping) -> "ababababa"
    assert lzf_decompress(bytes([1]) + b"ab" + bytes([(5 << 5) | 0, 1]), 9) == b"ababababa"
    with pytest.raises(LZFError, match="back-reference"):
        lzf_decompress(bytes([0]) + b"a" + bytes([(1 << 5), 5]), 4)
    with pytest.raises(LZFError, match="passes the end"):
        lzf_decompress(bytes([9]) + b"abc", 10)
    with pytest.raises(LZFError, match="decodes to 3 bytes, expected 4"):
        lzf_decompress(bytes([2]) + b"abc", 4)


@pytest.mark.parametrize("encoding", ["ascii", "binary", "binary_compressed"])
def test_round_trip_against_ascii_read(tmp_path, encoding):
    """bunny.pcd (old ascii header) -> our writer -> our reader gives the same numbers."""
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    ref = read_points(DATA / "pcl/bunny.pcd")
    rng = np.random.default_rng(1)
    cloud = PointCloud(xyz=ref.xyz, features=rng.random((len(ref), 2), dtype=np.float32),
                       feature_names=["intensity", "ring"], labels=rng.integers(0, 20, len(ref)))
    out = write_pcd(cloud, tmp_path / f"b_{encoding}.pcd", data=encoding)
    assert f"DATA {encoding}\n".encode() in out.read_bytes()[:400] and b"TYPE F F F F F U" in out.read_bytes()[:400]
    back = read_points(out)
    assert back.meta["pcd_data"] == encoding and back.feature_names == ["intensity", "ring"]
    np.testing.assert_array_equal(back.xyz, ref.xyz)
    np.testing.assert_array_equal(back.features, cloud.features)
    np.testing.assert_array_equal(back.labels, cloud.labels)


def test_float64_coordinates_written_as_double(tmp_path):
    xyz = np.array([[500000.123, 5400000.456, 12.001], [500001.5, 5400002.25, 13.0]])
    out = write_pcd(PointCloud(xyz=xyz, features=np.zeros((2, 0)), feature_names=[]), tmp_path / "utm.pcd",
                    data="binary_compressed")
    assert b"SIZE 8 8 8" in out.read_bytes()[:300]
    np.testing.assert_array_equal(read_points(out).xyz, xyz)


@pytest.mark.parametrize("encoding", ["binary", "binary_compressed"])
def test_hand_made_fields_rgb_label_count(tmp_path, encoding):
    """A PCL-style file: packed float rgb, uint16 ring, a COUNT 2 field, '_' padding and a label."""
    n = 6
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4"), ("rgb", "<f4"),
                      ("ring", "<u2"), ("pad", "u1", (2,)), ("vec", "<f8", (2,)), ("label", "<u4")])
    rec = np.zeros(n, dtype)
    rec["x"], rec["y"], rec["z"] = np.arange(n), np.arange(n) * 2, -np.arange(n)
    rec["intensity"] = np.linspace(0, 1, n)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3], [200, 100, 50], [7, 7, 7]], np.uint32)
    rec["rgb"] = ((colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]).view(np.float32)
    rec["ring"], rec["vec"], rec["label"] = [0, 1, 31, 2, 3, 65535], np.arange(2 * n).reshape(n, 2), [3, 1, 4, 1, 5, 9]
    head = _header(["x", "y", "z", "intensity", "rgb", "ring", "_", "vec", "label"], [4, 4, 4, 4, 4, 2, 1, 8, 4],
                   ["F", "F", "F", "F", "F", "U", "U", "F", "U"], n, encoding, counts=[1, 1, 1, 1, 1, 1, 2, 2, 1])
    if encoding == "binary":
        body = rec.tobytes()
    else:  # compressed PCD stores each field's column in turn
        raw = b"".join(np.ascontiguousarray(rec[f]).tobytes() for f in dtype.names)
        packed = lzf_compress(raw)
        body = struct.pack("<II", len(packed), len(raw)) + packed
    (tmp_path / "h.pcd").write_bytes(head + body)
    cloud = read_points(tmp_path / "h.pcd")
    assert cloud.feature_names == ["intensity", "r", "g", "b", "ring", "vec_0", "vec_1"]
    np.testing.assert_array_equal(cloud.xyz, np.stack([rec["x"], rec["y"], rec["z"]], 1))
    np.testing.assert_array_equal(cloud.features[:, 1:4], colours)
    np.testing.assert_array_equal(cloud.feature("ring"), rec["ring"])
    np.testing.assert_array_equal(cloud.features[:, 5:], rec["vec"])
    np.testing.assert_array_equal(cloud.labels, [3, 1, 4, 1, 5, 9])
    sub = read_points(tmp_path / "h.pcd", fields=["ring", "intensity"])
    assert sub.feature_names == ["ring", "intensity"] and sub.features.shape == (n, 2)
    with pytest.raises(InputError, match=r"h\.pcd: no field normal_x in this pcd file \(it has intensity, r"):
        read_points(tmp_path / "h.pcd", fields=["normal_x"])


def test_open3d_compressed_file_decodes(tmp_path):
    """An independent LZF codec (open3d's): its files decode to its numbers, and it decodes ours."""
    o3d = pytest.importorskip("open3d")
    rng = np.random.default_rng(2)
    pc = o3d.t.geometry.PointCloud(o3d.core.Tensor(rng.normal(size=(3000, 3)).astype(np.float32)))
    pc.point["intensity"] = o3d.core.Tensor(rng.random((3000, 1), dtype=np.float32))
    o3d.t.io.write_point_cloud(str(tmp_path / "o.pcd"), pc, write_ascii=False, compressed=True)
    cloud = read_points(tmp_path / "o.pcd")
    assert cloud.meta["pcd_data"] == "binary_compressed"
    np.testing.assert_array_equal(cloud.xyz, pc.point["positions"].numpy())
    np.testing.assert_array_equal(cloud.feature("intensity"), pc.point["intensity"].numpy()[:, 0])
    # and the other way: open3d decodes what our encoder wrote
    ours = write_pcd(cloud, tmp_path / "ours.pcd", data="binary_compressed")
    again = o3d.t.io.read_point_cloud(str(ours))
    np.testing.assert_array_equal(again.point["positions"].numpy(), pc.point["positions"].numpy())
    np.testing.assert_array_equal(again.point["intensity"].numpy(), pc.point["intensity"].numpy())


def test_ascii_rgb_as_pcl_integer_and_nan_points(tmp_path):
    head = _header(["x", "y", "z", "rgb"], [4] * 4, ["F"] * 4, 3, "ascii")
    (tmp_path / "a.pcd").write_bytes(head + b"1 2 3 16711680\nnan nan nan 0\n4 5 6 65280\n")
    cloud = read_points(tmp_path / "a.pcd")
    assert cloud.meta["dropped_nonfinite"] == 1 and cloud.meta["kept_index"].tolist() == [0, 2]
    np.testing.assert_array_equal(cloud.features, [[255, 0, 0], [0, 255, 0]])


@pytest.mark.parametrize("head, body, message", [
    (b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 1\n", b"1 2 3\n", "no DATA line"),
    (b"FIELDS x y z\nSIZE 4 4\nTYPE F F F\nWIDTH 1\nPOINTS 1\nDATA ascii\n", b"1 2 3\n", "3 FIELDS but 2 SIZE"),
    (b"FIELDS x y z\nSIZE 4 4 3\nTYPE F F F\nWIDTH 1\nPOINTS 1\nDATA ascii\n", b"1 2 3\n", "TYPE F SIZE 3"),
    (b"FIELDS x y z\nWIDTH 2\nHEIGHT 1\nPOINTS 3\nDATA ascii\n", b"1 2 3\n", r"WIDTH 2 x HEIGHT 1 != POINTS 3"),
    (b"FIELDS x y z\nWIDTH two\nDATA ascii\n", b"", "WIDTH two is not"),
    (b"FIELDS x y z\nWIDTH 1\nPOINTS 1\nDATA zip\n", b"", "DATA 'zip'"),
    (b"FIELDS a b c\nWIDTH 1\nPOINTS 1\nDATA ascii\n", b"1 2 3\n", "no 'x' field"),
    (b"FIELDS x y z\nWIDTH 2\nPOINTS 2\nDATA ascii\n", b"1 2 3\n4 5\n", "point 2 holds 2 values, expected 3"),
    (b"FIELDS x y z\nWIDTH 2\nPOINTS 2\nDATA ascii\n", b"1 2 3\n4 5 6\n7 8 9\n",
     "holds 3 point lines, its header's POINTS says 2"),
    (b"FIELDS x y z\nWIDTH 2\nPOINTS 2\nDATA ascii\n", b"1 2 3\n", "holds 1 point lines, its header's POINTS says 2"),
    (b"FIELDS x y z\nWIDTH 1\nPOINTS 1\nDATA ascii\n", b"1 two 3\n", "'y' holds a non-numeric"),
    (b"FIELDS x y z\nWIDTH 2\nPOINTS 2\nDATA binary\n", b"\0" * 20,
     r"holds 20 bytes \(1 points of 12 bytes\), its header's POINTS says 2 \(24 bytes\)"),
    (b"FIELDS x y z\nWIDTH 2\nPOINTS 2\nDATA binary\n", b"\0" * 36, r"holds 36 bytes \(3 points of 12 bytes\)"),
    (b"FIELDS x y z\nWIDTH 2\nPOINTS 2\nDATA binary_compressed\n", struct.pack("<II", 5, 20) + b"\0" * 5,
     "expands to 20 bytes, but POINTS 2 x 12 bytes = 24"),
    (b"FIELDS x y z\nWIDTH 2\nPOINTS 2\nDATA binary_compressed\n", struct.pack("<II", 3, 24) + bytes([5, 1, 2]),
     "binary_compressed data is corrupt"),
    (b"FIELDS x y z\nWIDTH 0\nPOINTS 0\nDATA binary\n", b"", "holds no points"),
    # found by review: each of these raised IndexError, KeyError or ValueError, or read wrong values
    (b"FIELDS x y z\nWIDTH\nPOINTS 1\nDATA ascii\n", b"1 2 3\n", "WIDTH needs one integer, got nothing"),
    (b"FIELDS x y z\nWIDTH 1\nPOINTS\nDATA ascii\n", b"1 2 3\n", "POINTS needs one integer"),
    (b"FIELDS x y z\nCOUNT 2 1 1\nWIDTH 1\nPOINTS 1\nDATA ascii\n", b"1 1 2 3\n", "field 'x' has COUNT 2"),
    (b"FIELDS x y z rgb\nSIZE 4 4 4 8\nTYPE F F F F\nWIDTH 1\nPOINTS 1\nDATA ascii\n", b"1 2 3 4\n",
     "'rgb' has COUNT 1 SIZE 8"),
    (b"FIELDS x y z x\nWIDTH 1\nPOINTS 1\nDATA ascii\n", b"1 2 3 4\n", "field 'x' appears more than once"),
    (b"FIELDS x y z\nWIDTH -1\nHEIGHT -1\nPOINTS 1\nDATA ascii\n", b"1 2 3\n", "WIDTH -1 x HEIGHT -1"),
    (b"FIELDS x y z label\nSIZE 4 4 4 1\nTYPE F F F U\nWIDTH 1\nPOINTS 1\nDATA ascii\n", b"1 2 3 300\n",
     r"'label' holds 300, outside its TYPE U SIZE 1 \(0..255\)"),
])
def test_corrupt_pcd(tmp_path, head, body, message):
    (tmp_path / "bad.pcd").write_bytes(head + body)
    with pytest.raises(InputError, match=rf"bad\.pcd: .*{message}"):
        read_points(tmp_path / "bad.pcd")


def test_binary_pcd_with_a_partial_record_of_padding_reads(tmp_path):
    """Bytes after the last point that cannot hold a whole record (a newline, padding) are not a point."""
    pts = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    head = b"FIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nWIDTH 2\nPOINTS 2\nDATA binary\n"
    (tmp_path / "p.pcd").write_bytes(head + pts.tobytes() + b"\n" + bytes(10))
    np.testing.assert_array_equal(read_points(tmp_path / "p.pcd").xyz, pts)


def test_write_pcd_refuses_its_source(tmp_path):
    (tmp_path / "s.pcd").write_bytes(_header(["x", "y", "z"], [4] * 3, ["F"] * 3, 1, "ascii") + b"1 2 3\n")
    cloud = read_points(tmp_path / "s.pcd")
    with pytest.raises(InputError, match="refusing to overwrite"):
        write_pcd(cloud, tmp_path / "s.pcd")
    assert read_points(write_pcd(cloud, tmp_path / "t.pcd", data="ascii")).xyz.tolist() == [[1, 2, 3]]
