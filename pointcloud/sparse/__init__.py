"""Sparse voxel ops: voxelisation, sparse convolutions (ours in plain torch, spconv where
it is right), chosen per operation in :mod:`pointcloud.sparse.spconv_compat`.

Nets import from here, never from spconv.
"""

from pointcloud.sparse.conv import (
    DepthwiseSubMConv3d,
    KernelMap,
    SparseConv3d,
    SparseInverseConv3d,
    SubMConv3d,
    apply_depthwise_map,
    apply_kernel_map,
    strided_map,
    submanifold_map,
)
from pointcloud.sparse.spconv_compat import (
    depthwise_conv,
    inverse_conv,
    sparse_backend,
    sparse_conv,
    spconv_available,
    subm_conv,
    use_backend,
)
from pointcloud.sparse.voxelize import devoxelize, from_spconv, to_spconv, voxel_centers, voxelize

__all__ = [
    "DepthwiseSubMConv3d",
    "KernelMap",
    "SparseConv3d",
    "SparseInverseConv3d",
    "SubMConv3d",
    "apply_depthwise_map",
    "apply_kernel_map",
    "depthwise_conv",
    "devoxelize",
    "from_spconv",
    "inverse_conv",
    "sparse_backend",
    "sparse_conv",
    "spconv_available",
    "strided_map",
    "subm_conv",
    "submanifold_map",
    "to_spconv",
    "use_backend",
    "voxel_centers",
    "voxelize",
]
