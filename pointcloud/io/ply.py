"""PLY vertices: our own header parser and, for vertices of plain (non-list) properties, our own
reader of every property type; open3d's tensor reader only for vertices that carry list properties.

open3d reports a failed read only as a printed warning and may hand back a partly filled cloud, so
the header is parsed here first and the file's size is checked against it. Its reader also drops
vertex properties of the types char, short, ushort and uint without a word (a ``ushort
intensity`` vanished), which is why plain vertices are read here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvit.core.errors import InputError
from pointcloud.io.cloud import PointCloud, integer_labels

_SIZES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
          "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}
_RENAME = {"positions": None, "colors": ["r", "g", "b"], "normals": ["normal_x", "normal_y", "normal_z"]}


def _header(path: Path) -> tuple[str, list[tuple[str, int, list[tuple[str, str]]]], int]:
    """``(format, [(element, count, [(property, type)])], header bytes)``; a list property's type
    is ``list COUNT_TYPE ITEM_TYPE``."""
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    with open(path, "rb") as f:
        if f.readline().strip() != b"ply":
            raise InputError(path, "not a PLY file (first line is not 'ply')")
        fmt = ""
        for _ in range(10000):
            raw = f.readline()
            if not raw:
                raise InputError(path, "PLY header has no end_header line")
            words = raw.decode("ascii", errors="replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                return fmt, elements, f.tell()
            try:
                if words[0] == "format":
                    fmt = words[1]
                elif words[0] == "element":
                    if int(words[2]) < 0:
                        raise ValueError
                    elements.append((words[1], int(words[2]), []))
                elif words[0] == "property":
                    kind = " ".join(words[1:4]) if words[1] == "list" else words[1]
                    if len(words) != (5 if words[1] == "list" else 3) or \
                            any(t not in _SIZES for t in kind.split()[kind.startswith("list"):]):
                        raise ValueError
                    elements[-1][2].append((words[-1], kind))
            except (IndexError, ValueError):
                raise InputError(path, f"corrupt PLY header line: {raw.decode(errors='replace').strip()}") from None
    raise InputError(path, "PLY header has no end_header line")


def _check_body(path: Path, fmt: str, elements, offset: int) -> tuple[int, int | None, np.ndarray | None]:
    """``(vertex count, start, table)`` after checking the data can hold every row up to the
    vertices: for binary data ``start``, where the vertices begin; for ascii ``table``, the vertex
    rows as float64 when no vertex property is a list."""
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise InputError(path, f"PLY has no vertex element (elements: {', '.join(names) or 'none'})")
    vertex = elements[names.index("vertex")]
    props = [p for p, _ in vertex[2]]
    if not {"x", "y", "z"} <= set(props):
        raise InputError(path, f"PLY vertices lack x/y/z (properties: {', '.join(props)})")
    if vertex[1] == 0:
        raise InputError(path, "holds no points (element vertex 0)")
    before = elements[: names.index("vertex") + 1]
    if fmt == "ascii":
        return vertex[1], None, _check_ascii(path, before, offset)
    if fmt in ("binary_little_endian", "binary_big_endian"):
        return vertex[1], _check_binary(path, before, offset, "<" if fmt == "binary_little_endian" else ">"), None
    raise InputError(path, f"PLY format {fmt!r} is not ascii, binary_little_endian or binary_big_endian")


def _check_ascii(path: Path, elements, offset: int) -> np.ndarray | None:
    """Every row up to the last vertex holds numbers only, and a vertex row one per property:
    open3d's reader only prints a warning for a bad row and fills the point with garbage. Returns
    the last element's rows (the vertices) as float64 when none of its properties is a list."""
    last: list[list[float]] = []
    with open(path, "rb") as f:
        f.seek(offset)
        rows = (line.split() for line in f)
        rows = (r for r in rows if r)
        for i, (name, count, props) in enumerate(elements):
            fixed = all(not t.startswith("list") for _, t in props)
            keep = fixed and i == len(elements) - 1
            for k in range(count):
                row = next(rows, None)
                if row is None:
                    raise InputError(path, f"PLY ascii data ends at row {k} of element {name!r}, the header promises {count}")
                try:
                    values = [float(v) for v in row]
                except ValueError:
                    raise InputError(path, f"PLY ascii row {k} of element {name!r} holds a non-numeric value: "
                                           f"{b' '.join(row).decode(errors='replace')[:80]}") from None
                if fixed and len(row) != len(props):
                    raise InputError(path, f"PLY ascii row {k} of element {name!r} holds {len(row)} values, "
                                           f"its {len(props)} properties need {len(props)}")
                if keep:
                    last.append(values)
    return np.array(last, dtype=np.float64) if keep else None


def _check_binary(path: Path, elements, offset: int, order: str) -> int:
    """The data holds every row up to the last vertex (list properties walked row by row); returns
    where the last element given (the vertices) starts, in bytes from the start of the file."""
    size = path.stat().st_size - offset
    pos = start = 0
    with open(path, "rb") as f:
        for name, count, props in elements:
            start = pos
            if all(not t.startswith("list") for _, t in props):
                pos += count * sum(_SIZES[t] for _, t in props)
                continue
            f.seek(offset + pos)
            data = memoryview(f.read())  # an element with lists: walk its rows
            at = 0
            for _ in range(count):
                for _, t in props:
                    if not t.startswith("list"):
                        at += _SIZES[t]
                        continue
                    _, count_type, item_type = t.split()
                    width = _SIZES[count_type]
                    if at + width > len(data):
                        at = len(data) + 1
                        break
                    n = int(np.frombuffer(data[at : at + width], dtype=_numpy_type(count_type, order))[0])
                    at = at + width + n * _SIZES[item_type] if n >= 0 else len(data) + 1  # a negative count: corrupt
                if at > len(data):
                    break
            pos += at
    if size < pos:
        raise InputError(path, f"PLY binary data holds {size} bytes, the header promises at least {pos} up to the vertices")
    return offset + start


def _numpy_type(ply_type: str, order: str) -> np.dtype:
    kind = {"char": "i", "int8": "i", "short": "i", "int16": "i", "int": "i", "int32": "i",
            "uchar": "u", "uint8": "u", "ushort": "u", "uint16": "u", "uint": "u", "uint32": "u"}.get(ply_type, "f")
    return np.dtype(f"{order}{kind}{_SIZES[ply_type]}")


# PLY property names -> our feature names, as open3d's reader named them before
_NAMES = {"red": "r", "green": "g", "blue": "b", "diffuse_red": "r", "diffuse_green": "g", "diffuse_blue": "b",
          "nx": "normal_x", "ny": "normal_y", "nz": "normal_z"}


def _plain_vertices(path: Path, fmt: str, vertex, start: int | None, table: np.ndarray | None) -> dict[str, np.ndarray]:
    """Every property of the vertex element (none of them lists), by name, in file order: binary in
    one structured read from ``start``, ascii from the rows ``_check_ascii`` parsed."""
    _, count, props = vertex
    if start is not None:
        order = "<" if fmt == "binary_little_endian" else ">"
        dtype = np.dtype([(p, _numpy_type(t, order)) for p, t in props])
        with open(path, "rb") as f:
            f.seek(start)
            rows = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count)
        return {p: rows[p] for p, _ in props}
    # each value as its declared type, as a binary file would hold it (a 'float' x is float32)
    return {p: table[:, k].astype(_numpy_type(t, "=")) for k, (p, t) in enumerate(props)}


def _open3d_vertices(path: Path, expected: int) -> dict[str, np.ndarray]:
    """Vertices with list properties, through open3d (its names: positions, colors, normals, others)."""
    import open3d as o3d  # heavy: imported only for these

    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        pcd = o3d.t.io.read_point_cloud(str(path))
    attrs = {k: pcd.point[k].numpy() for k in pcd.point}
    if "positions" not in attrs or len(attrs["positions"]) != expected:
        got = len(attrs.get("positions", ()))
        raise InputError(path, f"open3d read {got} vertices, the header declares {expected}")
    out = {"x": attrs["positions"][:, 0], "y": attrs["positions"][:, 1], "z": attrs["positions"][:, 2]}
    for key, values in attrs.items():
        values = values.reshape(len(values), -1)
        if key == "positions":
            continue
        rename = _RENAME.get(key)
        cols = rename if rename and len(rename) == values.shape[1] else \
            [key] if values.shape[1] == 1 else [f"{key}_{k}" for k in range(values.shape[1])]
        out.update({c: values[:, k] for k, c in enumerate(cols)})
    return out


def read_ply(path: Path) -> PointCloud:
    """The vertices of a PLY file (point cloud or mesh) as points.

    ``x, y, z`` are the coordinates (float64); the other vertex properties are features by name,
    colours as ``r, g, b`` and normals as ``normal_x, normal_y, normal_z``; a property named
    ``label`` becomes ``labels``.
    """
    fmt, elements, offset = _header(path)
    expected, start, table = _check_body(path, fmt, elements, offset)
    vertex = elements[[e[0] for e in elements].index("vertex")]
    if any(t.startswith("list") for _, t in vertex[2]):
        columns = _open3d_vertices(path, expected)
    else:
        columns = {_NAMES.get(k, k): v for k, v in _plain_vertices(path, fmt, vertex, start, table).items()}
    xyz = np.stack([np.asarray(columns.pop(a), dtype=np.float64) for a in "xyz"], axis=1)
    labels = integer_labels(np.asarray(columns.pop("label")), path) if "label" in columns else None
    names = list(columns)
    features = np.stack([np.asarray(columns[n], dtype=np.float32) for n in names], axis=1) if names \
        else np.zeros((expected, 0), np.float32)
    return PointCloud(xyz=xyz, features=features, feature_names=names, labels=labels, source=str(path),
                      meta={"format": "ply", "ply_format": fmt, "ply_elements": {e: c for e, c, _ in elements},
                            "feature_dtypes": {n: np.asarray(columns[n]).dtype.name for n in names}})
