"""LiDAR commands: ``lidar segment``, ``lidar train``."""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from medvit.core.errors import MedvitError
from pipelines.cli.app import lidar_app
from pipelines.cli.options import (
    DatalistOpt,
    DataRootOpt,
    OutputDirOpt,
    ResumeOpt,
    TrainDeviceOpt,
    notes_line,
    pick_device,
    run_training,
)


def _parse_fill(items: list[str], features, checkpoint: Path) -> dict[str, float]:
    """``--fill`` values (``NAME=VALUE``, repeated or comma-separated) as name -> finite float, each a feature
    the checkpoint's net reads."""
    out: dict[str, float] = {}
    for item in (p.strip() for i in items for p in i.split(",")):
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name.strip() or not math.isfinite(number):
            raise MedvitError(f"--fill takes NAME=VALUE with a finite number, such as intensity=0.3, got {item!r}")
        if name.strip() not in features:
            raise MedvitError(f"--fill {item}: {checkpoint} reads no '{name.strip()}' (its features: "
                              f"{', '.join(features) or 'none'})")
        out[name.strip()] = number
    return out




class LabelFormat(str, Enum):
    label = "label"
    npy = "npy"
    las = "las"


@lidar_app.command("segment")
def lidar_segment(
    scans: Annotated[list[str], typer.Argument(help="Scans: KITTI .bin, nuScenes .pcd.bin, .pcd, .ply, .las/.laz, .npy.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")],
    checkpoint: Annotated[Path, typer.Option(help="A LiDAR .safetensors checkpoint (with its .json sidecar).")],
    tile_size: Annotated[Optional[float], typer.Option(help="Tile edge in metres; default from the checkpoint.")] = None,
    overlap: Annotated[Optional[float], typer.Option(help="Tile overlap in [0, 1).")] = None,
    max_points: Annotated[Optional[int], typer.Option(help="Points budget per tile and per net call; denser tiles are split, sparse ones share a call.")] = None,
    format: Annotated[Optional[LabelFormat], typer.Option("--format", help="label (SemanticKITTI), npy, or las; default: las for LAS input, else label.")] = None,
    bin_columns: Annotated[Optional[int], typer.Option(help="float32 columns of .bin scans when not KITTI's 4 (nuScenes .pcd.bin: 5), e.g. 6 for mmdet3d's Waymo files: x, y, z, intensity, f4, f5.")] = None,
    z_offset: Annotated[float, typer.Option("--z-offset", help="Metres added to z before the net sees it (e.g. -407 for a survey at absolute heights against a sensor-frame net); the output keeps the file's coordinates.")] = 0.0,
    intensity_scale: Annotated[float, typer.Option("--intensity-scale", help="Multiplies intensity after it is normalised to the checkpoint's units.")] = 1.0,
    fill: Annotated[Optional[list[str]], typer.Option("--fill", help="NAME=VALUE: give every point of a scan that lacks feature NAME the constant VALUE (in the checkpoint's training units), at a loss of accuracy; repeat it or separate several with commas.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse a scan that lies outside the checkpoint's training ranges, or a .bin that another width reads far better, instead of warning.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over tiles.")] = True,
) -> None:
    """Per-point labels for each scan, in the scan's point order and count. Runs on torch only: the sparse
    convolutions of the LiDAR nets do not convert to OpenVINO or ONNX Runtime (no --runtime)."""
    from pipelines.engine import Engine, check_options
    from pipelines.lidar.segment import check_scan_outputs, scene_settings, segment_scan
    from pointcloud.checkpoint import load_point_checkpoint

    check_options(overlap=overlap, tile_size=tile_size, max_points=max_points)
    if bin_columns is not None and not 3 <= bin_columns <= 64:
        raise MedvitError(f"--bin-columns must be 3..64 (x, y, z and up to 61 more), got {bin_columns}")
    if not math.isfinite(z_offset):
        raise MedvitError(f"--z-offset must be a finite number of metres, got {z_offset}")
    if not (math.isfinite(intensity_scale) and intensity_scale > 0):
        raise MedvitError(f"--intensity-scale must be a positive number, got {intensity_scale}")
    label_format = format.value if format else None
    protect = check_scan_outputs(scans, out, label_format)
    dev = pick_device(device)
    model = load_point_checkpoint(checkpoint, device=dev)
    engine = Engine(scene_settings(model.config, device=dev, overlap=overlap))
    fills = _parse_fill(fill or [], model.config.features, checkpoint)
    if intensity_scale != 1.0 and "intensity" not in model.config.features:
        raise MedvitError(f"--intensity-scale: {checkpoint} reads no intensity (its features: "
                          f"{', '.join(model.config.features) or 'none'})")
    for s in scans:  # a scan that fails stops the run here; the earlier scans' outputs stay
        r = segment_scan(s, model, out, label_format=label_format, protect=protect, bin_columns=bin_columns,
                         z_offset=z_offset, intensity_scale=intensity_scale, strict=strict, fill=fills,
                         engine=engine, tile_size=tile_size, max_points=max_points, progress=progress)
        extra = []
        if r.n_dropped:
            extra.append(f"{r.n_dropped:,} with NaN/inf coordinates")
        if r.n_bad_features:
            extra.append(f"{r.n_bad_features} with NaN/inf {'/'.join(model.config.features)}")
        if r.n_outside:
            extra.append(f"{r.n_outside} outside point_range")
        e = r.engine
        typer.echo(f"{s} -> {r.labels_path}: {r.n_points:,} points, {e.windows_run} tiles in {e.calls} calls, {e.seconds:.1f} s"
                   + notes_line(e)
                   + (f" ({'; '.join(extra)}, labelled {r.unlabelled})" if extra else ""))


@lidar_app.command("train")
def lidar_train(
    config: Annotated[Path, typer.Argument(help="LiDAR YAML config with a 'train' section.")],
    resume: ResumeOpt = False,
    device: TrainDeviceOpt = None,
    output_dir: OutputDirOpt = None,
    datalist: DatalistOpt = None,
    data_root: DataRootOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a point net (cross-entropy + Lovász-softmax, mIoU validation, atomic checkpoints, resume).
    Under torchrun --nproc_per_node=N it trains on N processes (DDP; batch_size per process)."""
    from pipelines.lidar.train import train_lidar
    from pointcloud.config import load_lidar_config

    from pipelines.engine.points import bounded_onednn_cache

    cfg = load_lidar_config(config)
    with bounded_onednn_cache():  # training's varying crop shapes would fill oneDNN's cache as tiles do
        run_training(train_lidar, cfg, config, device=device, resume=resume, progress=progress, metric="mIoU",
                     output_dir=output_dir, datalist=datalist, data_root=data_root)


