"""The frame and feature ranges a point net was trained on, and how a scan compares with them.

A checkpoint's ``stats`` (a sidecar key, written by ``lidar train``) hold, over its training
scans, the 0.5 and 99.5 percentiles of each coordinate in the scan frame and of each feature as
the net saw it before the config's scale, each feature's median, and for intensity the unit its
values were expressed in. ``lidar segment`` maps a scan's features the same way
(:func:`feature_values`) and warns, or refuses with ``--strict``, when most of its points lie
outside those ranges (:func:`range_findings`).

Intensity whose file type is an integer (LAS's uint16, a PCD/PLY ``uint8``/``uint16`` field, an
integer ``.npy`` field) is divided by that type's full range, so 0..65535 reads as 0..1; float
intensity (KITTI ``.bin`` 0..1, nuScenes 0..255, float PCD/PLY/``.npy`` fields) is taken as stored.
Other features are always taken as stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pointcloud.io import PointCloud

PERCENTILES = (0.5, 99.5)
NORMALISED = ("intensity",)
"""Features whose integer-typed values are mapped through their type's full range."""
UNITS = (1.0, 255.0, 65535.0)
"""The full ranges a float training intensity is taken to be expressed in (the smallest that holds it)."""
MOST = 0.5
"""A scan is suspect when more than this fraction of its points lies outside a training range."""
MARGIN = 0.05
"""Fraction of a training range's span added on both sides before a point counts as outside."""
SQUEEZED = 0.1
"""A feature whose upper percentile is under this fraction of the training's is on another scale."""
SAMPLE = 200_000
"""Points per training scan that enter the percentiles (a seeded random subset of larger scans)."""


def type_full_range(cloud: PointCloud, name: str) -> int | None:
    """The largest value of the integer type the file stores feature ``name`` in; None for floats
    or when the reader did not record the type."""
    dtype = cloud.meta.get("feature_dtypes", {}).get(name)
    if dtype is None:
        return None
    dtype = np.dtype(dtype)
    if dtype == np.bool_ or not np.issubdtype(dtype, np.integer):
        return None
    return int(np.iinfo(dtype).max)


def feature_values(cloud: PointCloud, name: str, unit: float | None) -> tuple[np.ndarray, str]:
    """``(N,)`` float32 values of feature ``name`` in a net's training units, and how they were made.

    ``unit`` is the full range the net's training intensity was expressed in (1.0: 0..1); an
    integer-typed intensity maps its type's 0..max onto 0..unit. ``unit=None`` (a checkpoint
    from before ranges were recorded) takes every feature as stored.
    """
    raw = cloud.feature(name).astype(np.float32)
    dtype = cloud.meta.get("feature_dtypes", {}).get(name, "float32")
    full = type_full_range(cloud, name) if name in NORMALISED and unit is not None else None
    if full is None:
        return raw, f"{cloud.meta.get('format', '?')} {dtype} as stored"
    return raw * np.float32(unit / full), f"{cloud.meta.get('format', '?')} {dtype} 0..{full} as 0..{unit:g}"


def infer_unit(high: float) -> float:
    """The smallest of :data:`UNITS` that holds ``high`` (a training upper percentile), else ``high``."""
    for u in UNITS:
        if high <= u * (1 + 1e-6):
            return u
    return float(high)


def sample_rows(n: int, seed: int = 0) -> np.ndarray | slice:
    """The rows of an ``n``-point training scan that enter the percentiles: all, or :data:`SAMPLE` at random."""
    return np.sort(np.random.default_rng(seed).choice(n, SAMPLE, replace=False)) if n > SAMPLE else slice(None)


def training_stats(xyz: Sequence[np.ndarray], feats: Sequence[np.ndarray], names: Sequence[str],
                   sources: Sequence[dict[str, str]]) -> dict[str, Any]:
    """The ``stats`` a checkpoint records: percentiles of coordinates ``(N_i, 3)`` and features
    ``(N_i, F)`` (training units, before the config's scale) over the training scans' samples
    (:func:`sample_rows`), the features' medians, and each feature's sources (the
    :func:`feature_values` descriptions, one mapping per scan)."""
    all_xyz = np.concatenate(list(xyz))
    all_f = np.concatenate(list(feats)).astype(np.float64)
    lo, hi = np.percentile(all_xyz, PERCENTILES, axis=0)
    out: dict[str, Any] = {"percentiles": list(PERCENTILES), "scans": len(xyz),
                           "xyz": {"low": lo.tolist(), "high": hi.tolist()}, "features": {}}
    for k, name in enumerate(names):
        flo, fhi = np.percentile(all_f[:, k], PERCENTILES)
        entry: dict[str, Any] = {"low": float(flo), "high": float(fhi), "median": float(np.median(all_f[:, k])),
                                 "sources": sorted({s[name] for s in sources})}
        if name in NORMALISED:
            entry["unit"] = infer_unit(float(fhi))
        out["features"][name] = entry
    return out


def feature_unit(stats: dict[str, Any] | None, name: str) -> float | None:
    """The unit :func:`feature_values` maps ``name`` to for a checkpoint with ``stats`` (None: as stored)."""
    if stats is None:
        return None
    return stats.get("features", {}).get(name, {}).get("unit", 1.0 if name in NORMALISED else None)


def _outside(values: np.ndarray, low: float, high: float) -> float:
    pad = MARGIN * (high - low)
    return float(((values < low - pad) | (values > high + pad)).mean())


def range_findings(z: np.ndarray, feats: dict[str, tuple[np.ndarray, str]], stats: dict[str, Any]) -> list[str]:
    """What is wrong with a scan against a checkpoint's ``stats``, one sentence a problem (empty: nothing).

    ``z``: ``(N,)`` heights as the net will see them (after any ``--z-offset``); ``feats``: name ->
    (values in training units after any ``--intensity-scale``, their description). A problem is
    more than :data:`MOST` of the points outside a training range (widened by :data:`MARGIN`), or a
    feature whose upper percentile is under :data:`SQUEEZED` of the training's; each sentence names
    the two ranges and the option that fixes it.
    """
    found = []
    p_lo, p_hi = PERCENTILES
    lo, hi = stats["xyz"]["low"][2], stats["xyz"]["high"][2]
    frac = _outside(z, lo, hi)
    if frac > MOST:
        s_lo, s_hi = np.nanpercentile(z, [p_lo, p_hi])
        found.append(f"z of {100 * frac:.0f} % of its points lies outside the checkpoint's training range {lo:.4g}..{hi:.4g} m "
                     f"(this scan: {s_lo:.4g}..{s_hi:.4g} m; {p_lo}-{p_hi} percentiles): is it in another frame, such as "
                     f"absolute heights? --z-offset {lo - s_lo:.1f} moves its lowest points to the training's")
    for name, (values, how) in feats.items():
        entry = stats.get("features", {}).get(name)
        if entry is None or not np.isfinite(values).any():
            continue
        lo, hi = entry["low"], entry["high"]
        s_lo, s_hi = (float(v) for v in np.nanpercentile(values, [p_lo, p_hi]))
        frac = _outside(values, lo, hi)
        squeezed = frac <= MOST and hi > 0 and 0 <= s_hi < SQUEEZED * hi
        if frac <= MOST and not squeezed:
            continue
        if name == "intensity" and s_hi > 0:
            fix = f"--intensity-scale {hi / s_hi:.3g} brings it to that range"
        else:
            fix = f"no option rescales {name}; is it the quantity the net was trained on?"
        what = f"of {100 * frac:.0f} % of its points lies outside" if frac > MOST else "spans a small part of"
        found.append(f"{name} {what} the checkpoint's training range {lo:.4g}..{hi:.4g} "
                     f"(this scan: {s_lo:.4g}..{s_hi:.4g}, {how}): {fix}")
    return found
