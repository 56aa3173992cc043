"""Scenes: read → tile (engine's PointScene) → point net → merged labels → write (``medvit lidar``).

Also the LiDAR task for the shared training loop (:mod:`pipelines.fit`): random square
crops of the training scans with rotation, flips, scaling and jitter seeded per sample,
cross-entropy plus Lovász-softmax, and mIoU validation on whole scans through the same
tiling as inference.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvit.data.datalist import read_datalist
from medvit.errors import ConfigError, InputError, about, listed
from medvit.io import check_output_folder
from medvit.io.writers import check_writable
from pipelines.engine import EngineReport
from pipelines.engine.scene import check_scene_extent, segment_scene
from pipelines.fit import SeededSamples, TrainResult, fit, prepared_output
from pointcloud.checkpoint import LoadedPointNet, build_from_config, save_point_checkpoint
from pointcloud.config import LAS_UNLABELLED, LAS_USER_CODES, LidarConfig
from pointcloud.io import PointCloud, points_in_range, read_points, to_file_order, write_labels, write_las
from pointcloud.io.kitti import sibling_label_path, width_message
from pointcloud.io.readers import check_scan_file, detect_format
from pointcloud.ranges import NORMALISED, feature_unit, feature_values, range_findings, sample_rows, training_stats

log = logging.getLogger(__name__)

SCAN_SUFFIXES = (".pcd.bin", ".bin", ".pcd", ".ply", ".las", ".laz", ".npy")


def scan_name(path: str | Path) -> str:
    name = Path(path).name
    for ext in SCAN_SUFFIXES:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


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


def segment_points(cloud: PointCloud, model: LoadedPointNet, *, feats: np.ndarray | None = None,
                   tile_size: float | None = None, overlap: float | None = None, max_points: int | None = None,
                   device: str | torch.device = "cpu", progress: bool = False) -> tuple[np.ndarray, int, EngineReport, int]:
    """Train ids ``(N,)`` for the cloud's points, the count outside ``point_range``, the engine's
    report, and the count whose net features are NaN or infinite; both kinds are left -1.
    ``feats``: the net's ``(N, F)`` features (:func:`net_features`), made from the cloud when None."""
    cfg = model.config
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
        dev = torch.device(device)
        amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if dev.type == "cuda" else None
        with about(cloud.source):  # the engine's errors (a stray far point, NaN from the net) name the scan
            lab, rep = segment_scene(cloud.xyz[inside], feats[inside], model.net,
                                     tile_size=tile_size or cfg.infer.tile_size,
                                     overlap=cfg.infer.overlap if overlap is None else overlap,
                                     max_points=max_points or cfg.infer.max_points, batch_size=cfg.infer.batch_size,
                                     device=dev, amp_dtype=amp, progress=progress, coords_in_features=True)
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
        return out_dir / f"{scan_name(path)}{'.laz' if str(path).lower().endswith('.laz') else '.las'}"
    return out_dir / f"{scan_name(path)}.{fmt}"


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
    """
    cfg = model.config
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
        tile, overlap = kwargs.get("tile_size") or cfg.infer.tile_size, kwargs.get("overlap")
        with about(path):
            check_scene_extent(seen.xyz[usable], tile, tile * (1 - (cfg.infer.overlap if overlap is None else overlap)))
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


# ------------------------------------------------------------------------------- training


@dataclass
class Scan:
    xyz: np.ndarray  # (N, 3) float64
    feats: np.ndarray  # (N, F) float32
    labels: np.ndarray  # (N,) int64 train ids, ignore where unlabelled
    unusable: str | None = None  # why no label of it is a train id (its raw ids), when none is
    sample: tuple[np.ndarray, np.ndarray] | None = None  # xyz and unscaled features of the rows that enter the stats
    sources: dict[str, str] = field(default_factory=dict)  # feature name -> how its values were made


def load_training_scan(item: dict, cfg: LidarConfig, ignore: int) -> Scan:
    cloud = read_points(item["image"], label_path=item.get("label"))
    if "width_hint" in cloud.meta:
        log.warning("%s: %s", cloud.source, width_message(cloud.meta["width_hint"]))
    keep = points_in_range(cloud, cfg.point_range) if cfg.point_range is not None else np.ones(len(cloud), bool)
    columns = scan_features(cloud, cfg, checkpoint_units(cfg, None, training=True))
    feats = net_features(columns, cfg, len(cloud))
    finite = np.isfinite(feats).all(1)  # one NaN intensity would turn every loss into NaN
    if (keep & ~finite).any():
        log.warning("%s: %d points with NaN or infinite %s left out of training", cloud.source,
                    int((keep & ~finite).sum()), "/".join(cfg.features))
    keep &= finite
    if not keep.any():
        raise InputError(cloud.source, "has no point with finite features inside point_range to train on")
    cloud = cloud.select(keep)
    with about(cloud.source):  # validation tiles the whole scan: a stray far point fails here, not after an epoch
        check_scene_extent(cloud.xyz, cfg.infer.tile_size, cfg.infer.tile_size * (1 - cfg.infer.overlap))
    labels = train_labels(cloud, cfg, ignore)
    rows = sample_rows(len(cloud))
    unscaled = np.stack([columns[n][0][keep] for n in cfg.features], 1) if cfg.features else np.zeros((len(cloud), 0))
    sample = (cloud.xyz[rows], unscaled[rows])
    if cfg.label_map is None and (outside := (labels == ignore)).any() and not outside.all():
        raw = np.unique(cloud.labels[outside])
        log.warning("%s: %d of %d points (%.1f %%) carry label ids %s outside the config's train ids 0..%d and are "
                    "ignored in training (a label_map maps raw ids to train ids)", item.get("label") or cloud.source,
                    int(outside.sum()), len(labels), 100 * outside.mean(), listed(raw), cfg.num_classes - 1)
    unusable = None
    if (labels == ignore).all():
        raw = np.unique(cloud.labels) if cloud.labels is not None else np.array([], np.int64)
        unusable = (f"{item.get('label') or cloud.source}: none of its label ids ({listed(raw)}) is a train id of the "
                    "config (labels/label_map): nothing to learn from it")
    return Scan(cloud.xyz, feats[keep], labels, unusable, sample, {n: how for n, (_, how) in columns.items()})


class RandomCrop:
    """One training sample from a scan: a square xy crop, subsampled, rotated, flipped, scaled, jittered."""

    def __init__(self, cfg: LidarConfig):
        self.a = cfg.augment
        self.rng = np.random.default_rng(0)

    def set_random_state(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, scan: Scan) -> dict[str, np.ndarray]:
        a, rng = self.a, self.rng
        centre = scan.xyz[rng.integers(len(scan.xyz)), :2]
        half = a.crop_size / 2
        m = np.all(np.abs(scan.xyz[:, :2] - centre) <= half, axis=1)
        idx = np.nonzero(m)[0]
        if len(idx) > a.crop_points:
            idx = np.sort(rng.choice(idx, a.crop_points, replace=False))
        xyz = (scan.xyz[idx] - np.r_[centre, 0.0]).astype(np.float32)
        if a.rotate_z:
            t = rng.uniform(0, 2 * np.pi)
            c, s = np.cos(t), np.sin(t)
            xyz[:, :2] = xyz[:, :2] @ np.array([[c, -s], [s, c]], np.float32).T
        for axis in (0, 1):
            if rng.random() < a.flip_prob:
                xyz[:, axis] = -xyz[:, axis]
        xyz *= np.float32(rng.uniform(*a.scale))
        if a.jitter:
            xyz += rng.normal(0, a.jitter, xyz.shape).astype(np.float32)
        # the net sees crop-relative x, y, z then the features, as PointScene gives them at inference
        return {"coord": xyz, "feat": np.concatenate([xyz, scan.feats[idx]], 1), "label": scan.labels[idx]}


def collate_points(samples: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    from pointcloud.structure import Point

    point = Point.from_clouds([s["coord"] for s in samples], [s["feat"] for s in samples])
    return {"point": point, "label": torch.from_numpy(np.concatenate([s["label"] for s in samples]))}


class ScanTask:
    """Random crops of labelled scans; CE + Lovász-softmax; mIoU on whole validation scans."""

    metric, per_label, collate = "miou", "iou", staticmethod(collate_points)
    IGNORE = -100

    def __init__(self, cfg: LidarConfig):
        from pointcloud.losses import CELovaszLoss

        tc = cfg.train
        self.cfg = cfg
        self.scans = [load_training_scan(it, cfg, self.IGNORE)
                      for it in read_datalist(tc.datalist, "training", base_dir=tc.data_root, need_label=True,
                                              one_image=True)]
        self.val = [load_training_scan(it, cfg, self.IGNORE)
                    for it in read_datalist(tc.datalist, "validation", base_dir=tc.data_root, required=False,
                                            need_label=True, one_image=True)]
        for scans, what in ((self.scans, "training"), (self.val, "validation")):
            if scans and all(sc.unusable for sc in scans):
                raise InputError(tc.datalist, f"no {what} scan has a point whose label id is a train id of the config "
                                              f"(labels, or label_map for raw ids): there is nothing to learn or score; "
                                              f"first: {scans[0].unusable}")
        for sc in self.scans + self.val:  # only when others have labels: else the error above says it once
            if sc.unusable:
                log.warning(sc.unusable)
        self.stats = training_stats([sc.sample[0] for sc in self.scans], [sc.sample[1] for sc in self.scans],
                                    list(cfg.features), [sc.sources for sc in self.scans])
        self.loss_fn = CELovaszLoss(ce_weight=cfg.loss.ce_weight, lovasz_weight=cfg.loss.lovasz_weight,
                                    ignore_index=self.IGNORE)

    def train_samples(self) -> SeededSamples:
        # each scan appears samples_per_scan times; every occurrence is its own seeded crop
        return SeededSamples(self.scans * self.cfg.augment.samples_per_scan, RandomCrop(self.cfg), self.cfg.train.seed)

    def loss(self, net: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        logits = net(batch["point"].to(device))
        return self.loss_fn(logits.float(), batch["label"].to(device))

    def validate(self, net: torch.nn.Module, device: torch.device, amp: bool) -> dict[str, Any] | None:
        if not self.val:
            return None
        from pointcloud.metrics import SegMetric

        cfg = self.cfg
        metric = SegMetric(cfg.num_classes, ignore_index=self.IGNORE)
        net.eval()
        for scan in self.val:
            pred, _ = segment_scene(scan.xyz, scan.feats, net, tile_size=cfg.infer.tile_size, overlap=cfg.infer.overlap,
                                    max_points=cfg.infer.max_points, batch_size=cfg.infer.batch_size, device=device,
                                    coords_in_features=True)
            metric.update(pred.astype(np.int64), scan.labels)
        res = metric.compute()
        per = {cfg.labels[i]: (None if not np.isfinite(v) else float(v)) for i, v in enumerate(res.iou)}
        return {"score": float(res.miou), "per_label": per}

    def save(self, net: torch.nn.Module, path: Path, extra: dict[str, Any]) -> None:
        save_point_checkpoint(net, path, config=self.cfg, extra=extra, stats=self.stats)


def train_lidar(cfg: LidarConfig, *, device: str | torch.device = "cpu", resume: bool = False,
                progress: bool = True, restart: bool = False) -> TrainResult:
    """Train ``cfg.model`` on the scans of ``cfg.train.datalist``; as :func:`pipelines.train.train`."""
    if cfg.train is None:
        raise ConfigError("config has no 'train' section")
    torch.manual_seed(cfg.train.seed)
    net = build_from_config(cfg)  # first: a bad net config fails before scans are read
    with prepared_output(cfg.train, resume=resume, restart=restart):
        task = ScanTask(cfg)
        return fit(task, net, cfg.train, device=device, resume=resume, progress=progress)
