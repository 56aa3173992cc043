"""Point-cloud nets for semantic segmentation, registered by name.

Each net maps a :class:`pointcloud.structure.Point` to per-point logits ``(N, num_classes)``
in the input point order. Build one with :func:`build_point_net`.
"""

from pointcloud.nets.registry import available_point_nets, build_point_net, register

try:  # written concurrently by another module owner; the package must import without it
    import pointcloud.nets.condaformer  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "pointcloud.nets.condaformer":
        raise

__all__ = ["available_point_nets", "build_point_net", "register"]
