"""Synthetic outdoor LiDAR scenes: a spinning LiDAR ray-cast against a procedural street.

The street (:class:`~pointcloud.data.street.Scene`, see :mod:`pointcloud.data.street`) has
ground, buildings, cars, poles and vegetation, labelled with the ids of :data:`LABELS`
(0 ground, 1 building, 2 car, 3 pole, 4 vegetation). Every point has a label, since only
rays that hit a surface produce points.

The sensor (:class:`LidarSpec`) casts one ray per (ring, azimuth step) from its height above
the ground. All rays of a sweep share one origin, so each object is tested only against the
rays inside its bounding sphere's angular window (a ring slice times an azimuth column range),
vectorised in numpy; there is no per-ray Python loop. Vegetation is semi-transparent: a ray
crossing a crown or hedge travels an exponentially distributed free path (rate ``density`` per
metre) and returns from that depth if it is still inside, else it passes through to whatever
lies behind, which scatters points through the volume. Every return gets Gaussian range noise
along its ray and survives random dropout with probability ``1 - dropout``; rays that hit
nothing within ``max_range`` give no point. Intensity is the surface's reflectance (road darker
than sidewalk, a paint per car) scaled by ``0.2 + 0.8 cos(incidence)``, plus noise.

Randomness: the scene is drawn first, then per sweep the per-ray draws (dropout, range noise,
intensity noise) for all rays whatever the settings, then the vegetation draws. So two calls
with the same seed differing only in ``dropout`` give nested point sets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pointcloud.data.street import GROUND, LABELS, Boxes, Cylinders, Ellipsoids, Scene, random_street
from pointcloud.io.cloud import PointCloud

__all__ = ["LABELS", "LidarSpec", "cast_sweep", "make_aggregated_scene", "make_scene"]

FEATURE_NAMES = ["intensity", "ring"]


@dataclass(frozen=True)
class LidarSpec:
    """A spinning LiDAR: ``n_rings`` beams evenly spread over ``elevation_deg`` (ring 0 lowest).

    Args:
        n_rings: number of beams (rings).
        elevation_deg: (lowest, highest) beam elevation in degrees above the horizontal.
        azimuth_step_deg: azimuth step of one firing; ``360 / step`` columns per sweep.
        height: sensor height above the ground at its xy, metres.
        max_range: rays that hit nothing closer give no point, metres.
        min_range: returns closer than this are discarded (blind zone), metres.
        range_noise: standard deviation of the Gaussian range noise along each ray, metres.
        dropout: probability that a return is lost.
    """

    n_rings: int = 64
    elevation_deg: tuple[float, float] = (-25.0, 3.0)
    azimuth_step_deg: float = 0.2
    height: float = 1.8
    max_range: float = 70.0
    min_range: float = 1.0
    range_noise: float = 0.02
    dropout: float = 0.03

    def __post_init__(self) -> None:
        lo, hi = self.elevation_deg
        if self.n_rings < 1:
            raise ValueError(f"n_rings must be >= 1, got {self.n_rings}")
        if not -90.0 < lo <= hi < 90.0:
            raise ValueError(f"elevation_deg must be (low, high) within (-90, 90), got {self.elevation_deg}")
        if not 0.0 < self.azimuth_step_deg <= 45.0:
            raise ValueError(f"azimuth_step_deg must be in (0, 45], got {self.azimuth_step_deg}")
        if not 0.0 <= self.min_range < self.max_range:
            raise ValueError(f"need 0 <= min_range < max_range, got {self.min_range}, {self.max_range}")
        if self.height <= 0.0 or self.range_noise < 0.0:
            raise ValueError(f"height must be > 0 and range_noise >= 0, got {self.height}, {self.range_noise}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def n_columns(self) -> int:
        return int(round(360.0 / self.azimuth_step_deg))

    def elevations(self) -> np.ndarray:
        """``(n_rings,)`` beam elevations in radians, ascending (ring 0 lowest)."""
        return np.deg2rad(np.linspace(*self.elevation_deg, self.n_rings))

    def directions(self, yaw: float) -> np.ndarray:
        """``(n_rings, n_columns, 3)`` unit ray directions in the world; column 0 points along ``yaw``."""
        el = self.elevations()[:, None]
        az = yaw + np.arange(self.n_columns) * (2.0 * math.pi / self.n_columns)
        ce = np.cos(el)
        return np.stack(np.broadcast_arrays(ce * np.cos(az), ce * np.sin(az), np.sin(el)), axis=-1)

class _Sweep:
    """Per-ray state of one sweep: nearest hit distance, what was hit and the incidence cosine."""

    def __init__(self, lidar: LidarSpec, origin: np.ndarray, yaw: float):
        self.lidar, self.origin, self.yaw = lidar, origin, yaw
        self.d = lidar.directions(yaw)
        shape = self.d.shape[:2]
        self.t = np.full(shape, np.inf)
        self.label = np.full(shape, -1, dtype=np.int8)
        self.instance = np.zeros(shape, dtype=np.int64)
        self.refl = np.zeros(shape)
        self.cos = np.zeros(shape)
        self.el = lidar.elevations()

    def window(self, center: np.ndarray, radius: float) -> tuple[slice, np.ndarray] | None:
        """Rings and azimuth columns whose rays can meet the sphere (``center``, ``radius``); None if out of range."""
        v = center - self.origin
        dist, dxy = float(np.linalg.norm(v)), math.hypot(v[0], v[1])
        if dist - radius > self.lidar.max_range:
            return None
        n_col = self.d.shape[1]
        if dist <= radius:
            return slice(None), np.arange(n_col)
        el, half = math.asin(v[2] / dist), math.asin(radius / dist)
        rows = slice(int(np.searchsorted(self.el, el - half)), int(np.searchsorted(self.el, el + half, side="right")))
        if rows.start >= rows.stop:
            return None
        if dxy <= radius:
            return rows, np.arange(n_col)
        step = 2.0 * math.pi / n_col
        az, half = math.atan2(v[1], v[0]) - self.yaw, math.asin(radius / dxy)
        c0, c1 = math.floor((az - half) / step), math.ceil((az + half) / step)
        if c1 - c0 + 1 >= n_col:
            return rows, np.arange(n_col)
        return rows, np.arange(c0, c1 + 1) % n_col

    def update(self, rows: slice, cols: np.ndarray, t: np.ndarray, hit: np.ndarray, cos: np.ndarray,
               label: int, instance: int, refl: float) -> None:
        """Keep ``t`` where ``hit`` and nearer than the current hit of the (rows, cols) rays."""
        current = self.t[rows, cols]
        better = hit & (t < current)
        if not better.any():
            return
        self.t[rows, cols] = np.where(better, t, current)
        for name, value in (("label", label), ("instance", instance), ("refl", refl)):
            arr = getattr(self, name)
            arr[rows, cols] = np.where(better, value, arr[rows, cols])
        self.cos[rows, cols] = np.where(better, cos, self.cos[rows, cols])


def _near(sw: _Sweep, center: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Indices of the objects whose bounding sphere comes within ``max_range`` of the sensor."""
    if len(radius) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.linalg.norm(center - sw.origin, axis=1) - radius < sw.lidar.max_range)


def _cast_ground(sw: _Sweep, scene: Scene) -> None:
    """Ray/height-field hits by Newton's method from the tangent-plane solution (rays from above)."""
    ground, o, d = scene.ground, sw.origin, sw.d.reshape(-1, 3)
    gx0, gy0 = ground.gradient(np.float64(o[0]), np.float64(o[1]))
    g0 = float(ground.height(np.float64(o[0]), np.float64(o[1])))
    denom = d[:, 2] - gx0 * d[:, 0] - gy0 * d[:, 1]
    with np.errstate(divide="ignore"):
        t0 = np.where(denom < 0, (g0 - o[2]) / denom, np.inf)
    cand = np.flatnonzero(t0 < 2.0 * sw.lidar.max_range)
    dc, t = d[cand], t0[cand]
    for _ in range(12):
        x, y = o[0] + t * dc[:, 0], o[1] + t * dc[:, 1]
        gx, gy = ground.gradient(x, y)
        f = o[2] + t * dc[:, 2] - ground.height(x, y)
        fp = dc[:, 2] - gx * dc[:, 0] - gy * dc[:, 1]
        t = t - f / np.minimum(fp, -1e-6)  # only downward-crossing rays are followed
    x, y = o[0] + t * dc[:, 0], o[1] + t * dc[:, 1]
    gx, gy = ground.gradient(x, y)
    # grazing rays whose iteration did not settle give no ground return
    ok = (np.abs(o[2] + t * dc[:, 2] - ground.height(x, y)) < 1e-4) & (t > 0)
    cos = np.abs(dc[:, 2] - gx * dc[:, 0] - gy * dc[:, 1]) / np.sqrt(gx * gx + gy * gy + 1.0)
    road, side = scene.ground_reflectance
    take = cand[ok]
    sw.t.reshape(-1)[take] = t[ok]
    sw.label.reshape(-1)[take] = GROUND
    sw.instance.reshape(-1)[take] = 0
    sw.refl.reshape(-1)[take] = np.where(np.abs(y[ok]) < scene.road_half_width, road, side)
    sw.cos.reshape(-1)[take] = cos[ok]


def _cast_boxes(sw: _Sweep, boxes: Boxes) -> None:
    radius = np.linalg.norm(boxes.half, axis=1)
    for i in _near(sw, boxes.center, radius):
        win = sw.window(boxes.center[i], radius[i])
        if win is None:
            continue
        rows, cols = win
        d = sw.d[rows][:, cols]
        c, s = math.cos(boxes.yaw[i]), math.sin(boxes.yaw[i])
        v = sw.origin - boxes.center[i]
        o_loc = (c * v[0] + s * v[1], -s * v[0] + c * v[1], v[2])
        d_loc = (c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], d[..., 2])
        lo, hi = [], []
        with np.errstate(divide="ignore", invalid="ignore"):
            for a in range(3):
                inv = 1.0 / d_loc[a]
                t1, t2 = (-boxes.half[i, a] - o_loc[a]) * inv, (boxes.half[i, a] - o_loc[a]) * inv
                lo.append(np.minimum(t1, t2))
                hi.append(np.maximum(t1, t2))
        t_near = np.maximum(np.maximum(lo[0], lo[1]), lo[2])
        hit = (t_near <= np.minimum(np.minimum(hi[0], hi[1]), hi[2])) & (t_near > 0)
        # the entry face is the slab entered last; its normal is that box axis
        cos = np.where((lo[0] >= lo[1]) & (lo[0] >= lo[2]), np.abs(d_loc[0]),
                       np.where(lo[1] >= lo[2], np.abs(d_loc[1]), np.abs(d_loc[2])))
        sw.update(rows, cols, t_near, hit, cos, int(boxes.label[i]), int(boxes.instance[i]), float(boxes.reflectance[i]))


def _cast_cylinders(sw: _Sweep, cyl: Cylinders) -> None:
    mid = np.concatenate([cyl.center, cyl.z_range.mean(axis=1, keepdims=True)], axis=1)
    radius = np.hypot(cyl.radius, 0.5 * (cyl.z_range[:, 1] - cyl.z_range[:, 0]))
    for i in _near(sw, mid, radius):
        win = sw.window(mid[i], radius[i])
        if win is None:
            continue
        rows, cols = win
        d = sw.d[rows][:, cols]
        ox, oy = sw.origin[0] - cyl.center[i, 0], sw.origin[1] - cyl.center[i, 1]
        a = d[..., 0] ** 2 + d[..., 1] ** 2
        b = ox * d[..., 0] + oy * d[..., 1]
        disc = b * b - a * (ox * ox + oy * oy - cyl.radius[i] ** 2)
        sq = np.sqrt(np.maximum(disc, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (-b - sq) / a
        z = sw.origin[2] + t * d[..., 2]
        hit = (disc > 0) & (t > 0) & (z >= cyl.z_range[i, 0]) & (z <= cyl.z_range[i, 1])
        # n . d = (b + t a) / r = -sqrt(disc) / r for the outward normal at the entry point
        cos = np.minimum(sq / cyl.radius[i], 1.0)
        sw.update(rows, cols, t, hit, cos, int(cyl.label[i]), int(cyl.instance[i]), float(cyl.reflectance[i]))


def _cast_ellipsoids(sw: _Sweep, ell: Ellipsoids, rng: np.random.Generator) -> None:
    """Semi-transparent volumes: each crossing ray returns at an exponential free path if it ends inside."""
    radius = ell.radii.max(axis=1)
    for i in _near(sw, ell.center, radius):
        win = sw.window(ell.center[i], radius[i])
        if win is None:
            continue
        rows, cols = win
        d = sw.d[rows][:, cols] / ell.radii[i]
        o = (sw.origin - ell.center[i]) / ell.radii[i]
        a = np.einsum("...k,...k->...", d, d)
        b = d @ o
        disc = b * b - a * (o @ o - 1.0)
        sq = np.sqrt(np.maximum(disc, 0.0))
        t_in, t_out = (-b - sq) / a, (-b + sq) / a
        enter = np.maximum(t_in, 0.0)
        idx = np.flatnonzero((disc > 0) & (t_out > enter))
        u = rng.random((2, idx.size))
        free = -np.log1p(-u[0]) / ell.density[i]
        inside = free < t_out.reshape(-1)[idx] - enter.reshape(-1)[idx]
        t = np.full(a.shape, np.inf)
        t.reshape(-1)[idx[inside]] = enter.reshape(-1)[idx[inside]] + free[inside]
        cos = np.zeros(a.shape)
        cos.reshape(-1)[idx] = u[1]  # leaves face every way
        sw.update(rows, cols, t, np.isfinite(t), cos, int(ell.label[i]), int(ell.instance[i]), float(ell.reflectance[i]))


def _pose(x: float, y: float, z: float, yaw: float) -> np.ndarray:
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s, 0.0, x], [s, c, 0.0, y], [0.0, 0.0, 1.0, z], [0.0, 0.0, 0.0, 1.0]])


def cast_sweep(scene: Scene, lidar: LidarSpec, x: float, y: float, yaw: float,
               rng: np.random.Generator) -> dict[str, np.ndarray | int]:
    """One sweep from a sensor at ``(x, y)``, ``lidar.height`` above the ground, heading ``yaw`` (rad).

    Returns world-frame ``xyz`` (M, 3) float64, ``intensity`` (M,) in [0, 1], ``ring`` (M,),
    ``label`` (M,), ``instance`` (M,), the ``pose`` (4, 4) sensor -> world, ``n_rays`` and
    ``n_returns`` (rays that hit within range, before dropout).
    """
    z = float(scene.ground.height(np.float64(x), np.float64(y))) + lidar.height
    origin = np.array([x, y, z])
    sw = _Sweep(lidar, origin, yaw)
    shape = sw.t.shape
    # per-ray draws first and for every ray, so the settings below do not shift later draws
    u_drop = rng.random(shape)
    noise = rng.standard_normal((2,) + shape)
    _cast_ground(sw, scene)
    _cast_boxes(sw, scene.boxes)
    _cast_cylinders(sw, scene.cylinders)
    _cast_ellipsoids(sw, scene.ellipsoids, rng)
    hit = (sw.t >= lidar.min_range) & (sw.t <= lidar.max_range)
    keep = hit & (u_drop >= lidar.dropout)
    rows, cols = np.nonzero(keep)
    r = sw.t[rows, cols] + lidar.range_noise * noise[0, rows, cols]
    xyz = origin + r[:, None] * sw.d[rows, cols]
    intensity = sw.refl[rows, cols] * (0.2 + 0.8 * sw.cos[rows, cols]) + 0.02 * noise[1, rows, cols]
    return {
        "xyz": xyz,
        "intensity": np.clip(intensity, 0.0, 1.0),
        "ring": rows,
        "label": sw.label[rows, cols].astype(np.int64),
        "instance": sw.instance[rows, cols],
        "pose": _pose(x, y, z, yaw),
        "n_rays": int(hit.size),
        "n_returns": int(hit.sum()),
    }


def _merge(sweeps: list[dict], scene: Scene, lidar: LidarSpec, to_frame: np.ndarray) -> PointCloud:
    """Concatenate sweeps and express them in the frame whose pose (frame -> world) is ``to_frame``."""
    world_to_frame = np.linalg.inv(to_frame)
    xyz = np.concatenate([s["xyz"] for s in sweeps]) @ world_to_frame[:3, :3].T + world_to_frame[:3, 3]
    features = np.stack([np.concatenate([s["intensity"] for s in sweeps]),
                         np.concatenate([s["ring"] for s in sweeps])], axis=1).astype(np.float32)
    return PointCloud(
        xyz=xyz,
        features=features,
        feature_names=list(FEATURE_NAMES),
        labels=np.concatenate([s["label"] for s in sweeps]),
        instance=np.concatenate([s["instance"] for s in sweeps]),
        source="synthetic",
        meta={
            "format": "synthetic",
            "n_points_file": int(xyz.shape[0]),
            "label_names": dict(LABELS),
            "frame_to_world": to_frame,
            "sweep_poses": np.stack([s["pose"] for s in sweeps]),
            "n_rays": sum(s["n_rays"] for s in sweeps),
            "n_returns": sum(s["n_returns"] for s in sweeps),
            "scene": scene,
            "lidar": lidar,
        },
    )


def make_scene(rng: np.random.Generator | int, *, n_sweeps: int = 1, extent: float = 140.0,
               lidar: LidarSpec | None = None, sweep_step: float = 0.5) -> PointCloud:
    """A street ``extent`` metres long seen by ``n_sweeps`` sweeps, in the last sweep's sensor frame.

    The sensor drives along +x in the ego lane and its last sweep is taken mid-street;
    earlier sweeps are ``sweep_step`` metres apart behind it (nuScenes-style multi-sweep input).
    Coordinates are in that last sensor frame (origin at the sensor, x forward, z up, ground
    about ``-lidar.height``), like a KITTI ``.bin``.

    Returns a :class:`PointCloud` with float64 ``xyz`` (N, 3), float32 features
    ``[intensity, ring]``, ``labels`` (ids of :data:`LABELS`) and ``instance``. ``meta`` holds
    ``scene`` (the :class:`Scene`, world frame), ``frame_to_world`` (4, 4), ``sweep_poses``
    (S, 4, 4) sensor -> world, ``n_rays`` and ``n_returns`` (hits within range before dropout).
    """
    if n_sweeps < 1:
        raise ValueError(f"n_sweeps must be >= 1, got {n_sweeps}")
    rng = np.random.default_rng(rng)
    lidar = LidarSpec() if lidar is None else lidar
    scene = random_street(rng, length=extent, margin=0.0)
    y, yaw = scene.lane_y + float(rng.normal(0.0, 0.15)), float(rng.normal(0.0, 0.02))
    sweeps = []
    for k in range(n_sweeps):
        back = (n_sweeps - 1 - k) * sweep_step
        sweeps.append(cast_sweep(scene, lidar, extent / 2 - back * math.cos(yaw), y - back * math.sin(yaw), yaw, rng))
    return _merge(sweeps, scene, lidar, sweeps[-1]["pose"])


def make_aggregated_scene(rng: np.random.Generator | int, *, n_points_min: int = 1_000_000, length: float = 300.0,
                          lidar: LidarSpec | None = None, max_sweeps: int = 1000) -> PointCloud:
    """An aggregated map of a ``length`` metre street: sweeps along the ego lane merged in the world frame.

    Sweeps are taken at evenly spaced positions along the street (a first guess of how many
    are needed), then at positions of finer grids in a random order, until the map holds at
    least ``n_points_min`` points (SemanticKITTI-style accumulated scans, not thinned).
    Coordinates are the scene's world frame (street along +x from 0 to ``length``);
    ``meta`` is as in :func:`make_scene` with ``frame_to_world`` the identity.
    """
    if n_points_min < 1 or max_sweeps < 1:
        raise ValueError(f"n_points_min and max_sweeps must be >= 1, got {n_points_min}, {max_sweeps}")
    rng = np.random.default_rng(rng)
    lidar = LidarSpec() if lidar is None else lidar
    scene = random_street(rng, length=length)
    # about 80 % of the rays return in a street; a low guess only costs extra sweeps
    n = max(1, math.ceil(n_points_min / (0.8 * lidar.n_rings * lidar.n_columns)))
    sweeps: list[dict] = []
    total, level = 0, 0
    while total < n_points_min:
        m = n * 2**level
        order = np.arange(m) if level == 0 else rng.permutation(m)
        for j in order:
            if len(sweeps) == max_sweeps:
                raise ValueError(f"{max_sweeps} sweeps gave {total} points, fewer than n_points_min={n_points_min}")
            x = (j + 0.5) * length / m
            sweeps.append(cast_sweep(scene, lidar, x, scene.lane_y + float(rng.normal(0.0, 0.2)),
                                     float(rng.normal(0.0, 0.02)), rng))
            total += len(sweeps[-1]["label"])
            if total >= n_points_min and level > 0:
                break
        level += 1
    return _merge(sweeps, scene, lidar, np.eye(4))
