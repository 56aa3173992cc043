"""The point-cloud net registry: :data:`POINT_NETS`, a :class:`~medvit.core.registry.Registry`.

A builder (here the net's class, registered directly) takes ``(in_channels, out_channels,
voxel_size, **options)``; every net it builds maps a :class:`pointcloud.structure.Point` to
per-point logits ``(N, out_channels)`` in the input point order (voxelising and devoxelising
inside). ``model.options`` are checked against the constructor's signature before it is
called, so a typo names its key (``model.options.<key>``) instead of surfacing as a
``TypeError``; a ``ValueError`` the constructor raises becomes a one-line error naming the option.

Example::

    net = POINT_NETS.build("flatformer", {"channels": [32, 64]}, in_channels=4, out_channels=5, voxel_size=0.1)
"""

from __future__ import annotations

from medvit.core.registry import Registry

__all__ = ["POINT_NETS"]

POINT_NETS = Registry("point-cloud net", {"in_channels": "features (x, y, z and one per feature)",
                                          "out_channels": "labels (one per class)", "voxel_size": "voxel_size"})
"""The point nets by ``model.name``; a net registers with ``@POINT_NETS.register(name)``."""
