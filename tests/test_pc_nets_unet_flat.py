"""Point nets sparse_unet and flatformer, FlatFormer's window sort / equal-size grouping, the registry.

Nets run at tiny widths on a few thousand points with one torch thread (two threads on a
shared 2-core machine oversubscribe and make these small ops ~10x slower).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from medvit.core.errors import ConfigError
from pointcloud.nets import POINT_NETS
from pointcloud.nets.flatformer import FlatBlock, GroupAttention, sincos_position_encoding
from pointcloud.nets.serialize import (
    FLAT_ORDERS,
    equal_size_groups,
    flat_grouping,
    flat_padding_stats,
    window_ids,
    window_order,
    window_padding_stats,
)
from pointcloud.sparse import voxelize
from pointcloud.structure import Point, SparseVoxels

DATA = Path(os.environ.get("MEDVIT_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

TINY = {
    "sparse_unet": {"channels": [8, 16, 16], "layers": [1, 1, 1], "point_mlp": 8},
    "flatformer": {"channels": [8, 16, 16], "layers": [1, 0, 0], "flat_blocks": [0, 1, 1],
                   "window_shape": [6, 6], "group_size": 32, "heads": 2, "point_mlp": 8},
}
NETS = sorted(TINY)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def scene(n_ground: int = 900, n_obj: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 6 x 6 m noisy ground plane (label 0) with six boxes standing on it (label 1)."""
    g = torch.Generator().manual_seed(seed)
    ground = torch.rand(n_ground, 3, generator=g) * torch.tensor([6.0, 6.0, 0.0])
    ground[:, 2] = 0.05 * torch.randn(n_ground, generator=g)
    centres = torch.rand(6, 2, generator=g) * 5 + 0.5
    which = torch.randint(0, 6, (n_obj,), generator=g)
    obj = torch.cat([centres[which] + (torch.rand(n_obj, 2, generator=g) - 0.5) * 0.6,
                     0.4 + torch.rand(n_obj, 1, generator=g) * 1.2], 1)
    xyz = torch.cat([ground, obj])
    return xyz, (xyz[:, 2] > 0.25).long()


def two_clouds(seed: int = 0) -> Point:
    """Two clouds (2,400 and 1,600 points) with 4 features each, rows in random order."""
    g = torch.Generator().manual_seed(seed)
    coords, feats = [], []
    for n in (2400, 1600):
        xyz, _ = scene(n // 2, n - n // 2, seed=seed + n)
        xyz = xyz[torch.randperm(n, generator=g)]
        coords.append(xyz)
        feats.append(torch.cat([xyz, torch.rand(n, 1, generator=g)], 1))
    return Point.from_clouds(coords, feats)


def tiny(name: str, in_channels: int = 4, out_channels: int = 3, voxel_size: float = 0.15) -> torch.nn.Module:
    torch.manual_seed(0)
    return POINT_NETS.build(name, in_channels=in_channels, out_channels=out_channels, voxel_size=voxel_size,
                            options=TINY[name])


# --- nets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NETS)
def test_output_shape_order(name):
    # (speed is bench lidar's to measure: a wall-clock bound here fails on a busy machine)
    point = two_clouds()
    net = tiny(name)
    net(point)  # first call pays for lazy initialisation
    out = net(point)
    assert out.shape == (point.num_points, 3) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())
    # input order: the logits of the second cloud do not depend on the first one's points
    net.eval()
    with torch.no_grad():
        both = net(point)
        second = net(Point.from_clouds([point.coord[2400:]], [point.feat[2400:]]))
    torch.testing.assert_close(both[2400:], second, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NETS)
def test_permutation_equivariance(name):
    point = two_clouds(seed=1)
    net = tiny(name).eval()
    g = torch.Generator().manual_seed(3)
    perm = torch.cat([torch.randperm(2400, generator=g), 2400 + torch.randperm(1600, generator=g)])
    permuted = Point(coord=point.coord[perm], feat=point.feat[perm], offset=point.offset)
    with torch.no_grad():
        out, out_perm = net(point), net(permuted)
    torch.testing.assert_close(out_perm, out[perm], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NETS)
def test_every_parameter_gets_a_gradient(name):
    point = two_clouds(seed=2)
    net = tiny(name)
    labels = (point.coord[:, 2] > 0.25).long()
    torch.nn.functional.cross_entropy(net(point), labels).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", NETS)
def test_nonfinite_points_do_not_crash(name):
    point = two_clouds(seed=4)
    coord = point.coord.clone()
    coord[5] = float("nan")
    coord[3000, 0] = float("inf")
    net = tiny(name).eval()
    with torch.no_grad():
        out = net(Point(coord=coord, feat=point.feat, offset=point.offset))
    assert out.shape == (point.num_points, 3) and bool(torch.isfinite(out).all())


def test_grid_is_grown_so_strided_convs_keep_every_voxel():
    # 5 voxels along x: a k2 s2 conv on a 5-wide grid has no output for x = 4
    xyz = torch.tensor([[i * 0.1 + 0.05, 0.05, 0.05] for i in range(5)])
    net = POINT_NETS.build("sparse_unet", in_channels=3, out_channels=2, voxel_size=0.1,
                           options={"channels": [4, 4, 4], "point_mlp": 0}).eval()
    seen = []
    net.downs[0].register_forward_hook(lambda m, i, o: seen.append(o.indices[:, 3].tolist()))
    with torch.no_grad():
        net(Point.from_clouds([xyz]))
    assert sorted(seen[0]) == [0, 1, 2]


def test_flatformer_overfits_ground_vs_above():
    # constant features: the class must come from geometry (convs, attention over the grid)
    xyz, labels = scene()
    point = Point.from_clouds([xyz], [torch.ones(len(xyz), 1)])
    torch.manual_seed(0)
    net = POINT_NETS.build("flatformer", in_channels=1, out_channels=2, voxel_size=0.2, options=TINY["flatformer"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    acc = 0.0
    for step in range(150):
        loss = torch.nn.functional.cross_entropy(net(point), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            net.eval()
            with torch.no_grad():
                acc = (net(point).argmax(1) == labels).float().mean().item()
            net.train()
            if acc > 0.95:
                break
    assert acc > 0.9, f"accuracy {acc:.3f} after {step + 1} steps"


# --- FlatFormer pieces ------------------------------------------------------------------------


def random_sites(n: int, shape: tuple[int, int, int], batch: int = 2, seed: int = 0) -> SparseVoxels:
    g = torch.Generator().manual_seed(seed)
    nz, ny, nx = shape
    rows = []
    for b in range(batch):
        lin = torch.randperm(nz * ny * nx, generator=g)[: n - 37 * b]  # clouds of different sizes
        rows.append(torch.stack([torch.full_like(lin, b), lin // (ny * nx), (lin // nx) % ny, lin % nx], 1))
    idx = torch.cat(rows)
    return SparseVoxels(torch.randn(len(idx), 8, generator=g), idx, shape, batch)


@pytest.mark.parametrize("window", [(6, 6), (5, 4, 3)])
def test_orders_are_permutations_and_groups_equal_sized_and_real(window):
    x = random_sites(500, (7, 20, 23))
    g = 48
    batch = x.indices[:, 0].long()
    for major, shift in FLAT_ORDERS:
        grp = flat_grouping(x, window, g, major, shift)
        assert torch.equal(torch.sort(grp.perm).values, torch.arange(x.num_sites))
        assert grp.gather.shape[0] % g == 0
        groups = grp.gather.view(-1, g)
        counts = torch.bincount(batch)
        assert groups.shape[0] == sum(math.ceil(int(c) / g) for c in counts)
        # every slot is a real voxel of one cloud, and each voxel reads back its own slot
        assert bool((grp.gather >= 0).all()) and bool((grp.gather < x.num_sites).all())
        assert bool((batch[groups] == batch[groups[:, :1]]).all())
        assert torch.equal(grp.gather[grp.scatter], torch.arange(x.num_sites))
        # sorted order: batch first, then windows, each window one contiguous run
        _, wkey = window_order(x.indices, x.spatial_shape, window, major, shift)
        win, _, _ = window_ids(x.indices, x.spatial_shape, window, shift)
        seq = wkey[grp.perm]
        assert bool((batch[grp.perm][1:] >= batch[grp.perm][:-1]).all())
        starts = torch.cat([torch.tensor([True]), seq[1:] != seq[:-1]])
        windows = torch.unique(torch.cat([batch[:, None], win], 1), dim=0)
        assert int(starts.sum()) == len(torch.unique(seq)) == len(windows)
    # the four orders differ from each other
    perms = {tuple(flat_grouping(x, window, g, m, s).perm.tolist()) for m, s in FLAT_ORDERS}
    assert len(perms) == 4


def test_padding_copies_the_previous_group():
    source, real_pos = equal_size_groups(torch.tensor([0] * 10 + [1] * 3), 4)
    # cloud 0: 10 -> 3 groups of 4, slots 10, 11 copy 6, 7; cloud 1: 3 -> one group, repeats itself
    assert source.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 6, 7, 10, 11, 12, 10]
    assert real_pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14]


def full_grid(ny: int, nx: int) -> torch.Tensor:
    """``(ny * nx, 4)`` sites of a full one-slice grid, ``(batch, z, y, x)``."""
    y, x = torch.meshgrid(torch.arange(ny), torch.arange(nx), indexing="ij")
    zeros = torch.zeros(ny * nx, dtype=torch.long)
    return torch.stack([zeros, zeros, y.reshape(-1), x.reshape(-1)], 1)


@pytest.mark.parametrize("major", ["x", "y"])
def test_snake_order_visits_windows_in_zigzag(major):
    idx = full_grid(6, 6)  # 2 x 2 windows: 3 x 3 windows of 4 voxels
    perm, _ = window_order(idx, (1, 6, 6), (2, 2), major)
    win, _, _ = window_ids(idx, (1, 6, 6), (2, 2))
    visited = win[perm][::4]  # four voxels per window, contiguous
    slow, fast = (0, 1) if major == "x" else (1, 0)
    zigzag = [(a, b) for a in range(3) for b in (range(3) if a % 2 == 0 else range(2, -1, -1))]
    assert [(int(w[slow]), int(w[fast])) for w in visited] == zigzag
    # inside each window the voxels follow a snake too: consecutive ones are face neighbours
    xy = idx[perm][:, [3, 2]]
    same_window = (win[perm][1:] == win[perm][:-1]).all(1)
    steps = (xy[1:] - xy[:-1]).abs().sum(1)
    assert bool((steps[same_window] == 1).all())
    # shifted by half a window: 4 x 4 windows (partial at the borders), still a zigzag of neighbours
    perm, wkey = window_order(idx, (1, 6, 6), (2, 2), major, shift=True)
    win, _, _ = window_ids(idx, (1, 6, 6), (2, 2), shift=True)
    seq = win[perm]
    windows = seq[torch.cat([torch.tensor([True]), (seq[1:] != seq[:-1]).any(1)])]
    assert len(windows) == 16 and bool(((windows[1:] - windows[:-1]).abs().sum(1) == 1).all())
    assert int(windows[:, fast].diff().ne(0).sum()) == 12  # 4 rows of 4 windows walked along the fast axis


def test_window_order_is_translation_invariant_on_the_window_lattice():
    # a cloud's order depends on its world indices only, not on the grid's origin
    idx = random_sites(150, (3, 12, 12), batch=1, seed=7).indices
    perm, _ = window_order(idx, (3, 12, 12), (4, 4), "y", True)
    moved = idx.clone()
    moved[:, 2:] += 5  # the grid starts 5 voxels earlier along y and x ...
    perm2, _ = window_order(moved, (3, 17, 17), (4, 4), "y", True, offset=(-5, -5, 0))  # ... same world sites
    assert torch.equal(perm, perm2)


def test_group_attention_matches_naive_softmax():
    torch.manual_seed(0)
    x = random_sites(300, (4, 16, 16), seed=5)
    c, heads, g = 8, 2, 20
    attn = GroupAttention(c, heads).eval()
    grp = flat_grouping(x, (5, 5), g, "y", True)
    pe = sincos_position_encoding(x.indices[:, 1:].flip(1), c)
    feats, d = x.features, c // heads
    with torch.no_grad():
        out = attn(feats, pe, grp)
        slots = []
        for rows in grp.gather.view(-1, g).tolist():  # one group at a time, softmax written out
            xs, ps = feats[rows], pe[rows]
            q, k, v = attn.q(xs + ps), attn.k(xs + ps), attn.v(xs)  # position enters q and k only
            heads_out = []
            for h in range(heads):
                cols = slice(h * d, (h + 1) * d)
                w = torch.exp(q[:, cols] @ k[:, cols].T / math.sqrt(d))
                heads_out.append((w / w.sum(1, keepdim=True)) @ v[:, cols])
            slots.append(attn.proj(torch.cat(heads_out, 1)))
        ref = torch.cat(slots)[grp.scatter]  # each voxel's output from its real slot
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flat_block_caches_orders_and_encoding_per_level():
    x = random_sites(200, (4, 12, 12), seed=6)
    block = FlatBlock(8, 2, (4, 4), 16, cache_key="level1")
    y = block(x)
    assert y.features.shape == x.features.shape and y.indices is x.indices
    cached = x.cache["flat"]
    assert len(cached) == 4 and all(key[0] == "level1" for key in cached)
    first = block.groupings(x)
    assert all(a is b for a, b in zip(first, block.groupings(x)))  # not recomputed
    assert block.position_encoding(x) is block.position_encoding(x)


def test_sincos_encoding_values():
    pe = sincos_position_encoding(torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]), 12)
    assert pe.shape == (2, 12)
    # 2 frequencies per axis (1 and 1/100): x block is [sin(x), sin(x/100), cos(x), cos(x/100)]
    torch.testing.assert_close(pe[1, :4], torch.tensor([math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]))
    torch.testing.assert_close(pe[0], torch.tensor([0.0, 0, 1, 1] * 3))


# --- equal-size groups vs per-window padding on real scans ------------------------------------

# measured on the demo scans: voxel 0.1 m, world-aligned 12 x 12 pillar windows, group size 64;
# "levels": SST-style caps (30, 60, 100, 200) per window, voxels above the last cap dropped
MEASURED = {
    "kitti/000008.bin": {"voxels": 9884, "windows": 415, "window_max": 97110, "levels": 19050, "dropped": 77},
    "nuscenes": {"voxels": 17885, "windows": 1874, "window_max": 417902, "levels": 62910, "dropped": 23},
}


@pytest.mark.parametrize("scan", sorted(MEASURED))
def test_padding_overhead_on_real_scans(scan):
    from pointcloud.io import read_points

    base = DATA / "mmdet3d" / "demo" / "data"
    paths = [base / scan] if scan.endswith(".bin") else sorted((base / scan).glob("*.pcd.bin"))
    if not paths or not paths[0].exists():
        pytest.skip(f"{scan} not under {base}")
    cloud = read_points(paths[0])
    point = Point.from_clouds([torch.from_numpy(cloud.xyz).float()], [torch.from_numpy(cloud.features)])
    voxels, _ = voxelize(point, 0.1)
    want = MEASURED[scan]
    g = 64
    flat = flat_padding_stats(voxels, (12, 12), g)
    assert flat.real == want["voxels"] == voxels.num_sites
    assert flat.groups == math.ceil(want["voxels"] / g)
    assert 0 <= flat.overhead * flat.real < g  # less than one group of padding
    full = window_padding_stats(voxels, (12, 12))
    assert full.groups == want["windows"] and full.padded == want["window_max"]
    assert full.overhead == pytest.approx(want["window_max"] / want["voxels"] - 1, rel=1e-6)
    assert full.overhead > 5  # pad-to-largest-window costs 6-19x the real tokens
    sst = window_padding_stats(voxels, (12, 12), levels=(30, 60, 100, 200))
    assert sst.padded == want["levels"] and sst.dropped == want["dropped"]
    assert sst.overhead == pytest.approx(want["levels"] / (want["voxels"] - want["dropped"]) - 1, rel=1e-6)
    assert flat.overhead < 0.01 < sst.overhead


# --- registry ---------------------------------------------------------------------------------


def test_registry_lists_and_builds():
    assert {"sparse_unet", "flatformer"} <= set(POINT_NETS.names())
    net = POINT_NETS.build("flatformer", in_channels=4, out_channels=5, voxel_size=[0.1, 0.1, 0.2],
                           options={"channels": [8, 16], "heads": [1, 2], "flat_blocks": [0, 2]})
    assert net.head.out_features == 5 and net.voxel_size == (0.1, 0.1, 0.2)


@pytest.mark.parametrize("name,options,message", [
    ("pointnet9", {}, "model.name: unknown point-cloud net 'pointnet9'; available: "),
    ("sparse_unet", {"chanels": [8]}, "model.options.chanels: sparse_unet (SparseUNet) takes no option 'chanels'"),
    ("flatformer", {"out_channels": 3}, "model.options.out_channels: flatformer sets out_channels from labels"),
    ("flatformer", {"group_size": "big"}, "model.options.group_size: expected int, got 'big'"),
    ("flatformer", {"channels": [8, 12], "heads": 5}, "model.options.heads: flatformer: heads (5) must divide"),
    ("sparse_unet", {"channels": [8, 16], "layers": [1, 1, 1]}, "model.options.layers: sparse_unet: layers must"),
])
def test_registry_errors(name, options, message):
    with pytest.raises(ConfigError) as err:
        POINT_NETS.build(name, in_channels=4, out_channels=3, voxel_size=0.1, options=options)
    assert str(err.value).startswith(message), str(err.value)
    if name == "pointnet9":
        assert "flatformer" in str(err.value) and "sparse_unet" in str(err.value)
