"""Typed, validated LiDAR configs (YAML), the scene-side twin of :mod:`medvit.config`,
both on :mod:`medvit.core.config`.

Example (see ``configs/lidar/*.yaml``)::

    labels: {0: ground, 1: building, 2: car, 3: pole, 4: vegetation}
    las_classes: {0: 2, 1: 6, 2: 64, 3: 65, 4: 5}    # ASPRS codes for LAS output
    features: {intensity: 1.0}
    voxel_size: 0.1
    model: {name: flatformer, options: {channels: [32, 64, 128]}}
    train: {datalist: scans.json, epochs: 50}
    infer: {tile_size: 50, overlap: 0.25, max_points: 200000}

The net sees, per point, its tile-relative ``x, y, z`` followed by the named features,
each multiplied by its scale. Intensity stored as an integer (LAS's 16 bits) is first mapped
through its type's full range to 0..1; float intensity is taken as stored (KITTI 0..1, nuScenes
0..255): see :mod:`pointcloud.ranges`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from medvit.core.config import StrictModel, TrainConfig, check_unique_names, read_yaml, validate_mapping

MIN_VOXEL_SIZE = 1e-3
"""Metres: finer voxels would overflow the integer voxel grid over a scene's extent."""

LAS_UNLABELLED = 1
"""ASPRS class written to LAS for points left unsegmented: 1, "unclassified" (0 says "never classified")."""
LAS_USER_CODES = 64
"""First ASPRS user-definable class; without ``las_classes`` train id k is written to LAS as 64 + k."""
LAS_REFUSED_CODES = {0: "'created, never classified'", LAS_UNLABELLED: "'unclassified', given to unsegmented points",
                     8: "reserved by ASPRS", 12: "reserved by ASPRS",
                     **{c: "reserved by ASPRS" for c in range(23, LAS_USER_CODES)}}
"""ASPRS LAS 1.4 R15 classes a segmented class may not be written as."""


class PointModelConfig(StrictModel):
    name: str
    """A registered point net: see ``pointcloud.nets.POINT_NETS.names()``."""
    options: dict[str, Any] = Field(default_factory=dict)


class PointAugmentConfig(StrictModel):
    """Training-time sampling and augmentation of scans."""

    samples_per_scan: int = Field(1, ge=1)
    """Random crops drawn from each training scan per epoch."""
    crop_points: int = Field(60_000, ge=1)
    """Points per training sample: a random square xy crop around a random point, subsampled to this."""
    crop_size: float = Field(40.0, gt=0)
    """Edge of the training crop in metres."""
    rotate_z: bool = True
    flip_prob: float = Field(0.5, ge=0, le=1)
    scale: tuple[float, float] = (0.95, 1.05)
    jitter: float = Field(0.01, ge=0)
    """Standard deviation of Gaussian coordinate noise in metres."""

    @model_validator(mode="after")
    def _scale(self) -> PointAugmentConfig:
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale is a (low, high) range of positive factors with low <= high, got {list(self.scale)}")
        return self


class SceneInferConfig(StrictModel):
    tile_size: float = Field(50.0, gt=0)
    overlap: float = Field(0.25, ge=0, lt=1)
    max_points: int = Field(200_000, ge=1)
    batch_size: int = Field(1, ge=1)
    unlabelled: int = Field(255, ge=0, le=65535)  # a SemanticKITTI .label keeps 16 bits of semantic id
    """Label written for points that were not segmented (non-finite or outside ``point_range``); in the
    output's id space (raw ids when the config has a ``label_map``), so never an id a class is written as."""


class LossConfig(StrictModel):
    ce_weight: float = Field(1.0, ge=0)
    lovasz_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some_loss(self) -> LossConfig:
        if self.ce_weight + self.lovasz_weight <= 0:
            raise ValueError("ce_weight and lovasz_weight are both 0: there would be no loss to train on")
        return self


class LidarConfig(StrictModel):
    RELATIVE_PATHS = {"train": ("datalist", "data_root")}

    labels: dict[int, str]
    """Train id -> name, ids 0..K-1."""
    label_map: dict[int, int] | None = None
    """Raw label id in the files -> train id (e.g. SemanticKITTI's 10 -> car); unmapped raw ids are ignored in
    training. Segmentations are written back in raw ids: each class as the smallest raw id mapped to it
    (SemanticKITTI's ``learning_map_inv``), so that the dataset's own tools read them."""
    las_classes: dict[int, int] | None = None
    """Train id -> ASPRS class code written to LAS output (2 ground, 5 high vegetation, 6 building, 11 road
    surface, 17 bridge deck, ...; 64..255 user-defined for classes ASPRS lacks). Every train id, codes distinct,
    none of :data:`LAS_REFUSED_CODES`. Without it LAS output gets train id + 64. Applies to LAS output only, and
    maps train ids even when there is a ``label_map`` (the dataset's raw ids are not ASPRS codes)."""
    features: dict[str, float] = Field(default_factory=lambda: {"intensity": 1.0})
    """Point features given to the net (names as the reader reports them) and their scale."""
    voxel_size: float | tuple[float, float, float] = 0.1
    point_range: tuple[float, float, float, float, float, float] | None = None
    """Optional (xmin, ymin, zmin, xmax, ymax, zmax) in metres; points outside are reported and left unlabelled."""
    model: PointModelConfig
    augment: PointAugmentConfig = Field(default_factory=PointAugmentConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig | None = None
    infer: SceneInferConfig = Field(default_factory=SceneInferConfig)

    @model_validator(mode="after")
    def _check(self) -> LidarConfig:
        ids = sorted(self.labels)
        if len(ids) < 2:
            raise ValueError(f"labels must name at least two classes, got {ids}")
        if ids != list(range(len(ids))):
            raise ValueError(f"labels must be the train ids 0..K-1 without gaps, got {ids}")
        check_unique_names(self.labels)
        unl = self.infer.unlabelled
        if self.label_map is not None:
            reached = set(self.label_map.values())
            bad = sorted(reached - set(ids))
            if bad:
                raise ValueError(f"label_map points at train ids that are not labels: {bad}")
            unreached = [i for i in ids if i not in reached]
            if unreached:
                raise ValueError(f"label_map maps no raw id to train ids {unreached} ({', '.join(self.labels[i] for i in unreached)}): "
                                 "they could neither be learnt nor written back as raw ids")
            if unl in self.label_map:
                raise ValueError(f"infer.unlabelled {unl} is a raw id in label_map ({unl} -> {self.labels[self.label_map[unl]]}): "
                                 "points left unsegmented would read as that class; choose an id outside label_map "
                                 "(SemanticKITTI: 0, 'unlabeled')")
        elif unl < len(ids):
            raise ValueError(f"infer.unlabelled {unl} is the train id of '{self.labels[unl]}': points left unsegmented "
                             f"would read as that class; choose an id of {len(ids)} or more (default 255)")
        if self.las_classes is not None:
            self._check_las_classes(ids)
        vs = self.voxel_size if isinstance(self.voxel_size, tuple) else (self.voxel_size,)
        if min(vs) < MIN_VOXEL_SIZE:
            raise ValueError(f"voxel_size must be at least {MIN_VOXEL_SIZE} m, got {self.voxel_size}")
        r = self.point_range
        if r is not None and not all(r[i] < r[i + 3] for i in range(3)):
            raise ValueError(f"point_range must be (xmin, ymin, zmin, xmax, ymax, zmax) with min < max, got {list(r)}")
        return self

    def _check_las_classes(self, ids: list[int]) -> None:
        table = self.las_classes
        extra = sorted(set(table) - set(ids))
        if extra:
            raise ValueError(f"las_classes names train ids that are not labels: {extra}")
        missing = [i for i in ids if i not in table]
        if missing:
            raise ValueError(f"las_classes gives no ASPRS class to train ids {missing} "
                             f"({', '.join(self.labels[i] for i in missing)})")
        for train, code in sorted(table.items()):
            if not 0 <= code <= 255:
                raise ValueError(f"las_classes gives {self.labels[train]} class {code}; LAS 1.4 classes are 0..255")
            if code in LAS_REFUSED_CODES:
                raise ValueError(f"las_classes gives {self.labels[train]} class {code}, {LAS_REFUSED_CODES[code]}; "
                                 f"use an ASPRS class or a user-defined one of {LAS_USER_CODES}..255")
        seen: dict[int, int] = {}
        for train, code in sorted(table.items()):
            if code in seen:  # one code for two classes could not be told apart in the output
                raise ValueError(f"las_classes gives {self.labels[seen[code]]} and {self.labels[train]} the same "
                                 f"class {code}; give each its own (user-defined {LAS_USER_CODES}..255)")
            seen[code] = train

    def las_codes(self) -> np.ndarray:
        """``(K,)`` the ASPRS class each train id is written as to LAS: ``las_classes``, else id + 64
        (may pass 255 for over 192 classes: the writer's caller refuses that)."""
        if self.las_classes is None:
            return np.arange(self.num_classes, dtype=np.int64) + LAS_USER_CODES
        return np.array([self.las_classes[i] for i in range(self.num_classes)], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def output_ids(self) -> np.ndarray:
        """``(K,)`` the id each train id is written as: itself, or with a ``label_map`` the smallest raw id
        mapped to it."""
        out = np.arange(self.num_classes, dtype=np.int64)
        if self.label_map is not None:
            for raw, train in sorted(self.label_map.items(), reverse=True):
                out[train] = raw
        return out

    @property
    def in_channels(self) -> int:
        return 3 + len(self.features)


def parse_lidar_config(data: Any, source: str | Path = "<config>") -> LidarConfig:
    """Validate a mapping into a :class:`LidarConfig`; errors name the source and the key."""
    return validate_mapping(LidarConfig, data, source)


def load_lidar_config(path: str | Path) -> LidarConfig:
    """Read and validate a LiDAR YAML config file."""
    return parse_lidar_config(read_yaml(path), Path(path))
