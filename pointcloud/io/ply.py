"""PLY through open3d's tensor reader (keeps extra vertex properties), with our own header check.

open3d reports a failed read only as a printed warning and may hand back a partly filled cloud, so
the header is parsed here first and the file's size is checked against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medvit.errors import InputError
from pointcloud.io.cloud import PointCloud

_SIZES = {"char": 1, "uchar": 1, "int8": 1, "uint8": 1, "short": 2, "ushort": 2, "int16": 2, "uint16": 2,
          "int": 4, "uint": 4, "int32": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}
_RENAME = {"positions": None, "colors": ["r", "g", "b"], "normals": ["normal_x", "normal_y", "normal_z"]}


def _header(path: Path) -> tuple[str, list[tuple[str, int, list[tuple[str, str]]]], int]:
    """``(format, [(element, count, [(property, type)])], header bytes)``; lists are typed ``list``."""
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
                    elements.append((words[1], int(words[2]), []))
                elif words[0] == "property":
                    elements[-1][2].append((words[-1], "list" if words[1] == "list" else words[1]))
            except (IndexError, ValueError):
                raise InputError(path, f"corrupt PLY header line: {raw.decode(errors='replace').strip()}") from None
    raise InputError(path, "PLY header has no end_header line")


def _check_body(path: Path, fmt: str, elements, offset: int) -> int:
    """The vertex count, after checking the data can hold every row up to the vertices."""
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise InputError(path, f"PLY has no vertex element (elements: {', '.join(names) or 'none'})")
    vertex = elements[names.index("vertex")]
    props = [p for p, _ in vertex[2]]
    if not {"x", "y", "z"} <= set(props):
        raise InputError(path, f"PLY vertices lack x/y/z (properties: {', '.join(props)})")
    before = elements[: names.index("vertex") + 1]
    size = path.stat().st_size - offset
    if fmt == "ascii":
        with open(path, "rb") as f:
            f.seek(offset)
            rows = sum(1 for line in f if line.strip())
        need = sum(count for _, count, _ in before)
        if rows < need:
            raise InputError(path, f"PLY ascii data has {rows} rows, the header promises {need} up to the vertices")
    elif fmt in ("binary_little_endian", "binary_big_endian"):
        if all(t != "list" for _, _, ps in before for _, t in ps):
            need = sum(count * sum(_SIZES.get(t, 0) for _, t in ps) for _, count, ps in before)
            if size < need:
                raise InputError(path, f"PLY binary data holds {size} bytes, the header promises {need} "
                                       "up to the vertices")
    else:
        raise InputError(path, f"PLY format {fmt!r} is not ascii, binary_little_endian or binary_big_endian")
    return vertex[1]


def read_ply(path: Path) -> PointCloud:
    """The vertices of a PLY file (point cloud or mesh) as points.

    open3d's attribute names map to features: ``colors`` -> ``r, g, b``, ``normals`` ->
    ``normal_x, normal_y, normal_z``, others (``intensity``, ``confidence``...) keep their names;
    an attribute named ``label`` becomes ``labels``.
    """
    import open3d as o3d  # heavy (about 0.6 s): imported when a PLY is read

    fmt, elements, offset = _header(path)
    expected = _check_body(path, fmt, elements, offset)
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        pcd = o3d.t.io.read_point_cloud(str(path))
    attrs = {k: pcd.point[k].numpy() for k in pcd.point}
    if "positions" not in attrs or len(attrs["positions"]) != expected:
        got = len(attrs.get("positions", ()))
        raise InputError(path, f"open3d read {got} vertices, the header declares {expected}")
    names, columns = [], []
    labels = None
    for key, values in attrs.items():
        values = values.reshape(len(values), -1)
        if key == "label" and values.shape[1] == 1:
            labels = values[:, 0].astype(np.int64)
            continue
        rename = _RENAME.get(key)
        if key == "positions":
            continue
        names += rename if rename and len(rename) == values.shape[1] else \
            [key] if values.shape[1] == 1 else [f"{key}_{k}" for k in range(values.shape[1])]
        columns.append(values.astype(np.float32))
    features = np.concatenate(columns, axis=1) if columns else np.zeros((expected, 0), np.float32)
    return PointCloud(xyz=attrs["positions"].astype(np.float64), features=features, feature_names=names,
                      labels=labels, source=str(path),
                      meta={"format": "ply", "ply_format": fmt, "ply_elements": {e: c for e, c, _ in elements}})
