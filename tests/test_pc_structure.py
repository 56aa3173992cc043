"""The Point and SparseVoxels records: batching, derived fields, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pointcloud.structure import Point, SparseVoxels, batch2offset, offset2batch


def test_from_clouds_batches_with_offsets():
    rng = np.random.default_rng(0)
    clouds = [rng.normal(size=(n, 3)).astype(np.float64) for n in (5, 0, 7)]
    feats = [rng.normal(size=(n, 2)) for n in (5, 0, 7)]
    p = Point.from_clouds(clouds, feats)
    assert p.coord.dtype == torch.float32 and p.coord.shape == (12, 3)
    assert p.feat.shape == (12, 2) and p.feat.dtype == torch.float32
    assert p.offset.tolist() == [5, 5, 12] and p.batch_size == 3
    assert p.batch.tolist() == [0] * 5 + [2] * 7
    np.testing.assert_allclose(p.coord[5:].numpy(), clouds[2], rtol=1e-6)
    np.testing.assert_allclose(p.feat[:5].numpy(), feats[0], rtol=1e-6)
    # no features: the coordinates are the features
    q = Point.from_clouds([torch.ones(4, 3)])
    assert torch.equal(q.feat, q.coord) and q.feat.data_ptr() != q.coord.data_ptr()
    # one-dimensional features (e.g. intensity) become one column
    r = Point.from_clouds([np.zeros((3, 3))], [np.arange(3.0)])
    assert r.feat.shape == (3, 1)


def test_batch_and_offset_derive_each_other():
    batch = torch.tensor([0, 0, 1, 1, 1, 3])
    assert batch2offset(batch).tolist() == [2, 5, 5, 6]
    assert offset2batch(torch.tensor([2, 5, 5, 6])).tolist() == batch.tolist()
    p = Point(coord=torch.zeros(6, 3), feat=torch.zeros(6, 1), batch=batch)
    assert p.offset.tolist() == [2, 5, 5, 6] and p.batch_size == 4


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(coord=torch.zeros(4, 2), feat=torch.zeros(4, 1), offset=torch.tensor([4])), r"coord must be \(N, 3\)"),
        (dict(coord=torch.zeros(4, 3), feat=torch.zeros(3, 1), offset=torch.tensor([4])), r"feat must be \(N=4, C\)"),
        (dict(coord=torch.zeros(4, 3), feat=torch.zeros(4, 1)), "give offset or batch"),
        (dict(coord=torch.zeros(4, 3), feat=torch.zeros(4, 1), offset=torch.tensor([3])), "offset ends at 3, expected N=4"),
        (dict(coord=torch.zeros(3, 3), feat=torch.zeros(3, 1), batch=torch.tensor([1, 0, 0])), "non-decreasing"),
        (dict(coord=torch.zeros(2, 3), feat=torch.zeros(2, 1), offset=torch.tensor([2]), grid_coord=torch.zeros(2, 2)),
         r"grid_coord must be \(N=2, 3\)"),
    ],
)
def test_point_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Point(**kwargs)


def test_from_clouds_validation():
    with pytest.raises(ValueError, match="at least one cloud"):
        Point.from_clouds([])
    with pytest.raises(ValueError, match=r"cloud 1: coordinates must be \(N, 3\)"):
        Point.from_clouds([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="cloud 0: 2 points but 3 feature rows"):
        Point.from_clouds([np.zeros((2, 3))], [np.zeros((3, 1))])
    with pytest.raises(ValueError, match=r"different feature widths \[1, 2\]"):
        Point.from_clouds([np.zeros((2, 3))] * 2, [np.zeros((2, 1)), np.zeros((2, 2))])
    with pytest.raises(ValueError, match="2 feature arrays for 1 clouds"):
        Point.from_clouds([np.zeros((2, 3))], [np.zeros((2, 1))] * 2)


def test_point_to_drops_cache():
    p = Point.from_clouds([np.ones((3, 3))])
    p.cache["order"] = torch.arange(3)
    q = p.to("cpu")
    assert torch.equal(q.coord, p.coord) and torch.equal(q.offset, p.offset) and q.cache == {}


def test_sparse_voxels_dense_and_shared_cache():
    idx = torch.tensor([[0, 1, 2, 3], [1, 0, 0, 0]])
    v = SparseVoxels(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), idx, (2, 3, 4), 2)
    assert v.indices.dtype == torch.int32
    d = v.dense()
    assert d.shape == (2, 2, 2, 3, 4) and d.sum() == 10
    assert d[0, :, 1, 2, 3].tolist() == [1.0, 2.0] and d[1, :, 0, 0, 0].tolist() == [3.0, 4.0]
    w = v.replace_feature(torch.zeros(2, 5))
    assert w.cache is v.cache and w.indices is v.indices and w.features.shape == (2, 5)
    with pytest.raises(ValueError, match=r"features must be \(M=2, C\)"):
        SparseVoxels(torch.zeros(3, 1), idx, (2, 3, 4), 2)
    with pytest.raises(ValueError, match=r"indices must be \(M, 4\)"):
        SparseVoxels(torch.zeros(2, 1), idx[:, :3], (2, 3, 4), 2)
    with pytest.raises(ValueError, match="spatial_shape"):
        SparseVoxels(torch.zeros(2, 1), idx, (2, 3), 2)
