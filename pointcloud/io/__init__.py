"""Scan readers and per-point label writers.

``read_points`` reads KITTI/SemanticKITTI ``.bin``, nuScenes ``.pcd.bin``, PCD (ascii, binary,
binary_compressed; our own parser), PLY (our own vertex reader; open3d for list properties),
LAS/LAZ (laspy + lazrs) and ``.npy`` into one :class:`PointCloud` (float64 ``xyz``, float32 named
``features``, int64 ``labels``/``instance``).
Writers write a temporary file beside the target and rename it, and refuse to overwrite an input.
"""

from pointcloud.io.cloud import PointCloud, crop_to_range, points_in_range, to_file_order
from pointcloud.io.kitti import read_label_file
from pointcloud.io.pcd import write_pcd
from pointcloud.io.readers import SUPPORTED, detect_format, read_points
from pointcloud.io.writers import write_labels

__all__ = [
    "SUPPORTED",
    "PointCloud",
    "crop_to_range",
    "detect_format",
    "points_in_range",
    "read_label_file",
    "read_points",
    "to_file_order",
    "write_labels",
    "write_las",
    "write_pcd",
]


def __getattr__(name: str):
    # LAS/LAZ loads on first use, so .bin/.pcd/.npy work where laspy or lazrs is missing
    if name == "write_las":
        from pointcloud.io.las import write_las

        return write_las
    raise AttributeError(f"module 'pointcloud.io' has no attribute {name!r}")
