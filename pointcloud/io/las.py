"""LAS/LAZ through laspy (LAZ through its lazrs backend): float64 coordinates from the scaled
integers, classification as labels; and a classification writer that keeps the input's points
bit for bit.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from pathlib import Path

import laspy
import numpy as np
from laspy.vlrs.known import GeoAsciiParamsVlr, GeoDoubleParamsVlr, GeoKeyDirectoryVlr, WktCoordinateSystemVlr

from medvit.core.errors import InputError
from medvit.core.files import atomic_path, refuse_protected
from pointcloud.io.cloud import PointCloud

logger = logging.getLogger(__name__)

try:
    from lazrs import LazrsError
except ImportError:  # LAS still reads and writes; laspy then refuses LAZ itself, naming the missing backend
    class LazrsError(Exception):
        pass

DEFAULT_FIELDS = ("intensity",)
_MAX_CLASS_LEGACY = 31  # point formats 0-5 keep classification in 5 bits
_UPGRADE = {0: 6, 1: 6, 2: 7, 3: 7, 4: 9, 5: 10}  # same extra dimensions, 8-bit classification
_GEOKEY_PROJECTED, _GEOKEY_GEOGRAPHIC = 3072, 2048
_WKT_BIT = 1 << 4  # global encoding: the CRS is the WKT VLR's (LAS 1.4)


def _wkt_for_upgrade(las: laspy.LasData) -> str | None:
    """Give a file just moved to point format 6-10 the WKT CRS LAS 1.4 requires there: its own WKT VLR
    when it has one, else its GeoTIFF keys converted through pyproj (the GeoTIFF VLRs replaced), and
    the global-encoding WKT bit. Returns why not, for a warning, when only GeoTIFF keys remain."""
    header = las.header
    records = [*header.vlrs, *(header.evlrs or [])]
    if any(isinstance(v, WktCoordinateSystemVlr) for v in records):
        header.global_encoding.wkt = True
        return None
    if not any(isinstance(v, GeoKeyDirectoryVlr) for v in records):
        return None  # no CRS at all: nothing to convert
    try:
        from pyproj.exceptions import CRSError
    except ImportError:
        return "pyproj, which converts them to WKT, is not installed"
    try:
        crs = header.parse_crs()
    except CRSError as e:
        return f"pyproj does not know their CRS ({e})"
    if crs is None:
        return "they name no EPSG CRS that pyproj can convert to WKT"
    for kind in (GeoKeyDirectoryVlr, GeoAsciiParamsVlr, GeoDoubleParamsVlr):
        header.vlrs.extract(kind.__name__)
    # WKT1 (OGC 01-009/12-063) is what LAS 1.4 names; laspy's add_crs would write WKT2
    header.vlrs.append(WktCoordinateSystemVlr(crs.to_wkt(version="WKT1_GDAL") or crs.to_wkt()))
    header.global_encoding.wkt = True
    return None


def _keep_header(source: Path, written: Path, *, upgraded: bool, subset: bool) -> None:
    """Put ``source``'s public-header fields back into ``written``'s header (in place), keeping only what
    the classification change makes differ: the layout (header size, offset to points, VLR/EVLR counts and
    positions, point format and record length: laspy's), and on a format upgrade the version, the WKT bit
    and the legacy counts (zero for formats 6-10) and LAS 1.4 fields; on a subset the bounds and counts."""
    with open(source, "rb") as f:
        src = f.read(375)
    with open(written, "r+b") as f:
        size = struct.unpack_from("<H", f.read(96), 94)[0]
        f.seek(0)
        out = bytearray(f.read(size))

        def copy(start: int, stop: int) -> None:
            out[start:stop] = src[start:stop]

        copy(4, 6)  # file source id
        struct.pack_into("<H", out, 6, struct.unpack_from("<H", src, 6)[0] | (struct.unpack_from("<H", out, 6)[0] & _WKT_BIT))
        copy(8, 24)  # project GUID
        if not upgraded:
            copy(24, 26)  # version
        copy(26, 94)  # system identifier, generating software, creation day and year (0/0 stays 0/0)
        copy(131, 179)  # scales and offsets
        if not subset:
            copy(179, 227)  # bounds as the source wrote them, not recomputed
            if not upgraded:
                copy(107, 131)  # legacy point counts
                if len(src) >= 375 and len(out) >= 375 and struct.unpack_from("<H", src, 94)[0] >= 375:
                    copy(247, 375)  # LAS 1.4 point counts
        f.seek(0)
        f.write(out)


def _crs(las: laspy.LasData) -> dict:
    """The CRS as stored (WKT string or the GeoTIFF EPSG code); empty when the file has none.

    Parsed from the VLRs directly: laspy's ``parse_crs`` needs pyproj, which we do not require.
    """
    for vlr in [*las.header.vlrs, *(las.header.evlrs or [])]:
        if isinstance(vlr, WktCoordinateSystemVlr):
            return {"wkt": vlr.string}
        if isinstance(vlr, GeoKeyDirectoryVlr):
            keys = {k.id: k.value_offset for k in vlr.geo_keys if k.tiff_tag_location == 0}
            code = keys.get(_GEOKEY_PROJECTED) or keys.get(_GEOKEY_GEOGRAPHIC)
            return {"epsg": int(code)} if code else {"geotiff_keys": {int(k): int(v) for k, v in keys.items()}}
    return {}


def _read(path: Path) -> laspy.LasData:
    """laspy.read with truncation and format problems turned into InputError."""
    try:
        with laspy.open(path) as reader:
            header = reader.header
        if not header.are_points_compressed:
            need = header.offset_to_point_data + header.point_count * header.point_format.size
            size = path.stat().st_size
            if size < need:  # laspy would fail deep in numpy with a bare ValueError
                raise InputError(path, f"LAS file is truncated: {size} bytes, its header promises {need} "
                                       f"({header.point_count} points of {header.point_format.size} bytes)")
        return laspy.read(path)
    except laspy.errors.LaspyException as e:
        raise InputError(path, f"not a readable LAS/LAZ file ({e})") from None
    except LazrsError as e:
        raise InputError(path, f"LAZ data is corrupt or truncated ({e})") from None
    except (ValueError, EOFError, struct.error) as e:  # a header or VLR cut short: laspy reads past the end
        raise InputError(path, f"not a readable LAS/LAZ file: its header or VLRs are corrupt or truncated ({e})") from None


def read_las(path: Path, fields: Sequence[str] | None = None) -> PointCloud:
    """Read a LAS/LAZ file.

    ``xyz`` are the scaled coordinates as float64 (``X * scale + offset``); ``labels`` the
    classification codes; features the dimensions in ``fields`` (default ``intensity``), any of
    the point format's dimension names including extra bytes (InputError naming a missing one).
    """
    las = _read(path)
    if not np.all(np.asarray(las.header.scales) != 0):  # every point would collapse onto the offset
        raise InputError(path, f"LAS header scale {las.header.scales.tolist()} has a zero")
    available = list(las.point_format.dimension_names)
    names = list(DEFAULT_FIELDS if fields is None else fields)
    missing = [f for f in names if f not in available]
    if missing:
        raise InputError(path, f"LAS point format {las.point_format.id} has no field {', '.join(missing)} "
                               f"(it has {', '.join(available)})")
    xyz = np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], axis=1)
    features = np.stack([np.asarray(las[f], dtype=np.float32) for f in names], axis=1) if names \
        else np.zeros((len(xyz), 0), np.float32)
    meta = {
        "format": "laz" if las.header.are_points_compressed else "las",
        "scale": las.header.scales.tolist(),
        "offset": las.header.offsets.tolist(),
        "point_format": las.point_format.id,
        "version": str(las.header.version),
        "crs": _crs(las),
        "las_dimensions": available,
        "feature_dtypes": {f: np.asarray(las[f]).dtype.name for f in names},
    }
    return PointCloud(xyz=xyz, features=features, feature_names=names,
                      labels=np.asarray(las.classification).astype(np.int64), source=str(path), meta=meta)


def _check_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer ({n},) array, got {labels.dtype} {labels.shape}")
    if n and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"LAS classification holds 0..255, got labels {labels.min()}..{labels.max()}")
    return labels.astype(np.uint8)


def _from_source(cloud: PointCloud) -> laspy.LasData:
    """The cloud's own LAS records, re-read from its source, in the cloud's order and count."""
    source = Path(cloud.source)
    if not source.is_file():
        raise InputError(source, "the LAS file this cloud was read from is gone; cannot copy its points")
    las = _read(source)
    if las.header.point_count != cloud.meta["n_points_file"] or las.header.scales.tolist() != cloud.meta["scale"] \
            or las.header.offsets.tolist() != cloud.meta["offset"]:
        raise InputError(source, "changed since it was read (point count, scale or offset differ)")
    kept = cloud.meta.get("kept_index")
    if kept is not None:
        las.points = las.points[kept]
    xyz = np.stack([np.asarray(las.x), np.asarray(las.y), np.asarray(las.z)], axis=1)
    if not np.array_equal(xyz, cloud.xyz):
        raise ValueError("cloud.xyz differs from its LAS source's points; write_las copies the source's "
                         "records, so it refuses a cloud whose coordinates were changed")
    return las


def _from_points(cloud: PointCloud, point_format: int) -> laspy.LasData:
    """A new LAS holding only the cloud's coordinates, at mm resolution unless ``meta`` gives a scale;
    an axis spanning over 2,147 km gets the finest power-of-ten scale its int32 can hold."""
    header = laspy.LasHeader(point_format=point_format, version="1.4" if point_format >= 6 else "1.2")
    offset = np.asarray(cloud.meta.get("offset", np.floor(cloud.xyz.min(axis=0)) if len(cloud) else [0.0] * 3))
    if "scale" in cloud.meta:
        scale = np.asarray(cloud.meta["scale"], dtype=np.float64)
    else:
        span = np.abs(cloud.xyz - offset).max(axis=0) if len(cloud) else np.zeros(3)
        scale = np.full(3, 0.001)
        while np.any(span / scale > np.iinfo(np.int32).max):
            scale = np.where(span / scale > np.iinfo(np.int32).max, scale * 10, scale)
        if np.any(scale > 0.001):
            logger.warning("%s: coordinates span up to %.0f m, beyond LAS int32 at 1 mm: written at scale %s",
                           cloud.source, span.max(), scale.tolist())
    ints = np.round((cloud.xyz - offset) / scale)
    if len(cloud) and (np.abs(ints).max() > np.iinfo(np.int32).max):
        raise InputError(cloud.source, f"coordinates do not fit LAS int32 at scale {scale.tolist()} and offset {offset.tolist()}")
    header.scales, header.offsets = scale, offset
    las = laspy.LasData(header)
    las.X, las.Y, las.Z = (ints[:, k].astype(np.int32) for k in range(3))
    return las


def write_las(cloud: PointCloud, labels, path: str | os.PathLike, *,
              protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``cloud`` with ``labels`` ``(N,)`` (0..255) as its classification, atomically.

    A cloud read from LAS/LAZ keeps its source's point records, header and VLRs: the records
    are re-read from ``cloud.source`` (the points in ``meta["kept_index"]`` if the cloud is a
    subset), so coordinates, intensity, GPS time and every other dimension are copied bit for bit,
    and so is every public-header field but those :func:`_keep_header` lists (bounds and counts are
    recomputed only for a subset). Any other cloud becomes a new LAS with its coordinates only
    (scale ``meta["scale"]`` or 1 mm). Point formats 0-5 hold classes 0..31; higher labels move the
    file to the format 6-10 with the same dimensions (LAS 1.4), its CRS as WKT (:func:`_wkt_for_upgrade`;
    a warning when GeoTIFF keys cannot be converted). ``.laz`` output is compressed through lazrs.
    Refuses to overwrite ``cloud.source`` or any path in ``protect``.
    """
    path = Path(path)
    if path.suffix.lower() not in (".las", ".laz"):
        raise InputError(path, "LAS output must be named .las or .laz")
    refuse_protected(path, [*protect, *([cloud.source] if cloud.source else [])])
    classes = _check_labels(labels, len(cloud))
    wide = len(cloud) > 0 and int(classes.max()) > _MAX_CLASS_LEGACY
    from_las = cloud.meta.get("format") in ("las", "laz")
    upgraded = False
    if from_las:
        las = _from_source(cloud)
        if wide and las.point_format.id < 6:
            target = _UPGRADE[las.point_format.id]
            rank = np.asarray(las.scan_angle_rank, dtype=np.float64)
            source_format = las.point_format.id
            las = laspy.convert(las, point_format_id=target, file_version="1.4")
            upgraded = True
            # laspy copies dimensions by name: the whole-degree scan_angle_rank becomes scan_angle, in 0.006 degree steps
            las.scan_angle = np.round(rank / 0.006).astype(np.int16)
            why = _wkt_for_upgrade(las)
            geotiff = f"; its GeoTIFF CRS keys are kept as they are, without the WKT LAS 1.4 requires for formats " \
                      f"6-10: {why}" if why else ""
            logger.warning("%s: point format %d -> %d (LAS 1.4): formats 0-5 hold classes 0..31, these labels "
                           "reach %d%s", path, source_format, target, int(classes.max()), geotiff)
    else:
        las = _from_points(cloud, 6 if wide else 0)
    las.classification = classes
    with atomic_path(path) as tmp:
        las.write(tmp, do_compress=path.suffix.lower() == ".laz")
        if from_las:
            kept = cloud.meta.get("kept_index")
            _keep_header(Path(cloud.source), tmp, upgraded=upgraded,
                         subset=kept is not None and len(kept) != cloud.meta["n_points_file"])
    return path
