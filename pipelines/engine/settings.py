"""``InferenceSettings``: the options of a sliding-window run, each checked in one place.

Code builds the settings directly (a bad value is a bug: ``ValueError`` or ``TypeError``);
the commands build them with :meth:`InferenceSettings.from_sources` from a checkpoint's
``infer`` section and the command-line overrides, where a bad override is the user's error
(:class:`~medvit.core.errors.MedvitError` naming the option, such as ``--overlap``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal

import torch

from pipelines.engine.checks import (
    check_batch_size,
    check_mirror_axes,
    check_options,
    check_overlap,
    check_runtime,
    check_runtime_device,
    check_skip_below_hu,
)

MODES = ("gaussian", "constant")


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
    runtime: str = "torch"
    """What runs a volume net (:data:`~pipelines.engine.checks.RUNTIMES`): torch, or its export on
    OpenVINO or ONNX Runtime (the CPU only), or ``auto`` (see :meth:`Engine.predictor
    <pipelines.engine.runner.Engine.predictor>`)."""

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
        check_runtime(self.runtime)
        check_runtime_device(self.runtime, str(self.device))

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
                     skip_below_hu: float | None = None, tta: bool = False, runtime: str | None = None) -> InferenceSettings:
        """Settings from a config's ``infer`` section (a volume's ``InferConfig``: ``overlap``,
        ``sw_batch_size``, ``mode``; a scene's ``SceneInferConfig``: ``overlap``, ``batch_size``) with
        the command-line overrides on top (None: the config's). ``tta`` mirrors over the three axes.
        ``runtime``: ``--runtime`` (None: torch).

        A bad override raises MedvitError naming its option (:func:`check_options`); a bad config
        value cannot reach here (the config's own schema refuses it).
        """
        check_options(batch_size=batch_size, overlap=overlap, skip_below_hu=skip_below_hu, runtime=runtime,
                      device=str(torch.device(device)))
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
                   device=torch.device(device), runtime=runtime or "torch")


