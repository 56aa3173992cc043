"""Synthetic LiDAR scenes: geometry of every labelled point, rings, dropout, determinism, speed."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest

from pointcloud.data import LABELS, LidarSpec, make_aggregated_scene, make_scene
from pointcloud.data.street import BUILDING, CAR, GROUND, POLE, VEGETATION

# Range noise is 2 cm along the ray; 0.15 m is more than 7 sigma.
TOL = 0.15


def _world(cloud) -> np.ndarray:
    pose = cloud.meta["frame_to_world"]
    return cloud.xyz @ pose[:3, :3].T + pose[:3, 3]


@pytest.fixture(scope="module")
def big():
    """A 1M-point aggregated scene, timed and memory-traced once for the module."""
    tracemalloc.start()
    start = time.perf_counter()
    cloud = make_aggregated_scene(11, n_points_min=1_000_000)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"\n1M-point aggregated scene: {len(cloud)} points in {seconds:.2f} s, traced peak {peak / 2**20:.0f} MiB")
    return cloud, seconds, peak


@pytest.fixture(scope="module")
def single():
    return make_scene(3)


def test_big_scene_size_and_memory(big):
    cloud, seconds, peak = big  # (its time is printed, not asserted: this machine is shared)
    assert len(cloud) >= 1_000_000
    assert peak < 2 * 2**30
    assert cloud.feature_names == ["intensity", "ring"]
    assert cloud.xyz.dtype == np.float64 and cloud.features.dtype == np.float32
    poses = cloud.meta["sweep_poses"]
    assert poses.shape[1:] == (4, 4) and len(poses) >= 2
    np.testing.assert_array_equal(cloud.meta["frame_to_world"], np.eye(4))


def test_big_scene_class_proportions(big):
    cloud = big[0]
    counts = np.bincount(cloud.labels, minlength=len(LABELS))
    assert len(counts) == len(LABELS)
    assert (counts > 1000).all(), counts
    share = counts / counts.sum()
    assert share.argmax() == GROUND and share[GROUND] > 0.4, share
    assert share[POLE] < 0.05 and share[BUILDING] > 0.05, share


def test_ground_points_on_ground(big, single):
    for cloud in (big[0], single):
        xyz = _world(cloud)[cloud.labels == GROUND]
        dz = xyz[:, 2] - cloud.meta["scene"].ground.height(xyz[:, 0], xyz[:, 1])
        assert np.abs(dz).max() < 0.1
        assert (cloud.instance[cloud.labels == GROUND] == 0).all()


def test_box_points_on_their_boxes(big):
    cloud = big[0]
    xyz, boxes = _world(cloud), cloud.meta["scene"].boxes
    boxed = np.isin(cloud.labels, [BUILDING, CAR])
    inside_own = np.zeros(len(cloud), dtype=bool)
    for i in range(len(boxes.yaw)):
        near = np.abs(xyz[:, 0] - boxes.center[i, 0]) < np.linalg.norm(boxes.half[i]) + 1.0
        idx = np.flatnonzero(near)
        # no return from deep inside any box: rays stop at the surface
        assert not boxes.contains(xyz[idx], i, margin=-TOL).any(), f"points inside box {i}"
        own = idx[cloud.instance[idx] == boxes.instance[i]]
        assert (cloud.labels[own] == boxes.label[i]).all()
        inside_own[own] |= boxes.contains(xyz[own], i, margin=TOL)
    assert inside_own[boxed].all()
    assert not inside_own[~boxed].any()
    # cars are car-sized: each car instance's points span at most 4.8 x 1.9 x 1.6 m (+ noise)
    car_ids = np.unique(cloud.instance[cloud.labels == CAR])
    assert len(car_ids) > 10
    for inst in car_ids[:10]:
        z = xyz[cloud.instance == inst, 2]
        assert np.ptp(z) < 1.6 + TOL


def test_pole_and_vegetation_points_on_their_shapes(big):
    cloud = big[0]
    xyz, scene = _world(cloud), cloud.meta["scene"]
    cyl, ell = scene.cylinders, scene.ellipsoids
    on_shape = np.zeros(len(cloud), dtype=bool)
    for i in range(len(cyl.radius)):
        own = np.flatnonzero(cloud.instance == cyl.instance[i])
        r = np.hypot(xyz[own, 0] - cyl.center[i, 0], xyz[own, 1] - cyl.center[i, 1])
        z = xyz[own, 2]
        hit = (np.abs(r - cyl.radius[i]) < TOL) & (z > cyl.z_range[i, 0] - TOL) & (z < cyl.z_range[i, 1] + TOL)
        if cyl.label[i] == POLE:
            assert hit.all(), f"pole {i}: radii {r[~hit][:5]} for r={cyl.radius[i]:.2f}"
        on_shape[own[hit]] = True
    for i in range(len(ell.density)):
        own = np.flatnonzero(cloud.instance == ell.instance[i])
        rho = np.linalg.norm((xyz[own] - ell.center[i]) / (ell.radii[i] + TOL), axis=1)
        on_shape[own[rho <= 1.0]] = True
        assert (cloud.labels[own] == VEGETATION).all()
    veg = cloud.labels == VEGETATION
    assert on_shape[cloud.labels == POLE].all()
    assert on_shape[veg].all()
    # semi-transparent crowns: returns spread through the volume, not only over its skin
    crowns = np.flatnonzero(np.isin(ell.instance, cyl.instance))
    counts = np.bincount(cloud.instance[veg], minlength=int(ell.instance.max()) + 1)
    k = int(crowns[np.argmax(counts[ell.instance[crowns]])])
    rho = np.linalg.norm((xyz[cloud.instance == ell.instance[k]] - ell.center[k]) / ell.radii[k], axis=1)
    rho = rho[rho < 1.0]
    assert len(rho) > 200 and np.quantile(rho, 0.1) < 0.8, np.quantile(rho, [0.1, 0.5])


def test_single_sweep_frame_rings_and_ranges(single):
    lidar = single.meta["lidar"]
    ring = single.feature("ring")
    assert ring.min() == 0 and ring.max() == lidar.n_rings - 1
    np.testing.assert_array_equal(ring, np.round(ring))
    # noise is along the ray, so each point keeps its beam's elevation exactly
    elevation = np.arctan2(single.xyz[:, 2], np.hypot(single.xyz[:, 0], single.xyz[:, 1]))
    np.testing.assert_allclose(elevation, lidar.elevations()[ring.astype(int)], atol=1e-9)
    rng_ = np.linalg.norm(single.xyz, axis=1)
    assert rng_.min() > lidar.min_range - TOL and rng_.max() < lidar.max_range + TOL
    intensity = single.feature("intensity")
    assert intensity.min() >= 0.0 and intensity.max() <= 1.0
    # sensor frame: the ground a few metres around the sensor lies about one sensor height below
    near = (single.labels == GROUND) & (np.hypot(single.xyz[:, 0], single.xyz[:, 1]) < 8.0)
    assert abs(np.median(single.xyz[near, 2]) + lidar.height) < 0.3
    assert set(np.unique(single.labels)) <= set(LABELS)
    assert len(single) == pytest.approx(single.meta["n_returns"] * (1 - lidar.dropout), rel=0.01)


def test_intensity_depends_on_surface(single):
    xyz = _world(single)
    scene = single.meta["scene"]
    intensity = single.feature("intensity")
    ground = single.labels == GROUND
    road = ground & (np.abs(xyz[:, 1]) < scene.road_half_width - 0.5)
    sidewalk = ground & (np.abs(xyz[:, 1]) > scene.road_half_width + 0.5)
    assert intensity[sidewalk].mean() > intensity[road].mean() + 0.03


def test_dropout_removes_its_share_and_nests():
    full = make_scene(21, lidar=LidarSpec(dropout=0.0))
    dropped = make_scene(21, lidar=LidarSpec(dropout=0.2))
    assert full.meta["n_returns"] == dropped.meta["n_returns"] == len(full)
    assert len(dropped) / len(full) == pytest.approx(0.8, abs=0.01)
    keys = {row.tobytes() for row in full.xyz}
    assert all(row.tobytes() in keys for row in dropped.xyz)


def test_same_seed_same_scene_and_multi_sweep():
    a, b, c = make_scene(5, extent=80.0), make_scene(5, extent=80.0), make_scene(6, extent=80.0)
    np.testing.assert_array_equal(a.xyz, b.xyz)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(a) != len(c) or not np.array_equal(a.xyz, c.xyz)
    multi = make_scene(5, extent=80.0, n_sweeps=3, sweep_step=0.5)
    poses = multi.meta["sweep_poses"]
    assert len(poses) == 3
    np.testing.assert_allclose(np.linalg.norm(np.diff(poses[:, :2, 3], axis=0), axis=1), 0.5)
    np.testing.assert_array_equal(multi.meta["frame_to_world"], poses[-1])
    assert len(multi) == pytest.approx(3 * len(a), rel=0.1)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="dropout"):
        LidarSpec(dropout=1.0)
    with pytest.raises(ValueError, match="elevation"):
        LidarSpec(elevation_deg=(5.0, -5.0))
    with pytest.raises(ValueError, match="n_sweeps"):
        make_scene(0, n_sweeps=0)
    with pytest.raises(ValueError, match="fewer than n_points_min"):
        make_aggregated_scene(0, n_points_min=10_000_000, length=60.0, max_sweeps=2,
                              lidar=LidarSpec(n_rings=8, azimuth_step_deg=1.0))
