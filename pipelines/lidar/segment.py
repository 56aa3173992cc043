"""Scans: read → tile (the engine's PointScene) → point net → merged labels → write
(``medvit lidar segment``), and the feature and label preparation training shares."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvit.core.errors import InputError, about, listed
from medvit.core.files import check_output_folder, check_writable
from pipelines.engine import Engine, EngineReport, InferenceSettings
from pipelines.engine.points import segment_scene
from pipelines.engine.tiling import check_scene_extent
from pointcloud.checkpoint import LoadedPointNet
from pointcloud.config import LAS_UNLABELLED, LAS_USER_CODES, LidarConfig
from pointcloud.io import PointCloud, points_in_range, read_points, to_file_order, write_labels, write_las
from pointcloud.io.kitti import sibling_label_path, width_message
from pointcloud.io.readers import check_scan_file, detect_format, scan_stem
from pointcloud.ranges import NORMALISED, feature_unit, feature_values, range_findings

log = logging.getLogger(__name__)

def checkpoint_units(cfg: LidarConfig, stats: dict[str, Any] | None, *, training: bool = False) -> dict[str, float | None]:
    """Per feature, the unit :func:`pointcloud.ranges.feature_values` maps it to: for training and for a
    checkpoint with ``stats`` integer-typed intensity is normalised; an older checkpoint takes it as stored."""
    return {n: (1.0 if n in NORMALISED else None) if training else feature_unit(stats, n) for n in cfg.features}


FILLED = "missing: filled with"
"""How :func:`scan_features` describes a column made by ``fill``."""


def scan_features(cloud: PointCloud, cfg: LidarConfig, units: dict[str, float | None], *,
                  intensity_scale: float = 1.0, fill: dict[str, float] | None = None,
                  stats: dict[str, Any] | None = None) -> dict[str, tuple[np.ndarray, str]]:
    """The config's features in order: name -> (``(N,)`` float32 values in the net's training units,
    before the config's scale; how they were made). ``intensity_scale`` multiplies intensity.

    A feature the scan lacks is the constant ``fill[name]`` (training units; ``--fill``), else an
    InputError that names ``--fill`` and, from ``stats``, the feature's training median.
    """
    cols = {}
    for name in cfg.features:
        if name not in cloud.feature_names:
            if fill and name in fill:
                cols[name] = (np.full(len(cloud), fill[name], np.float32), f"{FILLED} {fill[name]:g} (--fill)")
                continue
            plain = cloud.meta.get("format") == "npy" and all(n.startswith("f") for n in cloud.feature_names)
            hint = "; a plain .npy names its columns f0, f1, ...: save a structured array with named fields" if plain else ""
            median = (stats or {}).get("features", {}).get(name, {}).get("median")
            value = "VALUE" if median is None else f"{median:.3g}"
            has = cloud.meta.get("las_dimensions", cloud.feature_names)
            raise InputError(cloud.source, f"has no '{name}' field (it has: {listed(has)}); the checkpoint's net needs "
                                           f"it{hint}; --fill {name}={value} gives every point that constant "
                                           f"{'(its training median) ' if median is not None else ''}at a loss of accuracy")
        values, how = feature_values(cloud, name, units.get(name))
        if name == "intensity" and intensity_scale != 1.0:
            values, how = values * np.float32(intensity_scale), f"{how}, x {intensity_scale:g} (--intensity-scale)"
        cols[name] = (values, how)
    return cols


def net_features(columns: dict[str, tuple[np.ndarray, str]], cfg: LidarConfig, n: int) -> np.ndarray:
    """``(n, F)`` float32: :func:`scan_features`' columns in the config's order, each times its scale."""
    cols = [columns[name][0] * np.float32(scale) for name, scale in cfg.features.items()]
    return np.stack(cols, 1) if cols else np.zeros((n, 0), np.float32)


def train_labels(cloud: PointCloud, cfg: LidarConfig, ignore: int) -> np.ndarray:
    """Train ids of a labelled cloud; raw ids outside the map (or the label set) become ``ignore``."""
    if cloud.labels is None:
        raise InputError(cloud.source, "has no per-point labels to train on")
    raw = cloud.labels.astype(np.int64)
    if cfg.label_map is None:
        return np.where((raw >= 0) & (raw < cfg.num_classes), raw, ignore)
    lut = {int(k): int(v) for k, v in cfg.label_map.items()}
    uniq, inv = np.unique(raw, return_inverse=True)
    return np.array([lut.get(int(u), ignore) for u in uniq], dtype=np.int64)[inv]


@contextlib.contextmanager
def held_warnings(name: str):
    """Hold the records logger ``name`` (and its children) emits inside the block in the yielded list,
    to be passed on with ``logging.getLogger(r.name).handle(r)`` once the caller knows it goes on."""
    held: list[logging.LogRecord] = []

    class Hold(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            held.append(record)

    logger, hold = logging.getLogger(name), Hold()
    propagate, logger.propagate = logger.propagate, False
    logger.addHandler(hold)
    try:
        yield held
    finally:
        logger.removeHandler(hold)
        logger.propagate = propagate


@dataclass
class ScanResult:
    input: str
    labels_path: Path
    n_points: int
    """Points in the file, and labels written."""
    n_dropped: int
    """Points with NaN or infinite coordinates, written as unlabelled."""
    n_outside: int
    engine: EngineReport | None = None
    counts: dict[str, int] = field(default_factory=dict)
    n_bad_features: int = 0
    """Points left unlabelled because a feature the net reads is NaN or infinite."""
    unlabelled: int = 255
    """The id (LAS: ASPRS class) the unsegmented points were written as."""


def scene_settings(cfg: LidarConfig, *, device: str | torch.device = "cpu",
                   overlap: float | None = None) -> InferenceSettings:
    """The settings ``medvit lidar segment`` runs a LiDAR config ``cfg`` with: its ``infer`` section
    (overlap, batch size) under ``--overlap`` (None: the config's), autocast on CUDA. A bad override
    raises MedvitError naming its option."""
    return InferenceSettings.from_sources(cfg.infer, device=device, overlap=overlap)


def segment_points(cloud: PointCloud, model: LoadedPointNet, *, engine: Engine | None = None,
                   feats: np.ndarray | None = None, tile_size: float | None = None, max_points: int | None = None,
                   progress: bool = False) -> tuple[np.ndarray, int, EngineReport, int]:
    """Train ids ``(N,)`` for the cloud's points, the count outside ``point_range``, the engine's
    report, and the count whose net features are NaN or infinite; both kinds are left -1.
    ``engine`` runs the tiles with its settings (overlap, batch size, device; default a fresh one
    with :func:`scene_settings` on the CPU); ``tile_size``/``max_points`` default to the config's.
    ``feats``: the net's ``(N, F)`` features (:func:`net_features`), made from the cloud when None."""
    cfg = model.config
    engine = engine if engine is not None else Engine(scene_settings(cfg))
    inside = points_in_range(cloud, cfg.point_range) if cfg.point_range is not None else np.ones(len(cloud), bool)
    n_out = int((~inside).sum())
    if feats is None:  # a missing field is an error even when no point is in range
        feats = net_features(scan_features(cloud, cfg, checkpoint_units(cfg, model.stats)), cfg, len(cloud))
    finite = np.isfinite(feats).all(1)
    n_bad = int((inside & ~finite).sum())
    if n_bad:
        # the id they are written as depends on the output format: the caller's report names it
        log.warning("%s: %d points have NaN or infinite %s; left unlabelled", cloud.source, n_bad,
                    "/".join(cfg.features))
    inside &= finite
    labels = np.full(len(cloud), -1, dtype=np.int64)
    rep = EngineReport()
    if inside.any():
        with about(cloud.source):  # the engine's errors (a stray far point, NaN from the net) name the scan
            lab, rep = segment_scene(engine, cloud.xyz[inside], feats[inside], model.net,
                                     tile_size=tile_size or cfg.infer.tile_size,
                                     max_points=max_points or cfg.infer.max_points, progress=progress,
                                     coords_in_features=True)
        labels[inside] = lab
    return labels, n_out, rep, n_bad


def las_fields(path: str | Path, wanted: list[str]) -> list[str]:
    """The dimensions of ``wanted`` a LAS/LAZ file has (all of ``wanted`` when its header cannot be read:
    the reader then names what is wrong), so a missing feature is reported, or filled, by :func:`scan_features`."""
    import struct

    import laspy

    try:
        with laspy.open(path) as reader:
            have = set(reader.header.point_format.dimension_names)
    except (laspy.errors.LaspyException, OSError, ValueError, EOFError, struct.error):
        return wanted
    return [f for f in wanted if f in have]


def scan_output(path: str | Path, out_dir: Path, label_format: str | None = None) -> Path:
    """Where :func:`segment_scan` writes ``path``'s labels: ``OUT/NAME.label`` (or ``.npy``), and for
    LAS/LAZ input (or ``label_format="las"``) ``OUT/NAME.las``/``.laz``."""
    is_las = str(path).lower().endswith((".las", ".laz"))
    fmt = label_format or ("las" if is_las else "label")
    if fmt == "las":
        return out_dir / f"{scan_stem(path)}{'.laz' if str(path).lower().endswith('.laz') else '.las'}"
    return out_dir / f"{scan_stem(path)}.{fmt}"


def check_scan_outputs(scans: list[str], out_dir: Path, label_format: str | None = None) -> list[str]:
    """The inputs to protect when segmenting ``scans`` into ``out_dir``, after checking, before any
    scan runs, that every scan is a file of a known format, no two scans write the same output, and
    no output would overwrite an input (a scan, or the SemanticKITTI labels read beside a ``.bin``).
    """
    out_dir = check_output_folder(out_dir)
    inputs: dict[Path, str] = {}
    for s in scans:
        p = check_scan_file(s)
        inputs[p.resolve()] = s
        if detect_format(p) == "kitti" and (lab := sibling_label_path(p)) is not None:
            inputs[lab.resolve()] = str(lab)
    targets: dict[Path, str] = {}
    for s in scans:
        t = scan_output(s, out_dir, label_format).resolve()
        if t in targets:
            raise InputError(s, f"would write the same output {t.name} as {targets[t]}; segment them into separate folders")
        if t in inputs:
            raise InputError(inputs[t], f"is an input and would be overwritten by the labels of {s}; choose another output folder")
        targets[t] = s
    if targets:  # a read-only folder, before the first scan runs rather than after its inference
        check_writable(next(iter(targets)))
    return list(inputs.values())


def segment_scan(path: str, model: LoadedPointNet, out_dir: Path, *, label_format: str | None = None,
                 protect: list[str] | None = None, bin_columns: int | None = None, z_offset: float = 0.0,
                 intensity_scale: float = 1.0, strict: bool = False, fill: dict[str, float] | None = None,
                 **kwargs: Any) -> ScanResult:
    """Segment one scan file and write its labels in the file's order and point count.

    Output: ``OUT/NAME.label`` (SemanticKITTI uint32), ``.npy``, or for LAS/LAZ inputs a
    ``NAME.las``/``.laz`` copy with the classification set (``label_format`` overrides).
    ``.label``/``.npy`` hold output ids (raw ids with a ``label_map``) and ``infer.unlabelled``;
    LAS holds ASPRS classes: ``las_classes`` (else train id + 64, said once per loaded model) and
    1 "unclassified" for unsegmented points.
    ``bin_columns``: the float32 width of ``.bin`` scans written with another than KITTI's 4.
    ``z_offset`` (metres) is added to z and ``intensity_scale`` multiplies intensity before the
    net sees them (the output keeps the file's coordinates). A checkpoint with training ranges
    (``model.stats``) is compared with the scan (:func:`pointcloud.ranges.range_findings`): each
    problem is a warning, or with ``strict`` an InputError. Every refusal comes before any warning.
    ``fill``: feature name -> constant for a feature the scan lacks (a warning says it costs accuracy).
    ``kwargs`` are :func:`segment_points`' (``engine``, ``tile_size``, ``max_points``, ``progress``).
    """
    cfg = model.config
    if kwargs.get("engine") is None:
        kwargs["engine"] = Engine(scene_settings(cfg))
    target = scan_output(path, Path(out_dir), label_format)
    is_las = target.suffix.lower() in (".las", ".laz")
    if is_las:
        out_ids, unlabelled = cfg.las_codes(), LAS_UNLABELLED
        if int(out_ids.max()) > 255:  # before the scan is read and the net runs
            raise InputError(path, f"LAS classification holds 0..255: without las_classes in its config this "
                                   f"checkpoint writes its {cfg.num_classes} train ids as id + {LAS_USER_CODES}, up to "
                                   f"{int(out_ids.max())}; give the config a las_classes table, or choose --format label or npy")
    else:
        out_ids, unlabelled = cfg.output_ids(), cfg.infer.unlabelled  # raw ids when the checkpoint has a label_map
    # labels beside a SemanticKITTI scan are ground truth, not needed here (and a bad one must not stop it)
    las_in = str(path).lower().endswith((".las", ".laz"))
    with held_warnings("pointcloud.io") as held:  # said after the refusals below, so a refused scan prints one line
        cloud = read_points(path, fields=las_fields(path, list(cfg.features)) if las_in else None,
                            sibling_labels=False, bin_columns=bin_columns, warn_nonfinite=False)
    warnings = []
    if "width_hint" in cloud.meta:  # before anything else is judged: every value may sit in the wrong column
        if strict:
            raise InputError(path, width_message(cloud.meta["width_hint"]) + " (--strict)")
        warnings.append(width_message(cloud.meta["width_hint"]))
    dropped = int(cloud.meta.get("dropped_nonfinite", 0))
    if is_las and dropped:  # before the net runs: the output could not keep the scan's count
        raise InputError(path, f"{dropped} points have NaN or infinite coordinates, which a LAS file cannot store; "
                               "choose --format label or npy to keep the scan's point count")
    seen = cloud  # what the net sees; the output is written from the file's own points
    if z_offset:
        seen = replace(cloud, xyz=cloud.xyz + np.array([0.0, 0.0, z_offset]))
    columns = scan_features(seen, cfg, checkpoint_units(cfg, model.stats), intensity_scale=intensity_scale, fill=fill,
                            stats=model.stats)
    filled = [n for n, (_, how) in columns.items() if how.startswith(FILLED)]
    inside = points_in_range(seen, cfg.point_range) if cfg.point_range is not None else np.ones(len(cloud), bool)
    if cfg.point_range is not None and len(cloud) and not inside.any():
        # An all-unlabelled output is never what was wanted: usually the scan is in another frame
        # (map or UTM coordinates against a sensor-centred net).
        lo, hi = np.nanmin(seen.xyz, 0), np.nanmax(seen.xyz, 0)
        span = ", ".join(f"{a} {l:.6g}..{h:.6g}" for a, l, h in zip("xyz", lo, hi))
        shifted = f" after --z-offset {z_offset:g}" if z_offset else ""
        r = cfg.point_range
        in_xy = points_in_range(np.c_[seen.xyz[:, :2], np.full(len(cloud), (r[2] + r[5]) / 2)], r).any()
        target = model.stats["xyz"]["low"][2] if model.stats is not None else r[2]
        low = float(np.nanpercentile(seen.xyz[:, 2], 0.5))
        fix = (f"; only its heights lie outside: --z-offset {target - low:.1f} moves its lowest points to "
               f"{target:.4g} m") if in_xy else ""
        raise InputError(path, f"no point lies inside the checkpoint's point_range {list(r)} (the scan spans "
                               f"{span}{shifted}); is it in the frame the net was trained in?{fix}")
    if "width_hint" in cloud.meta:
        pass  # values read in the wrong columns are out of range because of that: the width warning says it
    elif model.stats is not None:  # over the points the net will see: the rest are reported as outside point_range
        found = range_findings(seen.xyz[inside, 2],
                               {n: (v[inside], how) for n, (v, how) in columns.items() if n not in filled}, model.stats)
        if found and strict:
            raise InputError(path, "; ".join(found) + " (--strict)")
        warnings += found
    else:
        log.info("%s: %s records no training ranges (written before they were): the scan's frame and features "
                 "are not checked against them", path, model.meta.get("checkpoint", "the checkpoint"))
    feats = net_features(columns, cfg, len(cloud))
    usable = inside & np.isfinite(feats).all(1)
    if usable.any():  # the engine's own refusal of a scene too wide to tile, before any warning
        tile = kwargs.get("tile_size") or cfg.infer.tile_size
        with about(path):
            check_scene_extent(seen.xyz[usable], tile, tile * (1 - kwargs["engine"].settings.overlap))
    for record in held:
        logging.getLogger(record.name).handle(record)
    if dropped:
        warnings.append(f"{dropped:,} of {int(cloud.meta['n_points_file']):,} points have NaN or infinite coordinates: "
                        f"written as unlabelled ({unlabelled})")
    for name in filled:
        entry = (model.stats or {}).get("features", {}).get(name)
        trained = f"over {entry['low']:.3g}..{entry['high']:.3g}" if entry else "from point to point"
        warnings.append(f"has no '{name}' field: every point gets {name} {fill[name]:g} (--fill); the net was trained "
                        f"with it varying {trained}, so expect less accurate labels")
    for w in warnings:
        log.warning("%s: %s", path, w)
    if is_las and cfg.las_classes is None and not model.meta.get("las_codes_said"):  # once a model, after refusals
        model.meta["las_codes_said"] = True
        log.warning("%s has no las_classes: LAS classes are written as train id + %d (ASPRS user-defined: %s), "
                    "unsegmented points as %d", model.meta.get("checkpoint", "the checkpoint"), LAS_USER_CODES,
                    ", ".join(f"{n} {i + LAS_USER_CODES}" for i, n in sorted(cfg.labels.items())), LAS_UNLABELLED)
    train_ids, n_out, rep, n_bad = segment_points(seen, model, feats=feats, **kwargs)
    done = train_ids >= 0
    labels = np.full(len(cloud), unlabelled, dtype=np.int64)
    labels[done] = out_ids[train_ids[done]]
    if n_out:
        log.warning("%s: %d points outside point_range %s were left unlabelled (%d)", path, n_out,
                    list(cfg.point_range), unlabelled)
    sibling = sibling_label_path(Path(path)) if detect_format(path) == "kitti" else None
    guard = [path] + list(protect or []) + ([str(sibling)] if sibling is not None else [])
    if is_las:
        write_las(cloud, labels, target, protect=guard)
    else:
        write_labels(to_file_order(cloud, labels, fill=unlabelled), target, protect=guard)
    counts = {cfg.labels[int(k)]: int(v) for k, v in zip(*np.unique(train_ids[done], return_counts=True))}
    if not done.all():
        counts["unlabelled"] = int((~done).sum())
    return ScanResult(str(path), target, int(cloud.meta["n_points_file"]), dropped, n_out, rep, counts, n_bad,
                      unlabelled)
