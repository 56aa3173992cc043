"""The sliding-window inference engine shared by volumes and scenes.

Every sliding-window call in the project (``medvit segment``, validation during
training, the benchmarks) goes through this package: an :class:`Engine` (batching, prefetch,
device placement, autocast, out-of-memory adaptation, progress) with one
:class:`InferenceSettings`, over a domain that plans and stitches windows (``DenseGrid`` for
volumes, ``PointScene`` for scenes).

The names below load on first use, so the numpy-only modules (``checks``, ``tiling``) import
without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DenseGrid": "dense", "plan_windows": "dense", "segment_volume": "dense", "sliding_window": "dense",
    "sliding_window_labels": "dense",
    "PointScene": "points", "segment_scene": "points",
    "Engine": "runner", "EngineReport": "runner", "mirrored": "runner",
    "InferenceSettings": "settings", "autocast_dtype": "settings",
    "check_options": "checks",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pipelines.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipelines.engine.{_WHERE[name]}"), name)
