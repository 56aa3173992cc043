"""Synthetic CT-like phantoms: a body outline with organ-like shapes of distinct HU.

Shapes are defined in world coordinates (RAS mm) and sampled on a voxel grid whose
spacing and axis orientation vary from case to case, so a phantom set exercises the
same read → reorient → resample → invert path as real scans. Each case differs by
random organ positions, sizes, intensities and noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

LABELS: dict[int, str] = {0: "background", 1: "liver", 2: "spleen", 3: "kidney", 4: "spine", 5: "lung"}
"""Label ids of the phantom set and their names."""

# Mean HU per tissue, roughly a contrast-enhanced portal-venous CT; distinct so that a
# small net can separate them (neighbours differ by at least 60 HU, three noise sigmas).
_HU = {"air": -1000.0, "fat": -100.0, "soft": 40.0, 1: 100.0, 2: 160.0, 3: 230.0, 4: 600.0, 5: -850.0}

ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "PLS", "ASR")
"""Axis orientations the generator samples (anatomical directions of the voxel axes)."""


@dataclass
class Phantom:
    """One synthetic case: ``image`` in HU and ``label`` share the voxel grid of ``affine``."""

    image: np.ndarray  # (X, Y, Z) float32, HU
    label: np.ndarray  # (X, Y, Z) uint8, ids of LABELS
    affine: np.ndarray  # (4, 4) float64 voxel -> RAS mm


def grid_affine(spacing: tuple[float, float, float], axcodes: str, extent_mm: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An affine and shape whose voxels cover the box ``[-extent/2, extent/2]`` (RAS mm).

    ``axcodes`` names the anatomical direction each voxel axis points to, as nibabel's
    ``aff2axcodes`` would report it.
    """
    ras_axes = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    rot = np.zeros((3, 3))
    shape = []
    for col, code in enumerate(axcodes):
        axis, sign = ras_axes[code]
        rot[axis, col] = sign * spacing[col]
        shape.append(int(np.ceil(extent_mm[axis] / spacing[col])))
    affine = np.eye(4)
    affine[:3, :3] = rot
    # choose the origin so the grid centre sits at the world origin
    centre_vox = (np.asarray(shape) - 1) / 2.0
    affine[:3, 3] = -rot @ centre_vox
    return affine, tuple(shape)


def _world_coords(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = np.indices(shape, dtype=np.float32).reshape(3, -1)
    xyz = affine[:3, :3].astype(np.float32) @ idx + affine[:3, 3:4].astype(np.float32)
    return tuple(c.reshape(shape) for c in xyz)  # type: ignore[return-value]


def _ellipsoid(x, y, z, centre, semi) -> np.ndarray:
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2 <= 1.0


def make_phantom(
    rng: np.random.Generator,
    *,
    spacing: tuple[float, float, float] | None = None,
    axcodes: str | None = None,
    noise_hu: float = 20.0,
) -> Phantom:
    """Draw one phantom.

    Args:
        rng: source of all randomness (positions, sizes, HU offsets, noise, grid).
        spacing: voxel spacing in mm per voxel axis; drawn in [1.8, 2.6] in-plane and
            [2.5, 4.0] along the slice axis when None.
        axcodes: voxel axis orientation; drawn from :data:`ORIENTATIONS` when None.
        noise_hu: standard deviation of the additive Gaussian noise.
    """
    if axcodes is None:
        axcodes = str(rng.choice(ORIENTATIONS))
    if spacing is None:
        inplane = float(rng.uniform(1.8, 2.6))
        slice_mm = float(rng.uniform(2.5, 4.0))
        # the slice axis is the voxel axis that points S or I
        spacing = tuple(slice_mm if c in "SI" else inplane for c in axcodes)  # type: ignore[assignment]
    body = np.array([150.0, 105.0]) * rng.uniform(0.92, 1.08, size=2)
    extent = np.array([2 * body[0] + 30, 2 * body[1] + 30, 220.0])
    affine, shape = grid_affine(spacing, axcodes, extent)
    x, y, z = _world_coords(affine, shape)

    def jitter(c, s, dc=10.0, ds=0.12):
        return np.asarray(c) + rng.uniform(-dc, dc, 3), np.asarray(s) * rng.uniform(1 - ds, 1 + ds, 3)

    hu = np.full(shape, _HU["air"], dtype=np.float32)
    lab = np.zeros(shape, dtype=np.uint8)
    outer = (x / body[0]) ** 2 + (y / body[1]) ** 2 <= 1.0
    inner = (x / (body[0] - 12)) ** 2 + (y / (body[1] - 12)) ** 2 <= 1.0
    hu[outer] = _HU["fat"]
    hu[inner] = _HU["soft"]

    organs: list[tuple[int, np.ndarray]] = []
    for side in (1.0, -1.0):  # lungs, in the upper part of the body
        c, s = jitter((side * 62, 5, 75), (52, 62, 50))
        organs.append((5, _ellipsoid(x, y, z, c, s)))
    c, s = jitter((58, 12, 0), (62, 55, 50))
    organs.append((1, _ellipsoid(x, y, z, c, s)))  # liver on the patient's right (+x in RAS)
    c, s = jitter((-78, -15, 10), (32, 30, 42))
    organs.append((2, _ellipsoid(x, y, z, c, s)))
    for side in (1.0, -1.0):
        c, s = jitter((side * 52, -48, -45), (26, 22, 40), dc=6)
        organs.append((3, _ellipsoid(x, y, z, c, s)))
    r = 17.0 * rng.uniform(0.9, 1.1)
    organs.append((4, (x / r) ** 2 + ((y + 78) / r) ** 2 <= 1.0))
    for lab_id, mask in organs:
        mask &= inner
        lab[mask] = lab_id
        hu[mask] = _HU[lab_id] + rng.uniform(-10, 10)

    # partial-volume blur, then scanner-like noise
    hu = gaussian_filter(hu, sigma=0.6).astype(np.float32)
    hu += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    return Phantom(image=hu, label=lab, affine=affine)


def phantom_axcodes(p: Phantom) -> str:
    """The orientation codes of a phantom's grid, as nibabel reports them."""
    return "".join(nib.aff2axcodes(p.affine))
