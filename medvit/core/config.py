"""The strict config base and the YAML reader both sides' configs build on.

:class:`StrictModel` refuses unknown keys, NaN/inf and YAML booleans where a number is
wanted; :func:`read_yaml` refuses a key given twice in one mapping; :func:`validate_mapping`
turns pydantic's errors into one-line :class:`~medvit.core.errors.ConfigError` messages naming
the file and the key. :class:`TrainConfig` is the training section of both configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from medvit.core.errors import ConfigError

M = TypeVar("M", bound="StrictModel")


def _takes_bool(tp: Any) -> bool:
    """Whether a field's type admits a boolean (``bool``, ``Any``, or a union or container of them)."""
    return tp is bool or tp is Any or any(_takes_bool(a) for a in get_args(tp))


class StrictModel(BaseModel):
    """A config section: unknown keys, NaN/inf and booleans given for numbers are refused.

    A top-level config lists in ``RELATIVE_PATHS`` (section -> path keys) the paths that
    :func:`validate_mapping` resolves against the config file's folder.
    """

    RELATIVE_PATHS: ClassVar[Mapping[str, tuple[str, ...]]] = {}

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


class TrainConfig(StrictModel):
    """The ``train`` section both the volume and the LiDAR configs use."""

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
    """Validate a mapping into ``model``, a top-level :class:`StrictModel` config.

    Raises :class:`ConfigError` naming ``source`` and the first key at fault. When ``source`` is a
    :class:`~pathlib.Path`, the relative paths ``model.RELATIVE_PATHS`` lists resolve against its
    folder. Shared by the volume and the LiDAR configs.
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
        for section, keys in model.RELATIVE_PATHS.items():
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
