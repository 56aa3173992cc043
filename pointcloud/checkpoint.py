"""Point-net checkpoints: ``NAME.safetensors`` + ``NAME.json``, the same pair as the volume side
(:mod:`medvit.core.weights`).

The sidecar says ``"kind": "lidar"`` and carries the whole LiDAR config (labels, label map,
features and their scales, voxel size, net, inference tiling), so a checkpoint alone is
enough to segment a scan the way the net was trained. ``stats`` (written by ``lidar train``;
see :mod:`pointcloud.ranges`) records the coordinate and feature ranges of the training scans;
a checkpoint without them still loads, and its scans are then not checked against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import medvit
from medvit.core.errors import CheckpointError, ConfigError
from medvit.core.weights import FORMAT, FORMAT_VERSION, check_fit, checkpoint_sidecar, read_weights, write_weights
from pointcloud.config import LidarConfig, parse_lidar_config
from pointcloud.nets import POINT_NETS


@dataclass
class LoadedPointNet:
    net: nn.Module
    config: LidarConfig
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def stats(self) -> dict[str, Any] | None:
        """The training ranges (:func:`pointcloud.ranges.training_stats`), or None for an older checkpoint."""
        return self.meta.get("stats")


def build_from_config(cfg: LidarConfig) -> nn.Module:
    """The fresh net ``cfg.model`` names, for ``cfg``'s features, classes and voxel size."""
    return POINT_NETS.build(cfg.model.name, cfg.model.options, in_channels=cfg.in_channels,
                            out_channels=cfg.num_classes, voxel_size=cfg.voxel_size)


def save_point_checkpoint(net: nn.Module, path: str | Path, *, config: LidarConfig, extra: dict | None = None,
                          stats: dict | None = None) -> Path:
    """Write ``net`` with its sidecar; ``stats`` are the training ranges (:mod:`pointcloud.ranges`)."""
    dumped = config.model_dump(mode="json", exclude={"train"})
    sidecar = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": "lidar",
        "medvit_version": medvit.__version__,
        "net": dumped["model"],
        "labels": dumped["labels"],
        "config": dumped,
        "extra": dict(extra or {}),
    }
    if stats is not None:
        sidecar["stats"] = stats
    return write_weights(net, path, sidecar)


def load_point_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> LoadedPointNet:
    state, meta = read_weights(path, kind="lidar")
    try:
        cfg = parse_lidar_config(meta["config"], checkpoint_sidecar(path))
        net = build_from_config(cfg)
    except ConfigError as e:  # already names the sidecar and the key
        raise CheckpointError(str(e)) from None
    except KeyError as e:
        raise CheckpointError(f"{checkpoint_sidecar(path)}: missing key {e}") from None
    check_fit(path, state, net, f"{cfg.model.name}(in_channels={cfg.in_channels}, out_channels={cfg.num_classes})")
    net.load_state_dict(state, strict=True)
    return LoadedPointNet(net=net.to(device).eval(), config=cfg, meta={**meta, "checkpoint": str(path)})
