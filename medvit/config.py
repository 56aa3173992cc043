"""Typed, validated configuration read from YAML.

One file describes one task/model pair: labels, how a volume is preprocessed, the net,
training and inference settings. Unknown keys and values of the wrong type are refused
with a one-line :class:`~medvit.core.errors.ConfigError` naming the file and the key
(:mod:`medvit.core.config` holds the strict base, the YAML reader and the ``train`` section).

Example (see ``configs/``)::

    labels: {0: background, 1: spleen}
    preprocess:
      orientation: RAS
      spacing: [1.5, 1.5, 2.0]
      intensity: {modality: ct, window: [-57, 164]}
    model: {name: unetr, in_channels: 1, roi_size: [96, 96, 96]}
    train: {datalist: ../data_manifests/msd_task09_spleen.json, epochs: 300}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from medvit.core.config import StrictModel, TrainConfig, check_unique_names, read_yaml, validate_mapping

Triple = tuple[float, float, float]
IntTriple = tuple[int, int, int]


class IntensityConfig(StrictModel):
    """Intensity normalisation: CT windows HU to [0, 1]; MRI z-scores each channel."""

    modality: Literal["ct", "mri"]
    window: tuple[float, float] = (-1000.0, 1000.0)
    """CT only: HU mapped to 0 and 1."""
    clip: bool = True
    """CT only: clip values outside the window."""
    nonzero: bool = True
    """MRI only: statistics over non-zero voxels (skull-stripped data)."""

    @model_validator(mode="after")
    def _window_order(self) -> IntensityConfig:
        if self.window[1] <= self.window[0]:
            raise ValueError(f"window must rise, got {list(self.window)}")
        return self


class PreprocessConfig(StrictModel):
    orientation: str = "RAS"
    spacing: Triple | None = None
    """Target voxel spacing in mm; None keeps the input's."""
    intensity: IntensityConfig = Field(default_factory=lambda: IntensityConfig(modality="ct"))
    crop_foreground: bool = False
    """Crop to the bounding box of voxels above ``foreground_threshold`` (before resampling)."""
    foreground_threshold: float | None = None
    """In the input's own units; default -500 HU for CT (the body, not the air), 0 for MRI."""
    crop_margin: int = Field(8, ge=0)
    """Voxels added on each side of the box, on the input grid."""

    def crop_threshold(self) -> float:
        if self.foreground_threshold is not None:
            return self.foreground_threshold
        return -500.0 if self.intensity.modality == "ct" else 0.0

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str) -> str:
        v = v.upper()
        axes = sorted("RL AP SI".split().index(p) for c in v for p in ("RL", "AP", "SI") if c in p)
        if len(v) != 3 or axes != [0, 1, 2]:
            raise ValueError(f"orientation must be three axis codes naming each axis once (RAS, LPS, ...), got {v!r}")
        return v

    @field_validator("spacing")
    @classmethod
    def _positive(cls, v: Triple | None) -> Triple | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"spacing must be positive, got {list(v)}")
        return v


class AugmentConfig(StrictModel):
    """Training-time augmentation, applied after preprocessing."""

    num_samples: int = Field(2, ge=1)
    """Patches cropped per volume by RandCropByPosNegLabeld."""
    pos: float = Field(1.0, ge=0)
    neg: float = Field(1.0, ge=0)
    flip_prob: float = Field(0.5, ge=0, le=1)
    rot90_prob: float = Field(0.2, ge=0, le=1)
    shift_intensity: float = Field(0.1, ge=0)
    shift_prob: float = Field(0.5, ge=0, le=1)
    scale_intensity: float = Field(0.1, ge=0)
    scale_prob: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _some_crops(self) -> AugmentConfig:
        if self.pos + self.neg <= 0:
            raise ValueError("pos and neg weigh foreground against background crops: at least one must be above 0")
        return self


class ModelConfig(StrictModel):
    name: str
    """A registered net: see ``medvit.nets.NETS.names()``."""
    in_channels: int = Field(1, ge=1)
    out_channels: int | None = Field(None, ge=2)
    """Defaults to the number of labels (background included)."""
    roi_size: IntTriple = (96, 96, 96)
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the net's constructor (for example feature_size)."""
    pretrained: Path | None = None
    """An encoder checkpoint written by ``medvit pretrain`` (``.safetensors``), loaded by ``medvit train``
    before training; relative to the config file's folder."""


PRETRAIN_TASKS = ("inpaint", "rotation", "contrast")


class PretrainConfig(StrictModel):
    """Self-supervised pretraining of a net's encoder (``medvit pretrain``) on unlabelled images.

    The images come from ``datalist`` (its ``split`` list; labels, if any, are ignored) or from
    every ``.nii``/``.nii.gz`` file in ``folder``: exactly one of the two.
    """

    datalist: Path | None = None
    """MONAI datalist JSON; relative to the config file's folder."""
    split: str = "training"
    """Which list of the datalist to read."""
    folder: Path | None = None
    """A folder of NIfTI images (one channel each); relative to the config file's folder."""
    data_root: Path | None = None
    """Base folder for relative paths in the datalist; default: the datalist's folder."""
    output_dir: Path = Path("runs/pretrain")
    """Relative to the folder the command runs in, like ``train.output_dir``."""
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(1, ge=1)
    """Volumes per step; each gives ``num_samples`` random crops of ``model.roi_size``."""
    num_samples: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    seed: int = Field(0, ge=0, lt=2**32)
    cache: bool = True
    tasks: list[Literal["inpaint", "rotation", "contrast"]] = Field(default_factory=lambda: list(PRETRAIN_TASKS))
    mask_ratio: float = Field(0.4, gt=0, lt=1)
    """Inpainting: the share of cubes zeroed in each crop."""
    mask_cube: int = Field(8, ge=1)
    """Inpainting: the side of the masked cubes, in voxels."""
    temperature: float = Field(0.1, gt=0)
    """Contrast: the InfoNCE temperature."""

    @model_validator(mode="after")
    def _source_and_tasks(self) -> PretrainConfig:
        if (self.datalist is None) == (self.folder is None):
            raise ValueError("pretrain needs exactly one of 'datalist' or 'folder' to name its images")
        if not self.tasks:
            raise ValueError(f"pretrain.tasks is empty; choose from {', '.join(PRETRAIN_TASKS)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"pretrain.tasks names a task twice: {self.tasks}")
        if "contrast" in self.tasks and self.batch_size * self.num_samples < 2:
            raise ValueError("pretrain: the contrast task needs at least two crops a step (batch_size * num_samples >= 2) "
                             "so each view has a negative")
        return self


class InferConfig(StrictModel):
    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(4, ge=1)
    mode: Literal["gaussian", "constant"] = "gaussian"


class Config(StrictModel):
    RELATIVE_PATHS = {"train": ("datalist", "data_root"), "pretrain": ("datalist", "folder", "data_root"),
                      "model": ("pretrained",)}

    labels: dict[int, str]
    """Label id -> name; 0 is background."""
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig
    train: TrainConfig | None = None
    pretrain: PretrainConfig | None = None
    infer: InferConfig = Field(default_factory=InferConfig)

    @model_validator(mode="after")
    def _labels(self) -> Config:
        if 0 not in self.labels:
            raise ValueError("labels must include 0 (background)")
        if min(self.labels) < 0 or max(self.labels) > 65535:
            raise ValueError("label ids must lie in 0..65535")
        check_unique_names(self.labels)
        n = max(self.labels) + 1
        if self.model.out_channels is None:
            self.model.out_channels = n
        elif self.model.out_channels < n:
            raise ValueError(f"model.out_channels {self.model.out_channels} is less than the {n} label ids")
        return self


def parse_config(data: Any, source: str | Path = "<config>") -> Config:
    """Validate a mapping into a :class:`Config`; relative paths resolve against ``source``'s folder."""
    return validate_mapping(Config, data, source)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    return parse_config(read_yaml(path), Path(path))


def dump_config(cfg: Config) -> dict[str, Any]:
    """A JSON-ready mapping that :func:`parse_config` reads back to an equal config."""
    return cfg.model_dump(mode="json")
