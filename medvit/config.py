"""Typed, validated configuration read from YAML.

One file describes one task/model pair: labels, how a volume is preprocessed, the net,
training and inference settings. Unknown keys and values of the wrong type are refused
with a one-line :class:`~medvit.core.errors.ConfigError` naming the file and the key.

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
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from medvit.core.errors import ConfigError

Triple = tuple[float, float, float]
M = TypeVar("M", bound=BaseModel)
IntTriple = tuple[int, int, int]


def _takes_bool(tp: Any) -> bool:
    """Whether a field's type admits a boolean (``bool``, ``Any``, or a union or container of them)."""
    return tp is bool or tp is Any or any(_takes_bool(a) for a in get_args(tp))


class _Strict(BaseModel):
    # no NaN or inf anywhere: a learning rate of .inf or a NaN scale fails here, not mid-run
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic reads true/false as 1/0 where a number is wanted: `epochs: yes` would train one epoch
        if isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v)):
            if not _takes_bool(cls.model_fields[info.field_name].annotation):
                raise ValueError("expected a number, not a boolean")
        return v


class IntensityConfig(_Strict):
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


class PreprocessConfig(_Strict):
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


class AugmentConfig(_Strict):
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


class ModelConfig(_Strict):
    name: str
    """A registered net: see ``medvit.nets.available()``."""
    in_channels: int = Field(1, ge=1)
    out_channels: int | None = Field(None, ge=2)
    """Defaults to the number of labels (background included)."""
    roi_size: IntTriple = (96, 96, 96)
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the net's constructor (for example feature_size)."""
    pretrained: Path | None = None
    """An encoder checkpoint written by ``medvit pretrain`` (``.safetensors``), loaded by ``medvit train``
    before training; relative to the config file's folder."""


class TrainConfig(_Strict):
    datalist: Path
    """MONAI datalist JSON: {"training": [{"image": ..., "label": ...}], "validation": [...]}."""
    data_root: Path | None = None
    """Base folder for relative paths in the datalist; default: the datalist's folder."""
    output_dir: Path = Path("runs/default")
    """Relative to the folder the command runs in (outputs go where you work), unlike ``datalist``
    and ``data_root``, which are relative to the config file's folder (inputs travel with it)."""
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(1, ge=1)
    accumulate: int = Field(1, ge=1)
    """Gradient accumulation steps per optimiser step."""
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    val_every: int = Field(1, ge=1)
    amp: bool = True
    """Autocast where the device supports it (CUDA); ignored on the CPU."""
    seed: int = Field(0, ge=0, lt=2**32)
    num_workers: int = Field(0, ge=0)
    cache: bool = True
    """Cache preprocessed volumes in memory (MONAI CacheDataset)."""
    max_steps_per_epoch: int | None = Field(None, ge=1)
    """Cap on batches per epoch (for quick runs); default: the whole training set."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Optimiser steps between resume checkpoints; default: once per epoch."""


PRETRAIN_TASKS = ("inpaint", "rotation", "contrast")


class PretrainConfig(_Strict):
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


class InferConfig(_Strict):
    overlap: float = Field(0.5, ge=0, lt=1)
    sw_batch_size: int = Field(4, ge=1)
    mode: Literal["gaussian", "constant"] = "gaussian"


class Config(_Strict):
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


def check_unique_names(labels: dict[int, str]) -> None:
    """Refuse two label ids of one name: scores are reported by name, so one would hide the other
    (validation's mean Dice, and with it the best checkpoint, counted one class of the two)."""
    ids_of: dict[str, list[int]] = {}
    for i, name in sorted(labels.items()):
        ids_of.setdefault(name, []).append(i)
    twice = {n: ids for n, ids in ids_of.items() if len(ids) > 1}
    if twice:
        name, ids = next(iter(twice.items()))
        raise ValueError(f"labels {' and '.join(map(str, ids))} share the name {name!r}; give each label its own name")


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if first["type"] == "missing":
        loc = first["loc"]
        if loc and isinstance(loc[-1], int):  # a tuple field given too few values
            whole = ".".join(str(p) for p in loc[:-1])
            return f"key '{whole}': too few values (item {loc[-1]}, counting from 0, is missing)"
        return f"missing key '{key}'"
    msg = first["msg"]
    if first["type"] == "value_error":  # our own checks: their message without pydantic's prefix
        msg = msg.removeprefix("Value error, ")
        if not first["loc"]:  # a check across keys (labels against the model) names its keys itself
            return msg
    got = first.get("input")
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"key '{key}': {msg}{got_s}"


def validate_mapping(model: type[M], data: Any, source: str | Path = "<config>") -> M:
    """Validate a mapping into ``model`` (a config class with an optional ``train`` section).

    Errors name the source and the key; relative ``train.datalist``/``data_root`` resolve
    against the source file's folder. Shared by the volume and the LiDAR configs.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        cfg = model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None
    if isinstance(source, Path):
        base = source.parent
        # inputs travel with the config: its paths resolve against its folder
        for section, keys in (("train", ("datalist", "data_root")), ("pretrain", ("datalist", "folder", "data_root")),
                              ("model", ("pretrained",))):
            sec = getattr(cfg, section, None)
            for key in keys if sec is not None else ():
                value = getattr(sec, key, None)
                if value is not None and not value.is_absolute():
                    setattr(sec, key, (base / value).resolve())
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    silently, so ``train: {epochs: 1, epochs: 500}`` trained 500 epochs, and a second
    ``labels:`` block replaced the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """The YAML document in ``path``; a missing file, a syntax error or a key given twice in one
    mapping is a one-line :class:`ConfigError`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the config's YAML file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        return yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.constructor.ConstructorError as e:
        if e.problem is not None and "given twice" in e.problem:
            raise ConfigError(f"{path}: line {e.problem_mark.line + 1}: {e.problem}") from None
        raise ConfigError(f"{path}: not valid YAML{_line(e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML{_line(e)}") from None


def _line(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    return f" at line {mark.line + 1}" if mark is not None else ""


def parse_config(data: Any, source: str | Path = "<config>") -> Config:
    """Validate a mapping into a :class:`Config`; relative paths resolve against ``source``'s folder."""
    return validate_mapping(Config, data, source)


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file."""
    return parse_config(read_yaml(path), Path(path))


def dump_config(cfg: Config) -> dict[str, Any]:
    """A JSON-ready mapping that :func:`parse_config` reads back to an equal config."""
    return cfg.model_dump(mode="json")
