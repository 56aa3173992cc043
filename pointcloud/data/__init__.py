"""Synthetic data for the point-cloud side: ray-cast LiDAR scenes of a procedural street."""

from pointcloud.data.street import LABELS, Scene, random_street
from pointcloud.data.synthetic import LidarSpec, cast_sweep, make_aggregated_scene, make_scene

__all__ = ["LABELS", "LidarSpec", "Scene", "cast_sweep", "make_aggregated_scene", "make_scene", "random_street"]
