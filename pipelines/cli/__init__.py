"""The ``medvit`` command line: the apps in ``app.py``, the commands one module per side.

Heavy imports happen inside the commands so ``medvit --help`` stays quick.
"""

from pipelines.cli import bench, lidar, volume  # noqa: F401  (registers the commands)
from pipelines.cli.app import app, main

__all__ = ["app", "main"]
