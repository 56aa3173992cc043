"""``medvit demo --lidar``: the LiDAR branch end to end on synthetic streets.

1. Writes aggregated street scenes (a spinning LiDAR's sweeps ray-cast against ground,
   buildings, cars, poles and vegetation, merged into maps) as KITTI ``.bin`` + ``.label``
   with a datalist: training maps, one validation map and a held-out map of ≥ 1M points.
2. Trains a small FlatFormer (FlatFormer blocks inside a sparse U-Net) on random crops.
3. Segments the held-out map through the engine's tiling (``medvit lidar segment``'s
   path), prints per-class IoU and mIoU against its true labels, and writes a bird's-eye
   PNG coloured by the predicted labels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from medvit.core.files import atomic_path, make_output_folder

DEMO_LIDAR_CONFIG: dict = {
    "labels": {0: "ground", 1: "building", 2: "car", 3: "pole", 4: "vegetation"},
    # ASPRS classes for LAS output: ground 2, building 6, vegetation 5 (high: trees and hedges), car and pole user-defined
    "las_classes": {0: 2, 1: 6, 2: 64, 3: 65, 4: 5},
    "features": {"intensity": 1.0},
    "voxel_size": 0.2,
    # the maps' world frame (streets along +x up to 300 m, the sensor 1.8 m above the ground at z 0):
    # a scan in another frame is refused, or warned about against the checkpoint's training ranges
    "point_range": [-100.0, -100.0, -5.0, 400.0, 100.0, 40.0],
    "model": {"name": "flatformer", "options": {"channels": [16, 32, 64], "group_size": 64, "heads": 2}},
    "augment": {"samples_per_scan": 16, "crop_points": 30_000, "crop_size": 30.0, "rotate_z": True, "flip_prob": 0.5, "scale": [0.95, 1.05],
                "jitter": 0.01},
    "loss": {"ce_weight": 1.0, "lovasz_weight": 1.0},
    "train": {"datalist": "scenes/datalist.json", "output_dir": "run", "epochs": 18, "batch_size": 2, "lr": 3e-3,
              "weight_decay": 1e-4, "warmup_epochs": 1, "val_every": 6, "seed": 0, "amp": True},
    "infer": {"tile_size": 50.0, "overlap": 0.25, "max_points": 150_000},
}

N_TRAIN_MAPS = 4
TRAIN_MAP_POINTS = 300_000
HELD_OUT_POINTS = 1_000_000


def write_kitti(xyz: np.ndarray, intensity: np.ndarray, labels: np.ndarray | None, stem: Path) -> None:
    """``stem.bin`` (float32 x, y, z, intensity) and ``stem.label`` (uint32), atomically."""
    from pointcloud.io import write_labels

    arr = np.c_[xyz, intensity].astype(np.float32)
    with atomic_path(stem.with_suffix(".bin")) as tmp:
        arr.tofile(tmp)
    if labels is not None:
        write_labels(labels, stem.with_suffix(".label"))


def write_scene_set(folder: Path, *, seed: int, n_train: int = N_TRAIN_MAPS, train_points: int = TRAIN_MAP_POINTS,
                    held_out_points: int = HELD_OUT_POINTS) -> Path:
    from pointcloud.data.synthetic import make_aggregated_scene

    rng = np.random.default_rng(seed)
    make_output_folder(folder)
    lists: dict[str, list] = {"training": [], "validation": [], "test": []}
    plan = [("training", train_points)] * n_train + [("validation", train_points), ("test", held_out_points)]
    for i, (split, n) in enumerate(plan):
        cloud = make_aggregated_scene(rng, n_points_min=n, length=max(100.0, 300.0 * n / 1_000_000))
        stem = folder / f"{split}_{i:02d}"
        write_kitti(cloud.xyz, cloud.feature("intensity"), cloud.labels, stem)
        lists[split].append({"image": stem.name + ".bin", "label": stem.name + ".label"})
    datalist = folder / "datalist.json"
    with atomic_path(datalist) as tmp:
        Path(tmp).write_text(json.dumps(lists, indent=1))
    return datalist


def run_lidar_demo(out: Path, *, device: str = "cpu", seed: int = 0, config: dict | None = None,
                   scene_sizes: tuple[int, int, int] = (N_TRAIN_MAPS, TRAIN_MAP_POINTS, HELD_OUT_POINTS)) -> dict:
    """Run the LiDAR demo into ``out``; returns the summary it prints."""
    from pipelines.engine import Engine
    from pipelines.lidar.segment import scene_settings, segment_scan
    from pipelines.lidar.train import train_lidar
    from pipelines.lidar.report import write_bev
    from pointcloud.checkpoint import load_point_checkpoint
    from pointcloud.config import load_lidar_config
    from pointcloud.io import read_points
    from pointcloud.metrics import SegMetric

    from pipelines.volume.demo import write_run_config

    t_start = time.time()
    out, raw, cfg_path = write_run_config(out, config or DEMO_LIDAR_CONFIG, seed=seed, data="scenes",
                                          name="lidar_config.yaml")

    n_train, train_points, held_out_points = scene_sizes
    print(f"[1/4] writing synthetic street scenes to {out / 'scenes'}", flush=True)
    write_scene_set(out / "scenes", seed=seed, n_train=n_train, train_points=train_points, held_out_points=held_out_points)
    cfg = load_lidar_config(cfg_path)

    print(f"[2/4] training {cfg.model.name} on {n_train} maps ({cfg.train.epochs} epochs, {device})", flush=True)
    t0 = time.time()
    res = train_lidar(cfg, device=device, restart=True)  # the demo's own folder: a rerun starts afresh
    t_train = time.time() - t0
    ckpt = res.output_dir / "best.safetensors"
    print(f"      done in {t_train:.0f} s; best validation mIoU {res.best_metric:.3f}; checkpoint {ckpt}", flush=True)

    dl = json.loads((out / "scenes" / "datalist.json").read_text())
    scan = out / "scenes" / dl["test"][0]["image"]
    print(f"[3/4] segmenting the held-out map {scan.name} through tiling", flush=True)
    model = load_point_checkpoint(ckpt, device=device)
    t0 = time.time()
    r = segment_scan(str(scan), model, out / "segmentations", engine=Engine(scene_settings(model.config, device=device)))
    t_seg = time.time() - t0
    truth = read_points(scan, label_path=scan.with_suffix(".label"))
    pred = read_points(scan, label_path=r.labels_path).labels
    metric = SegMetric(cfg.num_classes)
    metric.update(pred, truth.labels)
    scores = metric.compute()
    names = [cfg.labels[i] for i in range(cfg.num_classes)]
    iou = {n: float(v) for n, v in zip(names, scores.iou)}
    for n in names:
        print(f"      {n:<11s} IoU {iou[n]:.3f}")
    print(f"      mIoU {scores.miou:.3f} on {len(pred):,} points ({r.engine.windows_run} tiles, {t_seg:.0f} s, "
          f"{len(pred) / t_seg:,.0f} points/s)", flush=True)

    print("[4/4] writing a bird's-eye picture of the labels", flush=True)
    png = write_bev(truth.xyz, pred, out / "segmentations" / f"{scan.stem}_bev.png", names=cfg.labels)
    summary = {"miou": float(scores.miou), "iou": iou, "points": int(len(pred)), "tiles": r.engine.windows_run,
               "train_seconds": round(t_train, 1), "segment_seconds": round(t_seg, 1),
               "total_seconds": round(time.time() - t_start, 1), "checkpoint": str(ckpt),
               "labels": str(r.labels_path), "bev_png": str(png)}
    with atomic_path(out / "lidar_summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1))
    print(f"done in {summary['total_seconds']:.0f} s; outputs under {out} (lidar_summary.json, {png.name})")
    return summary
