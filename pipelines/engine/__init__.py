"""The sliding-window inference engine shared by volumes and scenes.

Every sliding-window call in the project (``medvit segment``, validation during
training, the benchmarks) goes through this package: a runner (batching, prefetch,
device placement, autocast, out-of-memory adaptation, progress) over a domain that plans
and stitches windows (``DenseGrid`` for volumes, ``PointScene`` for scenes).
"""

from pipelines.engine.dense import DenseGrid, segment_volume, sliding_window, sliding_window_labels
from pipelines.engine.runner import EngineReport, mirrored, run_windows
from pipelines.engine.points import PointScene, segment_scene

__all__ = ["PointScene", "segment_scene", "DenseGrid", "EngineReport", "mirrored", "run_windows", "segment_volume", "sliding_window", "sliding_window_labels"]
