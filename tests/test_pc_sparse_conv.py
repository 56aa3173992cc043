"""Our sparse convs against dense torch references on small grids.

Every sparse result is compared with ``torch.nn.functional.conv3d`` /
``conv_transpose3d`` on the densified grid, read at the active sites; gradients with
dense autograd (the references: ``tests.helpers.at_sites``/``dense_weight``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pointcloud.sparse import conv as conv_module
from pointcloud.sparse.conv import (
    DepthwiseSubMConv3d,
    SparseConv3d,
    SparseInverseConv3d,
    SubMConv3d,
    submanifold_map,
)
from pointcloud.structure import SparseVoxels
from tests.helpers import at_sites, dense_weight, random_voxels


def densify(features: torch.Tensor, x: SparseVoxels) -> torch.Tensor:
    """Differentiable densification of ``features`` on ``x``'s sites."""
    return x.replace_feature(features).dense()


@pytest.mark.parametrize("kernel_size,dilation", [(3, 1), ((1, 3, 5), 1), (3, 2)])
def test_subm_matches_dense(kernel_size, dilation):
    x = random_voxels(4000, 32, 8)
    conv = SubMConv3d(8, 16, kernel_size, dilation=dilation)
    out = conv(x)
    assert out.indices is x.indices and out.features.shape == (x.num_sites, 16)
    pad = tuple(dilation * (k // 2) for k in conv.kernel_size)
    ref = F.conv3d(x.dense(), dense_weight(conv.weight), conv.bias, padding=pad, dilation=dilation)
    torch.testing.assert_close(out.features, at_sites(ref, x.indices), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size,stride,padding", [(2, 2, 0), (3, 2, 1), ((3, 1, 3), (2, 1, 2), (1, 0, 1))])
def test_strided_matches_dense(kernel_size, stride, padding):
    x = random_voxels(3000, 32, 8, seed=1)
    conv = SparseConv3d(8, 12, kernel_size, stride=stride, padding=padding)
    out = conv(x)
    ref = F.conv3d(x.dense(), dense_weight(conv.weight), conv.bias, stride=stride, padding=padding)
    assert out.spatial_shape == tuple(ref.shape[2:])
    # active outputs: exactly the sites whose receptive field holds an active input
    occupancy = F.conv3d(x.replace_feature(torch.ones(x.num_sites, 1)).dense(),
                         torch.ones(1, 1, *conv.kernel_size), stride=stride, padding=padding)
    expected = occupancy[:, 0].nonzero()
    assert torch.equal(out.indices.long(), expected)  # sorted by (batch, z, y, x)
    torch.testing.assert_close(out.features, at_sites(ref, out.indices), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size,stride,padding", [(2, 2, 0), (3, 2, 1)])
def test_inverse_returns_to_encoder_sites(kernel_size, stride, padding):
    x = random_voxels(3000, 32, 8, seed=2)
    down = SparseConv3d(8, 12, kernel_size, stride=stride, padding=padding, indice_key="down1")
    up = SparseInverseConv3d(12, 6, kernel_size, indice_key="down1")
    coarse = down(x)
    fine = up(coarse)
    assert torch.equal(fine.indices, x.indices) and fine.spatial_shape == x.spatial_shape
    extra = [(n + 2 * padding - kernel_size) % stride for n in x.spatial_shape]
    ref = F.conv_transpose3d(coarse.dense(), up.weight.permute(4, 0, 1, 2, 3), up.bias, stride=stride,
                             padding=padding, output_padding=extra)
    assert tuple(ref.shape[2:]) == x.spatial_shape
    torch.testing.assert_close(fine.features, at_sites(ref, x.indices), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_depthwise_matches_grouped_dense(kernel_size):
    channels = 16
    x = random_voxels(4000, 32, channels, seed=3)
    dw = DepthwiseSubMConv3d(channels, kernel_size)
    k3 = kernel_size**3
    assert dw.weight.shape == (k3, channels)  # K*C weights, not K*C*C
    out = dw(x)
    w = dw.weight.T.reshape(channels, 1, kernel_size, kernel_size, kernel_size)
    ref = F.conv3d(x.dense(), w, dw.bias, padding=kernel_size // 2, groups=channels)
    torch.testing.assert_close(out.features, at_sites(ref, x.indices), atol=1e-5, rtol=1e-5)


def test_depthwise_costs_no_channel_matrix():
    """Depthwise multiplies elementwise (no matmul FLOPs at all); the full conv of the
    same size costs 2 * pairs * C * C matmul FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    x = random_voxels(500, 16, 8, seed=4)
    kmap = submanifold_map(x.indices, x.spatial_shape, (3, 3, 3))
    pairs = kmap.in_idx.numel() + x.num_sites  # + the centre offset
    with FlopCounterMode(display=False) as dw_count:
        DepthwiseSubMConv3d(8, 3)(x)
    with FlopCounterMode(display=False) as full_count:
        SubMConv3d(8, 8, 3)(x)
    assert dw_count.get_total_flops() == 0
    assert full_count.get_total_flops() == 2 * pairs * 8 * 8


def _grads(fn, params, inputs):
    for t in (*params, *inputs):
        t.grad = None
    fn().backward()
    return [t.grad.clone() for t in (*params, *inputs)]


def test_gradients_match_dense_autograd():
    torch.manual_seed(0)
    x = random_voxels(600, 12, 4, seed=5, dtype=torch.float64)
    feats = x.features.clone().requires_grad_(True)
    subm = SubMConv3d(4, 6, 3).double()
    down = SparseConv3d(6, 5, 3, stride=2, padding=1, indice_key="d").double()
    dw = DepthwiseSubMConv3d(5, 3).double()
    up = SparseInverseConv3d(5, 3, 3, indice_key="d").double()
    params = [subm.weight, subm.bias, down.weight, down.bias, dw.weight, dw.bias, up.weight, up.bias]

    def sparse_loss():
        x.cache.clear()
        h = subm(x.replace_feature(feats))
        c = dw(down(h))
        y = up(c)
        g = torch.linspace(-1, 1, y.features.numel(), dtype=torch.float64).reshape(y.features.shape)
        return (y.features * g).sum()

    def dense_loss():
        d = densify(feats, x)
        h = F.conv3d(d, dense_weight(subm.weight), subm.bias, padding=1)
        h = h * (x.replace_feature(torch.ones(x.num_sites, 1, dtype=torch.float64)).dense())  # submanifold: keep sites
        c = F.conv3d(h, dense_weight(down.weight), down.bias, stride=2, padding=1)
        # keep the active coarse sites only (bias would light up empty ones)
        active = F.conv3d(x.replace_feature(torch.ones(x.num_sites, 1, dtype=torch.float64)).dense(),
                          torch.ones(1, 1, 3, 3, 3, dtype=torch.float64), stride=2, padding=1) > 0
        c = c * active
        w = dw.weight.T.reshape(5, 1, 3, 3, 3)
        c = F.conv3d(c, w, dw.bias, padding=1, groups=5) * active
        y = F.conv_transpose3d(c, up.weight.permute(4, 0, 1, 2, 3), up.bias, stride=2, padding=1, output_padding=1)
        y = at_sites(y, x.indices)
        g = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape)
        return (y * g).sum()

    torch.testing.assert_close(sparse_loss(), dense_loss())
    for ours, ref in zip(_grads(sparse_loss, params, [feats]), _grads(dense_loss, params, [feats])):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-8)


def test_gradcheck_small():
    x = random_voxels(40, 5, 2, batch=1, seed=6, dtype=torch.float64)
    kmap = submanifold_map(x.indices, x.spatial_shape, (3, 3, 3))
    weight = torch.randn(3, 3, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    feats = x.features.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, w: conv_module.apply_kernel_map(f, w, kmap), (feats, weight))
    dw = torch.randn(27, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: conv_module.apply_depthwise_map(f, w, kmap), (feats, dw))


def test_bit_identical_runs_with_two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = random_voxels(20000, 64, 32, batch=1, seed=7)
        torch.manual_seed(0)
        subm = SubMConv3d(32, 32, 3, indice_key="s")
        down = SparseConv3d(32, 32, 3, stride=2, padding=1, indice_key="d")
        up = SparseInverseConv3d(32, 32, 3, indice_key="d")

        def run():
            x.cache.clear()
            y = up(down(subm(x)))
            y.features.square().sum().backward()
            return [y.features.detach().clone(), subm.weight.grad.clone(), down.weight.grad.clone()]

        first = run()
        for p in (subm.weight, down.weight):
            p.grad = None
        second = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_maps_built_once_per_key(monkeypatch):
    x = random_voxels(1000, 16, 8, seed=8)
    built = []
    original = conv_module.submanifold_map
    monkeypatch.setattr(conv_module, "submanifold_map", lambda *a, **k: built.append(1) or original(*a, **k))
    a = SubMConv3d(8, 8, 3, indice_key="lvl0")
    b = SubMConv3d(8, 8, 3, indice_key="lvl0")
    dw = DepthwiseSubMConv3d(8, 3, indice_key="lvl0")
    y = dw(b(a(x)))
    assert len(built) == 1 and y.cache is x.cache and "lvl0" in x.cache["maps"]
    SubMConv3d(8, 8, 3)(x)  # no key: built, not stored
    assert len(built) == 2 and list(x.cache["maps"]) == ["lvl0"]
    with pytest.raises(ValueError, match="lvl0"):
        SubMConv3d(8, 8, 5, indice_key="lvl0")(x)  # same key, other kernel
    coarse = SparseConv3d(8, 8, 2, stride=2, indice_key="down")(x)
    with pytest.raises(ValueError, match="other sites"):
        SubMConv3d(8, 8, 3, indice_key="lvl0")(coarse)  # key of another level


def test_bad_arguments_and_inputs():
    x = random_voxels(100, 8, 4, seed=9)
    with pytest.raises(ValueError, match="odd"):
        SubMConv3d(4, 4, 2)
    with pytest.raises(ValueError, match="stride 1"):
        SubMConv3d(4, 4, 3, stride=2)
    with pytest.raises(ValueError, match="expects 5 channels, got 4"):
        SubMConv3d(5, 4, 3)(x)
    with pytest.raises(ValueError, match="no strided conv map under indice_key 'nope'"):
        SparseInverseConv3d(4, 4, 2, indice_key="nope")(x)
    with pytest.raises(ValueError, match="kernel_size"):
        SparseConv3d(4, 4, (2, 2))
    with pytest.raises(ValueError, match="too small"):
        SparseConv3d(4, 4, 11, stride=2)(x)


def test_empty_input_and_metadata():
    empty = SparseVoxels(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.int32), (8, 8, 8), 1)
    assert SubMConv3d(4, 3, 3)(empty).features.shape == (0, 3)
    assert DepthwiseSubMConv3d(4, 3)(empty).features.shape == (0, 4)
    assert SparseConv3d(4, 3, 2, stride=2)(empty).features.shape == (0, 3)
    # the output grid's metric frame: stride times the voxel, shifted by the padding
    x = random_voxels(200, 8, 4, seed=10)
    x.voxel_size, x.origin = (0.1, 0.2, 0.4), (1.0, 2.0, 3.0)
    down = SparseConv3d(4, 4, 3, stride=(1, 2, 2), padding=1, indice_key="k")
    y = down(x)
    assert y.voxel_size == pytest.approx((0.2, 0.4, 0.4)) and y.origin == pytest.approx((0.9, 1.8, 2.6))
    back = SparseInverseConv3d(4, 4, 3, indice_key="k")(y)
    assert back.voxel_size == x.voxel_size and back.origin == x.origin
