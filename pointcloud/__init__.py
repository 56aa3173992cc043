"""pointcloud: the sparse-voxel branch (scan readers, voxelisation, point-cloud transformers)."""
