"""The LiDAR task for the shared training loop (:mod:`pipelines.fit`), ``medvit lidar train``.

Random square crops of the training scans with rotation, flips, scaling and jitter seeded
per sample, cross-entropy plus Lovász-softmax, and mIoU validation on whole scans through
the same tiling as inference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvit.data.datalist import read_datalist
from medvit.core.errors import ConfigError, InputError, about, listed
from pipelines.engine import Engine, InferenceSettings
from pipelines.engine.points import segment_scene
from pipelines.engine.tiling import check_scene_extent
from pipelines.fit import SeededSamples, TrainResult, fit, prepared_output
from pipelines.lidar.segment import checkpoint_units, net_features, scan_features, train_labels
from pointcloud.checkpoint import build_from_config, save_point_checkpoint
from pointcloud.config import LidarConfig
from pointcloud.io import points_in_range, read_points
from pointcloud.io.kitti import width_message
from pointcloud.ranges import sample_rows, training_stats

log = logging.getLogger(__name__)



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
        self.engine: Engine | None = None

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
        if self.engine is None or self.engine.settings.device != torch.device(device):
            # one engine for every validation, so what out-of-memory taught carries over; fp32
            self.engine = Engine(InferenceSettings.from_sources(cfg.infer, device=device, amp=False))
        net.eval()
        for scan in self.val:
            pred, _ = segment_scene(self.engine, scan.xyz, scan.feats, net, tile_size=cfg.infer.tile_size,
                                    max_points=cfg.infer.max_points, coords_in_features=True)
            metric.update(pred.astype(np.int64), scan.labels)
        res = metric.compute()
        per = {cfg.labels[i]: (None if not np.isfinite(v) else float(v)) for i, v in enumerate(res.iou)}
        return {"score": float(res.miou), "per_label": per}

    def save(self, net: torch.nn.Module, path: Path, extra: dict[str, Any]) -> None:
        save_point_checkpoint(net, path, config=self.cfg, extra=extra, stats=self.stats)


def train_lidar(cfg: LidarConfig, *, device: str | torch.device = "cpu", resume: bool = False,
                progress: bool = True, restart: bool = False) -> TrainResult:
    """Train ``cfg.model`` on the scans of ``cfg.train.datalist``; as :func:`pipelines.volume.train.train`."""
    if cfg.train is None:
        raise ConfigError("config has no 'train' section")
    torch.manual_seed(cfg.train.seed)
    net = build_from_config(cfg)  # first: a bad net config fails before scans are read
    with prepared_output(cfg.train, resume=resume, restart=restart):
        task = ScanTask(cfg)
        return fit(task, net, cfg.train, device=device, resume=resume, progress=progress)
