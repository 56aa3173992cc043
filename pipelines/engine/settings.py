"""``InferenceSettings``: the options of a sliding-window run, each checked in one place.

Code builds the settings directly (a bad value is a bug: ``ValueError`` or ``TypeError``);
the commands build them with :meth:`InferenceSettings.from_sources` from a checkpoint's
``infer`` section and the command-line overrides, where a bad override is the user's error
(:class:`~medvit.errors.MedvitError` naming the option, such as ``--overlap``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch

from medvit.errors import MedvitError

MODES = ("gaussian", "constant")


def check_overlap(overlap: Any, name: str = "overlap") -> float:
    """``overlap`` as a float in [0, 1); ValueError (TypeError for a non-number) naming ``name``."""
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(overlap).__name__}")
    if not 0 <= overlap < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {overlap}")
    return float(overlap)


def check_batch_size(batch_size: Any, name: str = "batch_size") -> int:
    """``batch_size`` as an int of at least 1; ValueError (TypeError for a non-integer) naming ``name``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(batch_size).__name__}")
    if batch_size < 1:
        raise ValueError(f"{name} must be at least 1, got {batch_size}")
    return int(batch_size)


def check_skip_below_hu(value: Any, name: str = "skip_below_hu") -> float | None:
    """None, or ``value`` as a finite float (NaN would skip every window, silently)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite HU value such as -500, got {value}")
    return float(value)


def check_mirror_axes(axes: Any) -> tuple[int, ...]:
    """``axes`` as a tuple of distinct spatial axes among 0, 1, 2 (a negative axis would flip the
    class channel: labels wrong with no error)."""
    try:
        got = tuple(axes)
    except TypeError:
        raise TypeError(f"mirror axes must be a sequence of spatial axes, got {type(axes).__name__}") from None
    if any(isinstance(a, bool) or not isinstance(a, numbers.Integral) or not 0 <= a <= 2 for a in got) \
            or len(set(got)) != len(got):
        raise ValueError(f"mirror axes must be distinct spatial axes among 0, 1, 2, got {got}")
    return tuple(int(a) for a in got)


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision dtype on ``device``: bfloat16 where the CUDA device supports it, else
    float16; None (no autocast) off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    """What every sliding-window run takes, validated when built.

    Raises ValueError (TypeError for a value of the wrong type) for a bad field.
    """

    overlap: float = 0.5
    """Fraction of a window (a tile) shared with its neighbour, in [0, 1)."""
    batch_size: int = 4
    """Windows per predictor call (a scene packs up to ``batch_size`` budgets of points a call)."""
    mode: Literal["gaussian", "constant"] = "gaussian"
    """How overlapping volume windows are blended (MONAI's importance map)."""
    sigma_scale: float = 0.125
    """The Gaussian's sigma as a fraction of the window, as in MONAI."""
    skip_below_hu: float | None = None
    """Skip volume windows with no voxel above this HU (CT); mapped to each case's input units."""
    mirror_axes: tuple[int, ...] = ()
    """Flip test-time augmentation over these spatial axes (0, 1, 2) of a volume."""
    amp: bool | torch.dtype = False
    """Autocast: False, True (:func:`autocast_dtype` of the device: none on the CPU), or a dtype."""
    device: torch.device = torch.device("cpu")
    """Where the predictor runs."""

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: normalised values are set once, here
        put(self, "overlap", check_overlap(self.overlap))
        put(self, "batch_size", check_batch_size(self.batch_size))
        if self.mode not in MODES:
            raise ValueError(f"mode must be gaussian or constant, got {self.mode!r}")
        if isinstance(self.sigma_scale, bool) or not isinstance(self.sigma_scale, numbers.Real) \
                or not (math.isfinite(self.sigma_scale) and self.sigma_scale > 0):
            raise ValueError(f"sigma_scale must be a positive number, got {self.sigma_scale!r}")
        put(self, "skip_below_hu", check_skip_below_hu(self.skip_below_hu))
        put(self, "mirror_axes", check_mirror_axes(self.mirror_axes))
        if not isinstance(self.amp, (bool, torch.dtype)):
            raise TypeError(f"amp must be a bool or a torch dtype, got {type(self.amp).__name__}")
        if not isinstance(self.device, (torch.device, str)):
            raise TypeError(f"device must be a torch.device or a string, got {type(self.device).__name__}")
        put(self, "device", torch.device(self.device))

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype the runs use, or None for none."""
        if isinstance(self.amp, torch.dtype):
            return self.amp
        return autocast_dtype(self.device) if self.amp else None

    def replace(self, **changes: Any) -> InferenceSettings:
        """A copy with ``changes``, validated as a new one."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_sources(cls, infer_cfg: Any = None, *, device: torch.device | str = "cpu", amp: bool | torch.dtype = True,
                     overlap: float | None = None, batch_size: int | None = None,
                     skip_below_hu: float | None = None, tta: bool = False) -> InferenceSettings:
        """Settings from a config's ``infer`` section (a volume's ``InferConfig``: ``overlap``,
        ``sw_batch_size``, ``mode``; a scene's ``SceneInferConfig``: ``overlap``, ``batch_size``) with
        the command-line overrides on top (None: the config's). ``tta`` mirrors over the three axes.

        A bad override raises MedvitError naming its option (:func:`check_options`); a bad config
        value cannot reach here (the config's own schema refuses it).
        """
        check_options(batch_size=batch_size, overlap=overlap, skip_below_hu=skip_below_hu)
        base: dict[str, Any] = {}
        if infer_cfg is not None:
            base["overlap"] = infer_cfg.overlap
            size = getattr(infer_cfg, "sw_batch_size", None)
            base["batch_size"] = size if size is not None else infer_cfg.batch_size
            if getattr(infer_cfg, "mode", None) is not None:
                base["mode"] = infer_cfg.mode
        given = {"overlap": overlap, "batch_size": batch_size}
        base.update({k: v for k, v in given.items() if v is not None})
        return cls(**base, skip_below_hu=skip_below_hu, mirror_axes=(0, 1, 2) if tta else (), amp=amp,
                   device=torch.device(device))


_OPTION_CHECKS = {"overlap": check_overlap, "batch_size": check_batch_size, "skip_below_hu": check_skip_below_hu}


def check_options(**options: Any) -> None:
    """The user's values of ``--overlap``, ``--batch-size``, ``--skip-below-hu`` (keyword names
    ``overlap``, ``batch_size``, ``skip_below_hu``; None: not given): MedvitError naming the option,
    such as ``--overlap must lie in [0, 1), got 1.5``. The commands call it before a slow load, and
    :meth:`InferenceSettings.from_sources` again with the same checks."""
    for key, value in options.items():
        if value is None:
            continue
        try:
            _OPTION_CHECKS[key](value, "--" + key.replace("_", "-"))
        except (TypeError, ValueError) as e:
            raise MedvitError(str(e)) from None


def per_axis(value: float | Sequence[float], n: int = 3) -> tuple[float, ...]:
    """``value`` (one overlap, or one per axis) as ``n`` checked overlaps; ValueError otherwise."""
    vals = tuple(value) if isinstance(value, Sequence) else (value,)
    if len(vals) == 1:
        vals *= n
    if len(vals) != n:  # zip would silently plan windows on fewer axes and leave voxels unscored
        raise ValueError(f"overlap must be one value or one per spatial axis ({n}), got {value}")
    return tuple(check_overlap(v) for v in vals)
