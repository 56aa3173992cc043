"""Procedural streets for the synthetic LiDAR scenes: the ground, buildings, cars, poles, vegetation.

A :class:`Scene` is a gently sloped, slightly undulating ground height field with box buildings
along both sides of a road running along +x, parked cars along both kerbs and passing cars in
the opposite lane (a body box and a cabin box each), thin vertical poles on the sidewalks,
trees (a trunk cylinder and an ellipsoid crown) and hedges (ellipsoids). Vegetation volumes are
semi-transparent with a ``density`` (returns per metre of ray inside them).

Label ids (:data:`LABELS`): 0 ground, 1 building, 2 car, 3 pole, 4 vegetation. ``instance`` is
0 for the ground and one id per object otherwise (a car's two boxes, a tree's trunk and crown
share one id).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["LABELS", "Boxes", "Cylinders", "Ellipsoids", "Ground", "Scene", "random_street"]

LABELS: dict[int, str] = {0: "ground", 1: "building", 2: "car", 3: "pole", 4: "vegetation"}
"""Label ids of the synthetic scenes and their names."""

GROUND, BUILDING, CAR, POLE, VEGETATION = 0, 1, 2, 3, 4


@dataclass
class Ground:
    """Height field ``z = z0 + slope . (x, y) + sum_k amp_k sin(kx_k x + ky_k y + phase_k)``.

    ``waves`` is ``(W, 4)``: amplitude (m), kx, ky (rad/m), phase.
    """

    z0: float
    slope: np.ndarray
    waves: np.ndarray

    def height(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        z = self.z0 + self.slope[0] * x + self.slope[1] * y
        for amp, kx, ky, ph in self.waves:
            z = z + amp * np.sin(kx * x + ky * y + ph)
        return z

    def gradient(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gx = np.full(np.shape(x), self.slope[0])
        gy = np.full(np.shape(x), self.slope[1])
        for amp, kx, ky, ph in self.waves:
            c = amp * np.cos(kx * x + ky * y + ph)
            gx = gx + kx * c
            gy = gy + ky * c
        return gx, gy


@dataclass
class Boxes:
    """``B`` boxes rotated by ``yaw`` about z: ``center`` (B, 3), ``half`` (B, 3) half sizes in the box frame."""

    center: np.ndarray
    half: np.ndarray
    yaw: np.ndarray
    label: np.ndarray
    instance: np.ndarray
    reflectance: np.ndarray

    def contains(self, xyz: np.ndarray, index: int, margin: float = 0.0) -> np.ndarray:
        """``(N,)`` bool: points of ``xyz`` (N, 3) inside box ``index`` grown by ``margin`` (may be < 0)."""
        c, s = math.cos(self.yaw[index]), math.sin(self.yaw[index])
        v = xyz - self.center[index]
        local = np.stack([c * v[:, 0] + s * v[:, 1], -s * v[:, 0] + c * v[:, 1], v[:, 2]], axis=1)
        return np.all(np.abs(local) <= self.half[index] + margin, axis=1)


@dataclass
class Cylinders:
    """``C`` vertical cylinders: axis at ``center`` (C, 2) xy, ``z_range`` (C, 2) bottom/top, ``radius`` (C,)."""

    center: np.ndarray
    z_range: np.ndarray
    radius: np.ndarray
    label: np.ndarray
    instance: np.ndarray
    reflectance: np.ndarray


@dataclass
class Ellipsoids:
    """``E`` axis-aligned semi-transparent ellipsoids: ``center`` (E, 3), ``radii`` (E, 3), ``density`` (E,) per metre."""

    center: np.ndarray
    radii: np.ndarray
    density: np.ndarray
    label: np.ndarray
    instance: np.ndarray
    reflectance: np.ndarray


@dataclass
class Scene:
    """A street along +x: objects over ``[x_min, x_max]``, road ``|y| < road_half_width`` (ego lane at ``lane_y``)."""

    ground: Ground
    boxes: Boxes
    cylinders: Cylinders
    ellipsoids: Ellipsoids
    road_half_width: float
    lane_y: float
    x_min: float
    x_max: float
    ground_reflectance: tuple[float, float] = (0.12, 0.28)  # road, sidewalk


@dataclass
class _Parts:
    """Lists that the street builder appends to, one per primitive kind."""

    boxes: list = field(default_factory=list)
    cylinders: list = field(default_factory=list)
    ellipsoids: list = field(default_factory=list)
    next_instance: int = 1

    def new_instance(self) -> int:
        self.next_instance += 1
        return self.next_instance - 1


def _columns(rows: list[tuple], widths: tuple[int, int, int]) -> list[np.ndarray]:
    """Records ``(geometry x3, label, instance, reflectance)`` -> float64 ``(R, width)`` geometry
    columns (``(R,)`` for width 1), int64 labels and instances, float64 reflectances."""
    n = len(rows)
    out = [np.array([r[i] for r in rows], dtype=np.float64).reshape((n, w) if w > 1 else (n,))
           for i, w in enumerate(widths)]
    out += [np.array([r[i] for r in rows], dtype=np.int64).reshape(n) for i in (3, 4)]
    return out + [np.array([r[5] for r in rows], dtype=np.float64).reshape(n)]


def _footprint_min(ground: Ground, cx: float, cy: float, hx: float, hy: float, yaw: float) -> float:
    c, s = math.cos(yaw), math.sin(yaw)
    lx = np.array([hx, hx, -hx, -hx, 0.0])
    ly = np.array([hy, -hy, hy, -hy, 0.0])
    return float(ground.height(cx + c * lx - s * ly, cy + s * lx + c * ly).min())


def random_street(rng: np.random.Generator | int, *, length: float, margin: float = 30.0) -> Scene:
    """A random street along +x whose objects span ``x`` in ``[-margin, length + margin]``.

    The road is ``2 * road_half_width`` wide (7-10 m each side of ``y = 0``) with a parking lane
    along each kerb; the ego lane centre is ``lane_y`` (right-hand traffic, driving +x). Sidewalks
    hold poles and trees; hedges and buildings (3.5-7 m behind the kerb, 5-22 m high) follow.
    """
    rng = np.random.default_rng(rng)
    if length <= 0:
        raise ValueError(f"length must be > 0, got {length}")
    wavelengths = rng.uniform(30.0, 70.0, 2)
    angles = rng.uniform(0.0, 2 * math.pi, 2)
    k = 2 * math.pi / wavelengths
    waves = np.stack([rng.uniform(0.03, 0.12, 2), k * np.cos(angles), k * np.sin(angles), rng.uniform(0, 2 * math.pi, 2)], 1)
    ground = Ground(z0=float(rng.uniform(-1.0, 1.0)), slope=rng.uniform(-0.025, 0.025, 2), waves=waves)
    road = float(rng.uniform(7.0, 10.0))
    x0, x1 = -margin, length + margin
    parts = _Parts()

    def add_box(cx, cy, z_lo, z_hi, hx, hy, yaw, label, inst, refl):
        parts.boxes.append(((cx, cy, 0.5 * (z_lo + z_hi)), (hx, hy, 0.5 * (z_hi - z_lo)), yaw, label, inst, refl))

    def add_car(cx, cy, yaw):
        length_, width, height = rng.uniform(4.2, 4.8), rng.uniform(1.7, 1.9), rng.uniform(1.4, 1.6)
        g = float(ground.height(np.float64(cx), np.float64(cy)))
        inst, refl = parts.new_instance(), float(rng.uniform(0.15, 0.8))
        add_box(cx, cy, g + 0.2, g + 0.95, length_ / 2, width / 2, yaw, CAR, inst, refl)
        back = -0.1 * length_  # cabin sits a little behind the middle
        add_box(cx + back * math.cos(yaw), cy + back * math.sin(yaw), g + 0.95, g + height,
                0.28 * length_, width / 2 - 0.08, yaw, CAR, inst, refl)

    for side in (-1.0, 1.0):
        # buildings: a row of blocks with alleys and the odd empty lot
        x = x0 + rng.uniform(0.0, 5.0)
        while x < x1:
            w = rng.uniform(8.0, 30.0)
            if rng.random() < 0.15:
                x += rng.uniform(4.0, 15.0)
                continue
            depth, height = rng.uniform(8.0, 18.0), rng.uniform(5.0, 22.0)
            yaw = float(rng.normal(0.0, 0.03))
            cx, cy = x + w / 2, side * (road + rng.uniform(3.5, 7.0) + depth / 2)
            g_lo = _footprint_min(ground, cx, cy, w / 2, depth / 2, yaw)
            top = float(ground.height(np.float64(cx), np.float64(cy))) + height
            add_box(cx, cy, g_lo - 1.0, top, w / 2, depth / 2, yaw, BUILDING, parts.new_instance(), float(rng.uniform(0.2, 0.45)))
            x += w + rng.uniform(0.0, 4.0)
        # parked cars along the kerb
        x = x0 + rng.uniform(0.0, 5.0)
        while x < x1:
            if rng.random() < 0.5:
                x += rng.uniform(4.0, 15.0)
                continue
            cy = side * (road - 1.2 - rng.uniform(0.0, 0.3))
            add_car(x + 2.4, cy, float((0.0 if side < 0 else math.pi) + rng.normal(0.0, 0.03)))
            x += 4.8 + rng.uniform(0.8, 3.0)
        # poles on the sidewalk; trees between them
        pole_x = []
        x = x0 + rng.uniform(0.0, 15.0)
        while x < x1:
            r, h = rng.uniform(0.1, 0.2), rng.uniform(4.0, 8.0)
            px, py = x, side * (road + rng.uniform(0.4, 0.8))
            g = float(ground.height(np.float64(px), np.float64(py)))
            parts.cylinders.append(((px, py), (g - 0.2, g + h), r, POLE, parts.new_instance(), float(rng.uniform(0.4, 0.6))))
            pole_x.append(px)
            x += rng.uniform(15.0, 35.0)
        x = x0 + rng.uniform(0.0, 10.0)
        while x < x1:
            if not pole_x or np.min(np.abs(np.asarray(pole_x) - x)) > 3.5:
                tx, ty = x, side * (road + rng.uniform(1.3, 2.0))
                g = float(ground.height(np.float64(tx), np.float64(ty)))
                inst, trunk_h = parts.new_instance(), rng.uniform(1.8, 3.0)
                parts.cylinders.append(((tx, ty), (g - 0.2, g + trunk_h + 0.5), rng.uniform(0.12, 0.25), VEGETATION, inst, 0.3))
                rxy, rz = rng.uniform(2.0, 3.5), rng.uniform(1.8, 3.2)
                parts.ellipsoids.append(((tx, ty, g + trunk_h + 0.8 * rz), (rxy, rxy, rz), rng.uniform(0.6, 1.5),
                                         VEGETATION, inst, float(rng.uniform(0.3, 0.5))))
            x += rng.uniform(6.0, 14.0)
        # hedges in front of the buildings
        x = x0 + rng.uniform(0.0, 10.0)
        while x < x1:
            if rng.random() < 0.7:
                rx, ry, rz = rng.uniform(1.5, 4.0), rng.uniform(0.5, 0.9), rng.uniform(0.6, 1.4)
                hx, hy = x + rx, side * (road + rng.uniform(2.3, 3.0))
                g = float(ground.height(np.float64(hx), np.float64(hy)))
                parts.ellipsoids.append(((hx, hy, g + 0.5 * rz), (rx, ry, rz), rng.uniform(1.5, 3.0),
                                         VEGETATION, parts.new_instance(), float(rng.uniform(0.3, 0.5))))
            x += rng.uniform(6.0, 16.0)
    # passing cars in the opposite lane
    for _ in range(int(rng.poisson((x1 - x0) / 40.0))):
        add_car(float(rng.uniform(x0, x1)), road - 4.05 + rng.normal(0.0, 0.3), float(math.pi + rng.normal(0.0, 0.05)))

    return Scene(
        ground=ground,
        boxes=Boxes(*_columns(parts.boxes, (3, 3, 1))),
        cylinders=Cylinders(*_columns(parts.cylinders, (2, 2, 1))),
        ellipsoids=Ellipsoids(*_columns(parts.ellipsoids, (3, 3, 1))),
        road_half_width=road, lane_y=-(road - 4.05), x_min=x0, x_max=x1,
    )
