"""Point-cloud nets for semantic segmentation, registered by name.

Each net maps a :class:`pointcloud.structure.Point` to per-point logits ``(N, out_channels)``
in the input point order. Build one with ``POINT_NETS.build(name, options, in_channels=...,
out_channels=..., voxel_size=...)``.
"""

from pointcloud.nets.registry import POINT_NETS
from pointcloud.nets import flatformer, sparse_unet  # noqa: E402,F401  (registers the nets)
from pointcloud.nets.flatformer import FlatFormerUNet
from pointcloud.nets.sparse_unet import SparseUNet

try:  # written concurrently by another module owner; the package must import without it
    import pointcloud.nets.condaformer  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != "pointcloud.nets.condaformer":
        raise

__all__ = ["POINT_NETS", "FlatFormerUNet", "SparseUNet"]
