"""Voxelisation against a numpy reference, the point range, round trips, spconv conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointcloud.sparse.spconv_compat import spconv_available
from pointcloud.sparse.voxelize import devoxelize, from_spconv, to_spconv, voxel_centers, voxelize
from pointcloud.structure import Point


def clouds(seed: int = 0):
    rng = np.random.default_rng(seed)
    coords = [rng.uniform([-5, -5, -2], [5, 5, 1], size=(n, 3)).astype(np.float32) for n in (3000, 2000)]
    feats = [rng.normal(size=(len(c), 4)).astype(np.float32) for c in coords]
    return coords, feats


def numpy_reference(coords, feats, size, reduce):
    """{(batch, x, y, z) voxel in world multiples of size: reduced feature}."""
    groups: dict[tuple, list] = {}
    for b, (c, f) in enumerate(zip(coords, feats)):
        g = np.floor(c.astype(np.float64) / np.asarray(size)).astype(np.int64)
        for key, row in zip(map(tuple, g), f):
            groups.setdefault((b, *key), []).append(row)
    op = np.mean if reduce == "mean" else np.max
    return {k: op(np.stack(v), axis=0) for k, v in groups.items()}


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_reduction_matches_numpy(reduce):
    coords, feats = clouds()
    size = (0.5, 0.5, 0.25)
    voxels, inverse = voxelize(Point.from_clouds(coords, feats), size, reduce=reduce)
    ref = numpy_reference(coords, feats, size, reduce)
    assert voxels.num_sites == len(ref) and voxels.dropped == 0 and bool((inverse >= 0).all())
    assert voxels.indices.dtype == torch.int32
    # sorted by (batch, z, y, x), unique
    i = voxels.indices.long()
    key = ((i[:, 0] * 100 + i[:, 1]) * 100 + i[:, 2]) * 100 + i[:, 3]
    assert bool((key[1:] > key[:-1]).all())
    # the world voxel of each site: origin is a multiple of the voxel size
    origin = np.asarray(voxels.origin) / np.asarray(size)
    np.testing.assert_allclose(origin, np.round(origin), atol=1e-9)
    world = i[:, 1:].flip(1).numpy() + np.round(origin).astype(np.int64)
    for row, b, w in zip(voxels.features.numpy(), i[:, 0].tolist(), world):
        np.testing.assert_allclose(row, ref[(b, *w)], rtol=1e-5, atol=1e-6)
    assert voxels.spatial_shape == tuple(int(s) for s in (i[:, 1:].amax(0) + 1))


def test_round_trip_and_centres():
    coords, feats = clouds(1)
    p = Point.from_clouds(coords, feats)
    voxels, inverse = voxelize(p, 0.4)
    back = devoxelize(voxels.features, inverse)
    # every point gets its voxel's mean; averaging those per voxel changes nothing
    again, _ = voxelize(Point(coord=p.coord, feat=back, offset=p.offset), 0.4)
    torch.testing.assert_close(again.features, voxels.features)
    assert torch.equal(again.indices, voxels.indices)
    # each point lies in its voxel: at most half a voxel from the centre on every axis
    centres = voxel_centers(voxels)[inverse]
    assert float((centres - p.coord).abs().max()) <= 0.2 + 1e-5
    # voxel_size None: the point's own grid_coord is the grid
    p.grid_coord = torch.floor(p.coord / 0.4).int() - torch.floor(p.coord / 0.4).int().amin(0)
    p.grid_size = 0.4
    same, inv2 = voxelize(p)
    assert torch.equal(same.indices, voxels.indices) and torch.equal(inv2, inverse)


def test_same_point_same_voxel_across_crops():
    """Without a point range voxels align to world multiples, so a point keeps its voxel
    centre whichever crop of the scene it comes with."""
    coords, feats = clouds(2)
    whole, inv_whole = voxelize(Point.from_clouds(coords[:1], feats[:1]), 0.3)
    keep = coords[0][:, 0] > 1.0
    crop, inv_crop = voxelize(Point.from_clouds([coords[0][keep]], [feats[0][keep]]), 0.3)
    c_whole = voxel_centers(whole)[inv_whole][torch.from_numpy(keep)]
    c_crop = voxel_centers(crop)[inv_crop]
    torch.testing.assert_close(c_crop, c_whole, atol=1e-5, rtol=0)


def test_point_range_counts_outside_points():
    coords, feats = clouds(3)
    prange = (-4.0, -3.0, -1.5, 4.0, 3.0, 0.5)
    voxels, inverse = voxelize(Point.from_clouds(coords, feats), (0.5, 0.5, 0.25), point_range=prange)
    allc = np.concatenate(coords)
    inside = ((allc >= prange[:3]) & (allc < prange[3:])).all(1)
    assert voxels.dropped == int((~inside).sum()) > 0
    assert torch.equal(inverse < 0, torch.from_numpy(~inside))
    assert voxels.spatial_shape == (8, 12, 16) and voxels.origin == prange[:3]
    assert int(voxels.indices[:, 1:].amax()) < 16 and int(voxels.indices.amin()) >= 0
    ref = numpy_reference([c[((c >= prange[:3]) & (c < prange[3:])).all(1)] - np.float32(prange[:3]) for c in coords],
                          [f[((c >= prange[:3]) & (c < prange[3:])).all(1)] for c, f in zip(coords, feats)],
                          (0.5, 0.5, 0.25), "mean")
    assert voxels.num_sites == len(ref)
    # dropped points get the fill value back
    out = devoxelize(voxels.features, inverse, fill=-7.0)
    assert bool((out[inverse < 0] == -7.0).all())


def test_kitti_range_shape():
    """OpenPCDet's KITTI grid: 70.4 / 0.05 is not exactly 1408 in floats."""
    p = Point.from_clouds([np.array([[0.0, 0.0, 0.0], [70.39, 39.99, 0.99], [70.4, 0.0, 0.0]], np.float32)])
    voxels, inverse = voxelize(p, (0.05, 0.05, 0.1), point_range=(0, -40, -3, 70.4, 40, 1))
    assert voxels.spatial_shape == (40, 1600, 1408)
    assert inverse.tolist()[2] == -1 and voxels.dropped == 1


def test_bad_arguments():
    p = Point.from_clouds([np.zeros((2, 3))])
    with pytest.raises(ValueError, match="reduce must be"):
        voxelize(p, 0.1, reduce="sum")
    with pytest.raises(ValueError, match="voxel_size must be a positive"):
        voxelize(p, (0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="point_range must be"):
        voxelize(p, 0.1, point_range=(0, 0, 0, -1, 1, 1))
    with pytest.raises(ValueError, match="grid_coord is not set"):
        voxelize(p)


@pytest.mark.skipif(not spconv_available(), reason="spconv not installed")
def test_spconv_round_trip():
    coords, feats = clouds(4)
    voxels, _ = voxelize(Point.from_clouds(coords, feats), 0.5)
    t = to_spconv(voxels)
    assert list(t.spatial_shape) == list(voxels.spatial_shape) and t.batch_size == 2
    assert torch.equal(t.dense(), voxels.dense())
    back = from_spconv(t, like=voxels)
    assert torch.equal(back.indices, voxels.indices) and torch.equal(back.features, voxels.features)
    assert back.cache is voxels.cache and back.voxel_size == voxels.voxel_size
