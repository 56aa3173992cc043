"""The sliding-window inference engine shared by volumes and scenes.

Every sliding-window call in the project (``medvit segment``, validation during
training, the benchmarks) goes through this package: an :class:`Engine` (batching, prefetch,
device placement, autocast, out-of-memory adaptation, progress) with one
:class:`InferenceSettings`, over a domain that plans and stitches windows (``DenseGrid`` for
volumes, ``PointScene`` for scenes).
"""

from pipelines.engine.dense import DenseGrid, plan_windows, segment_volume, sliding_window, sliding_window_labels
from pipelines.engine.points import PointScene, segment_scene
from pipelines.engine.runner import Engine, EngineReport, mirrored
from pipelines.engine.settings import InferenceSettings, autocast_dtype, check_options

__all__ = ["DenseGrid", "Engine", "EngineReport", "InferenceSettings", "PointScene", "autocast_dtype", "check_options",
           "mirrored", "plan_windows", "segment_scene", "segment_volume", "sliding_window", "sliding_window_labels"]
