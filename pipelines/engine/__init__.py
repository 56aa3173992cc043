"""The sliding-window inference engine shared by volumes and scenes.

Every sliding-window call in the project (``medvit segment``, validation during
training) goes through :func:`sliding_window`, so the engine can be swapped in one place.
"""

from pipelines.engine.dense import sliding_window

__all__ = ["sliding_window"]
