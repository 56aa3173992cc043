"""PCD (Point Cloud Library) files: our own header parser and numpy reader for ``ascii``, ``binary``
and ``binary_compressed`` data, so every field (intensity, rgb, label...) is kept and old
``VERSION .5`` headers are accepted; and a writer for the three encodings.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvit.core.errors import InputError
from medvit.core.files import atomic_path, refuse_protected
from pointcloud.io.cloud import PointCloud, integer_labels
from pointcloud.io.lzf import LZFError, lzf_compress, lzf_decompress

_TYPES = {("F", 4): "<f4", ("F", 8): "<f8", ("I", 1): "i1", ("I", 2): "<i2", ("I", 4): "<i4", ("I", 8): "<i8",
          ("U", 1): "u1", ("U", 2): "<u2", ("U", 4): "<u4", ("U", 8): "<u8"}
_ENCODINGS = ("ascii", "binary", "binary_compressed")
_MAX_HEADER_LINES = 64


@dataclass
class PcdHeader:
    """The parsed header: one entry per field in ``fields``/``sizes``/``types``/``counts``."""

    version: str
    fields: list[str]
    sizes: list[int]
    types: list[str]
    counts: list[int]
    width: int
    height: int
    points: int
    viewpoint: list[float]
    data: str
    data_offset: int

    def dtype(self) -> np.dtype:
        """The packed little-endian record of one point; a field with COUNT > 1 is a sub-array."""
        names, formats = [], []
        for k, (name, size, typ, count) in enumerate(zip(self.fields, self.sizes, self.types, self.counts)):
            names.append(f"{name}__{k}")  # PCL pads with repeated "_" fields: make names unique
            base = np.dtype(_TYPES[(typ, size)])
            formats.append(base if count == 1 else np.dtype((base, (count,))))
        return np.dtype({"names": names, "formats": formats})


def _ints(path: Path, key: str, values: list[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise InputError(path, f"corrupt PCD header: {key} {' '.join(values)} is not a list of integers") from None


def _int(path: Path, key: str, values: list[str]) -> int:
    """The single integer a header line such as ``WIDTH`` or ``POINTS`` holds."""
    if len(values) != 1:
        raise InputError(path, f"corrupt PCD header: {key} needs one integer, got {' '.join(values) or 'nothing'}")
    return _ints(path, key, values)[0]


def read_pcd_header(path: Path) -> PcdHeader:
    """Parse the text header up to and including the ``DATA`` line (InputError naming what is wrong)."""
    entries: dict[str, list[str]] = {}
    offset = 0
    with open(path, "rb") as f:
        for _ in range(_MAX_HEADER_LINES):
            raw = f.readline()
            if not raw:
                break
            offset += len(raw)
            line = raw.decode("ascii", errors="replace").strip()
            if not line or line.startswith("#"):
                continue
            key, *values = line.split()
            key = key.upper()
            entries["FIELDS" if key == "COLUMNS" else key] = values  # COLUMNS: pre-0.7 spelling
            if key == "DATA":
                break
    if "DATA" not in entries:
        raise InputError(path, "corrupt PCD header: no DATA line in the first "
                               f"{_MAX_HEADER_LINES} lines (is this a PCD file?)")
    fields = entries.get("FIELDS")
    if not fields:
        raise InputError(path, "corrupt PCD header: no FIELDS line")
    n = len(fields)
    sizes = _ints(path, "SIZE", entries.get("SIZE", ["4"] * n))
    types = [t.upper() for t in entries.get("TYPE", ["F"] * n)]
    counts = _ints(path, "COUNT", entries.get("COUNT", ["1"] * n))
    for key, values in (("SIZE", sizes), ("TYPE", types), ("COUNT", counts)):
        if len(values) != n:
            raise InputError(path, f"corrupt PCD header: {n} FIELDS but {len(values)} {key} entries")
    for name, size, typ, count in zip(fields, sizes, types, counts):
        if (typ, size) not in _TYPES:
            raise InputError(path, f"corrupt PCD header: field {name!r} has TYPE {typ} SIZE {size}, "
                                   "expected F 4/8, I or U 1/2/4/8")
        if count < 1:
            raise InputError(path, f"corrupt PCD header: field {name!r} has COUNT {count}")
        if name in ("x", "y", "z", "label") and count != 1:
            raise InputError(path, f"corrupt PCD header: field {name!r} has COUNT {count}; it must hold one value a point")
        if name in ("rgb", "rgba") and (count, size) != (1, 4):
            raise InputError(path, f"corrupt PCD header: field {name!r} has COUNT {count} SIZE {size}; a packed "
                                   "colour is one 4-byte value")
    repeated = sorted({f for f in fields if f != "_" and fields.count(f) > 1})  # PCL repeats only its "_" padding
    if repeated:
        raise InputError(path, f"corrupt PCD header: field {', '.join(map(repr, repeated))} appears more than once in FIELDS")
    width = _int(path, "WIDTH", entries.get("WIDTH", ["-1"]))
    height = _int(path, "HEIGHT", entries.get("HEIGHT", ["1"]))
    points = _int(path, "POINTS", entries.get("POINTS", [str(width * height)]))
    if height < 1 or "WIDTH" in entries and width < 0:
        raise InputError(path, f"corrupt PCD header: WIDTH {width} x HEIGHT {height}")
    if points < 0 or width < 0 and "POINTS" not in entries:
        raise InputError(path, "corrupt PCD header: neither POINTS nor WIDTH gives the point count")
    if width >= 0 and width * height != points:
        raise InputError(path, f"corrupt PCD header: WIDTH {width} x HEIGHT {height} != POINTS {points}")
    data = entries["DATA"][0].lower() if entries["DATA"] else ""
    if data not in _ENCODINGS:
        raise InputError(path, f"corrupt PCD header: DATA {data!r}, expected one of {', '.join(_ENCODINGS)}")
    try:
        viewpoint = [float(v) for v in entries.get("VIEWPOINT", ["0", "0", "0", "1", "0", "0", "0"])]
    except ValueError:
        raise InputError(path, f"corrupt PCD header: VIEWPOINT {entries['VIEWPOINT']}") from None
    return PcdHeader(version=" ".join(entries.get("VERSION", [""])), fields=fields, sizes=sizes, types=types,
                     counts=counts, width=width, height=height, points=points, viewpoint=viewpoint,
                     data=data, data_offset=offset)


def _ascii_records(path: Path, header: PcdHeader, dtype: np.dtype) -> np.ndarray:
    """Parse the text rows (one point a line; blank lines skipped) into the packed record dtype; each
    column takes its field's type. InputError when the line count differs from POINTS, or a line holds
    another number of values than the fields' COUNTs add up to."""
    with open(path, "rb") as f:
        f.seek(header.data_offset)
        rows = [r for r in (line.split() for line in f.read().splitlines()) if r]
    width = sum(header.counts)
    if len(rows) != header.points:  # more lines than POINTS are as wrong as fewer: the header's count is off
        raise InputError(path, f"PCD ascii data holds {len(rows)} point lines, its header's POINTS says {header.points}")
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    if (bad := np.flatnonzero(lengths != width)).size:
        raise InputError(path, f"PCD ascii point {bad[0] + 1} holds {lengths[bad[0]]} values, expected {width} "
                               f"(the fields' COUNTs)")
    table = np.array([t for r in rows for t in r]).reshape(header.points, width)
    records = np.zeros(header.points, dtype=dtype)
    col = 0
    for name, typ, count in zip(dtype.names, header.types, header.counts):
        text = table[:, col : col + count]
        col += count
        target = records.dtype[name].base
        try:
            if typ == "F" and name.split("__")[0] in ("rgb", "rgba"):
                records[name] = _ascii_packed_colour(text.astype(np.float64)).reshape(records[name].shape)
            else:
                # integers via float64 would lose bits above 2**53, so parse them as integers
                values = text.astype(np.float64 if typ == "F" else np.int64)
                if typ != "F":  # a value outside the field's type would wrap around silently
                    info = np.iinfo(target)
                    if values.size and (values.min() < info.min or values.max() > info.max):
                        bad = values[(values < info.min) | (values > info.max)][0]
                        raise InputError(path, f"PCD ascii field {name.split('__')[0]!r} holds {bad}, outside its "
                                               f"TYPE {typ} SIZE {target.itemsize} ({info.min}..{info.max})")
                records[name] = values.astype(target).reshape(records[name].shape)
        except (ValueError, OverflowError):
            raise InputError(path, f"PCD ascii field {name.split('__')[0]!r} holds a non-numeric value") from None
    return records


def _ascii_packed_colour(values: np.ndarray) -> np.ndarray:
    """A float ``rgb`` column in ASCII: PCL prints the packed 0x00RRGGBB as an integer; other tools
    print the float whose bits are the colour (a denormal below 1e-37). Return the float32 bits."""
    as_int = (values >= 1) & (values == np.round(values))
    packed = np.where(as_int, values, 0).astype(np.uint32)
    floats = values.astype(np.float32)
    return np.where(as_int, packed.view(np.float32), floats)


def _binary_records(path: Path, header: PcdHeader, dtype: np.dtype) -> np.ndarray:
    expected = header.points * dtype.itemsize
    with open(path, "rb") as f:
        f.seek(header.data_offset)
        body = f.read()
    if header.data == "binary":
        # a partial record after the points (padding, a newline) is ignored; a whole one means POINTS is short
        if len(body) < expected or len(body) - expected >= dtype.itemsize:
            raise InputError(path, f"PCD binary data holds {len(body)} bytes ({len(body) // dtype.itemsize} points of "
                                   f"{dtype.itemsize} bytes), its header's POINTS says {header.points} "
                                   f"({expected} bytes)")
        return np.frombuffer(body, dtype=dtype, count=header.points).copy()
    if len(body) < 8:
        raise InputError(path, "PCD binary_compressed data lacks its 8-byte size prefix")
    packed_size, size = struct.unpack("<II", body[:8])
    if size != expected:
        raise InputError(path, f"PCD binary_compressed data expands to {size} bytes, but POINTS {header.points} "
                               f"x {dtype.itemsize} bytes = {expected}")
    if len(body) - 8 < packed_size:
        raise InputError(path, f"PCD binary_compressed data holds {len(body) - 8} bytes, header says {packed_size}")
    try:
        raw = lzf_decompress(body[8 : 8 + packed_size], size)
    except LZFError as e:
        raise InputError(path, f"PCD binary_compressed data is corrupt: {e}") from None
    # compressed PCD stores the fields one after another (all x, then all y, ...), not per point
    records = np.empty(header.points, dtype=dtype)
    start = 0
    for name in dtype.names:
        sub = dtype[name]
        stop = start + header.points * sub.itemsize
        records[name] = np.frombuffer(raw[start:stop], dtype=sub.base).reshape(records[name].shape)
        start = stop
    return records


def read_pcd(path: Path) -> PointCloud:
    """Read every field of a PCD file.

    ``x``/``y``/``z`` become ``xyz`` (float64); ``rgb``/``rgba`` (packed 0x(AA)RRGGBB) become
    features ``r``, ``g``, ``b`` (and ``a``) in 0..255; ``label`` becomes ``labels``; PCL's ``_``
    padding fields are skipped; every other field is a feature under its own name (``name_k``
    for the k-th value of a field with COUNT > 1).
    """
    header = read_pcd_header(path)
    for axis in "xyz":
        if axis not in header.fields:
            raise InputError(path, f"PCD has no {axis!r} field (fields: {' '.join(header.fields)})")
    dtype = header.dtype()
    records = _ascii_records(path, header, dtype) if header.data == "ascii" else _binary_records(path, header, dtype)
    columns: dict[str, np.ndarray] = {}
    for key, name in zip(dtype.names, header.fields):
        values = records[key]
        if name == "_":
            continue
        if name in ("rgb", "rgba"):
            packed = np.ascontiguousarray(values).view(np.uint32)
            shifts = {"r": 16, "g": 8, "b": 0} | ({"a": 24} if name == "rgba" else {})
            for channel, shift in shifts.items():
                columns[channel] = ((packed >> shift) & 255).astype(np.float32)
        elif values.ndim == 2:
            for k in range(values.shape[1]):
                columns[f"{name}_{k}"] = values[:, k]
        else:
            columns[name] = values
    xyz = np.stack([columns.pop(a).astype(np.float64) for a in "xyz"], axis=1)
    labels = columns.pop("label", None)
    names = list(columns)
    features = np.stack([columns[k].astype(np.float32) for k in names], axis=1) if names else np.zeros((len(xyz), 0))
    meta = {"format": "pcd", "pcd_version": header.version, "pcd_data": header.data, "width": header.width,
            "height": header.height, "viewpoint": header.viewpoint,
            "feature_dtypes": {k: columns[k].dtype.name for k in names}}
    return PointCloud(xyz=xyz, features=features, feature_names=names,
                      labels=None if labels is None else integer_labels(labels, path), source=str(path), meta=meta)


def write_pcd(cloud: PointCloud, path: str | os.PathLike, *, data: str = "binary",
              protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``cloud`` as PCD 0.7 (``data``: ``ascii``, ``binary`` or ``binary_compressed``), atomically.

    ``x y z`` are float32 when that loses nothing, else float64; features are float32 fields under
    their names; ``labels`` (if any) a uint32 ``label`` field. ``binary_compressed`` runs a pure
    Python LZF encoder (about a second per megabyte of points). Refuses to overwrite ``cloud.source``
    or any path in ``protect``.
    """
    path = Path(path)
    if data not in _ENCODINGS:
        raise ValueError(f"data must be one of {_ENCODINGS}, got {data!r}")
    refuse_protected(path, [*protect, *([cloud.source] if cloud.source else [])])
    exact32 = np.array_equal(cloud.xyz.astype(np.float32).astype(np.float64), cloud.xyz, equal_nan=True)
    xyz_type = "<f4" if exact32 else "<f8"
    fields = [("x", xyz_type), ("y", xyz_type), ("z", xyz_type)] + [(f, "<f4") for f in cloud.feature_names]
    if cloud.labels is not None:
        if len(cloud) and (cloud.labels.min() < 0 or cloud.labels.max() > np.iinfo(np.uint32).max):
            raise ValueError("labels must lie in 0..2**32-1 to be written as a PCD uint32 field")
        fields.append(("label", "<u4"))
    names = [f for f, _ in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"feature names clash with x/y/z/label or each other: {names}")
    records = np.empty(len(cloud), dtype=[(f"c{k}", t) for k, (_, t) in enumerate(fields)])
    for k in range(3):
        records[f"c{k}"] = cloud.xyz[:, k]
    for k in range(len(cloud.feature_names)):
        records[f"c{k + 3}"] = cloud.features[:, k]
    if cloud.labels is not None:
        records[f"c{len(fields) - 1}"] = cloud.labels
    kinds = [("F", int(t[-1])) if t[1] == "f" else ("U", 4) for _, t in fields]
    header = "\n".join([
        "# .PCD v0.7 - Point Cloud Data file format",
        "VERSION 0.7",
        "FIELDS " + " ".join(names),
        "SIZE " + " ".join(str(s) for _, s in kinds),
        "TYPE " + " ".join(t for t, _ in kinds),
        "COUNT " + " ".join("1" for _ in fields),
        f"WIDTH {len(cloud)}",
        "HEIGHT 1",
        "VIEWPOINT 0 0 0 1 0 0 0",
        f"POINTS {len(cloud)}",
        f"DATA {data}",
        "",
    ]).encode("ascii")
    if data == "ascii":
        # repr-precision text: float32 fields print their float32 value, so reading back is exact
        columns = [records[k].astype(object) if t == "<u4" else records[k]
                   for k, (_, t) in zip(records.dtype.names, fields)]
        rows = [" ".join(repr(v.item()) if isinstance(v, np.floating) else str(v) for v in row)
                for row in zip(*columns)]
        body = ("\n".join(rows) + "\n").encode("ascii") if rows else b""
    elif data == "binary":
        body = records.tobytes()
    else:
        raw = b"".join(np.ascontiguousarray(records[k]).tobytes() for k in records.dtype.names)
        packed = lzf_compress(raw)
        body = struct.pack("<II", len(packed), len(raw)) + packed
    with atomic_path(path) as tmp:
        tmp.write_bytes(header + body)
    return path
