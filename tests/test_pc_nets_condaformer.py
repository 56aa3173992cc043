"""ConDaFormer: the net's contract, the disassembled window attention against an explicit
per-window reference, the window shift, the depthwise LSE's cost, and a tiny overfit."""

from __future__ import annotations

import math

import pytest
import torch

from medvit.core.errors import ConfigError
from pointcloud.nets import POINT_NETS
from pointcloud.nets.condaformer import (
    PLANES,
    ConDaFormer,
    ConDaFormerBlock,
    DisassembledWindowAttention,
    LocalStructureEnhancement,
    disassembled_windows,
    plane_extent,
    plane_windows,
)
from pointcloud.sparse import DepthwiseSubMConv3d
from pointcloud.structure import Point, SparseVoxels
from tests.helpers import random_sites

TINY = dict(channels=(8, 24, 48), depths=(0, 2, 1), head_dim=8, window_size=4, mlp_ratio=2.0, point_mlp=8)
THIN = {"xy": 2, "xz": 1, "yz": 0}


@pytest.fixture(autouse=True)
def one_thread():
    """These sizes gain nothing from threads, and on a shared 2-core machine two OpenMP
    threads made every forward 10-50x slower (measured); restore the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scene(n: int = 2400, seed: int = 0) -> tuple[Point, torch.Tensor]:
    """Two clouds in a 2 x 2 x 1 m slab with xyz + one intensity feature; ``(N, 3)`` coordinates."""
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(n, 3, generator=g) * torch.tensor([2.0, 2.0, 1.0])
    feats = torch.cat([pts, torch.rand(n, 1, generator=g)], 1)
    half = n // 2
    return Point.from_clouds([pts[:half], pts[half:]], [feats[:half], feats[half:]]), pts


def test_output_shape_and_input_order():
    torch.manual_seed(0)
    point, pts = scene()
    net = POINT_NETS.build("condaformer", in_channels=4, out_channels=5, voxel_size=0.1, options=TINY)
    assert isinstance(net, ConDaFormer)
    net.eval()
    with torch.no_grad():
        out = net(point)
    assert out.shape == (point.num_points, 5) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # without per-point inputs, row i is the logits of point i's voxel: equal within a voxel,
    # different across voxels
    voxel_only = ConDaFormer(4, 5, 0.1, **{**TINY, "point_mlp": 0}, point_offsets=False).eval()
    with torch.no_grad():
        out = voxel_only(point)
    cell = torch.floor(pts / 0.1).long()
    key = (point.batch * 1000 + cell[:, 2]) * 1000000 + cell[:, 1] * 1000 + cell[:, 0]
    _, vox = torch.unique(key, return_inverse=True)
    first = torch.full((int(vox.max()) + 1,), -1, dtype=torch.long)
    first[vox.flip(0)] = torch.arange(len(vox) - 1, -1, -1)  # first point of each voxel
    assert (first[vox] != torch.arange(len(vox))).any()  # some voxels hold several points
    torch.testing.assert_close(out, out[first[vox]])
    assert torch.unique(out, dim=0).shape[0] == int(vox.max()) + 1


def test_permutation_equivariance_within_clouds():
    torch.manual_seed(1)
    point, _ = scene(seed=3)
    net = ConDaFormer(4, 3, 0.1, **TINY).eval()
    half = point.num_points // 2
    perm = torch.cat([torch.randperm(half), half + torch.randperm(point.num_points - half)])
    permuted = Point(coord=point.coord[perm], feat=point.feat[perm], offset=point.offset)
    with torch.no_grad():
        torch.testing.assert_close(net(permuted), net(point)[perm], rtol=1e-4, atol=1e-5)


def test_a_clouds_logits_do_not_depend_on_the_other_clouds_in_its_call():
    """The scene engine packs small tiles into one call: each must come out as if run alone."""
    torch.manual_seed(2)
    point, _ = scene(seed=5)
    net = ConDaFormer(4, 3, 0.1, **TINY).eval()
    half = point.num_points // 2
    with torch.no_grad():
        both = net(point)
        second = net(Point.from_clouds([point.coord[half:]], [point.feat[half:]]))
    torch.testing.assert_close(both[half:], second, rtol=1e-4, atol=1e-5)


def test_non_finite_points_get_rows():
    point, _ = scene(600)
    coord = point.coord.clone()
    coord[5] = float("nan")
    net = ConDaFormer(4, 3, 0.1, **TINY).eval()
    with torch.no_grad():
        out = net(Point(coord=coord, feat=point.feat, offset=point.offset))
    assert out.shape == (600, 3) and torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    torch.manual_seed(2)
    point, pts = scene(1600)
    net = ConDaFormer(4, 3, 0.1, **TINY).train()
    loss = torch.nn.functional.cross_entropy(net(point), (pts[:, 2] * 3).long().clamp_max(2))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reaches {missing}"
    # the attention parts exist and are among them
    names = [n for n, _ in net.named_parameters()]
    assert any("table_v" in n for n in names) and any("lse_post.dwconv" in n for n in names)


def naive_dawin(q, k, v, indices, attn: DisassembledWindowAttention, shift: bool) -> torch.Tensor:
    """Per voxel, per plane group: explicit softmax over the voxels of the same cloud in the
    same plane window, with the contextual RPE looked up term by term."""
    m, heads, d = q.shape
    hg = heads // 3
    xyz = indices[:, [3, 2, 1]].long()
    batch = indices[:, 0].long()
    out = torch.zeros_like(q)
    reach = attn.reach
    for g, plane in enumerate(PLANES):
        ext = [attn.window_size] * 3
        ext[THIN[plane]] = attn.thickness
        off = torch.tensor([e // 2 if shift else 0 for e in ext])
        win = torch.div(xyz + off, torch.tensor(ext), rounding_mode="floor")
        for i in range(m):
            members = ((batch == batch[i]) & (win == win[i]).all(1)).nonzero().squeeze(1)
            r = xyz[i] - xyz[members]  # (J, 3) offsets query - key inside the window
            assert (r.abs() < torch.tensor(ext)).all()
            if attn.thickness == 1:  # a plane window is one voxel thin across the plane
                assert (r[:, THIN[plane]] == 0).all()
            for h in range(hg):
                head = g * hg + h
                rq = sum(attn.table_q[a, r[:, a] + reach, h] for a in range(3))  # (J, d)
                rk = sum(attn.table_k[a, r[:, a] + reach, h] for a in range(3))
                rv = sum(attn.table_v[a, r[:, a] + reach, h] for a in range(3))
                km = k[members, head]
                logits = (km @ q[i, head] + rq @ q[i, head]) / math.sqrt(d) + (km * rk).sum(1)
                p = torch.softmax(logits, 0)
                out[i, head] = p @ (v[members, head] + rv)
    return out


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("window_size,thickness", [(3, 1), (4, 2)])
def test_attention_matches_naive_reference(shift, window_size, thickness):
    torch.manual_seed(3)
    indices = random_sites(70, 7, batch=2, seed=4).int()
    heads, d = 6, 4
    attn = DisassembledWindowAttention(heads, d, window_size, thickness).double()
    with torch.no_grad():  # tables large enough that a wrong lookup shows
        for t in (attn.table_q, attn.table_k, attn.table_v):
            t.normal_(0, 0.7)
    q, k, v = (torch.randn(len(indices), heads, d, dtype=torch.float64) for _ in range(3))
    windows = disassembled_windows(indices, window_size, thickness, shift)
    assert max(w.max_size for w in windows) <= window_size**2 * thickness
    if window_size == 4:  # windows of up to 32 voxels: more than one size group, each checked
        assert any(len(w.groups) > 1 for w in windows)
    out = attn(q, k, v, windows)
    torch.testing.assert_close(out, naive_dawin(q, k, v, indices, attn, shift), rtol=1e-9, atol=1e-9)
    # without RPE it is plain per-window softmax attention: the reference with zero tables
    plain = DisassembledWindowAttention(heads, d, window_size, thickness, rpe=False).double()
    zero = DisassembledWindowAttention(heads, d, window_size, thickness).double()
    with torch.no_grad():
        for t in (zero.table_q, zero.table_k, zero.table_v):
            t.zero_()
    torch.testing.assert_close(plain(q, k, v, windows), naive_dawin(q, k, v, indices, zero, shift))


def test_plane_windows_are_planes():
    indices = random_sites(200, 9, batch=2, seed=5).int()
    xyz = indices[:, [3, 2, 1]].long()
    for w in disassembled_windows(indices, 4, 1, shift=True):
        filled = torch.cat([g.index[g.valid] for g in w.groups])
        assert torch.equal(filled.sort().values, torch.arange(len(indices)))  # every voxel in one slot
        for g in w.groups:
            for row in range(g.index.shape[0]):
                members = g.index[row][g.valid[row]]
                span = xyz[members].amax(0) - xyz[members].amin(0)
                assert span[THIN[w.plane]] == 0 and (span < 4).all()
                assert indices[members, 0].unique().numel() == 1  # one cloud per window
                assert torch.equal(w.window[members], w.window[members[:1]].expand(len(members)))
            # the scatter back uses (sites, slots): exactly the filled slots, each with its voxel
            assert torch.equal(g.slots.sort().values, g.valid.reshape(-1).nonzero().squeeze(1))
            assert torch.equal(g.index.reshape(-1)[g.slots], g.sites)


def test_windows_are_padded_per_size_group_not_to_the_largest():
    """One dense window among sparse ones: the sparse ones are not padded to its size."""
    dense = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).reshape(-1, 2)
    sites = [torch.tensor([0, 0, int(y), int(x)]) for y, x in dense]  # one full 8x8 xy window at z=0
    sites += [torch.tensor([0, 0, 8 * i + 1, 8 * j + 1]) for i in range(1, 6) for j in range(6)]  # 30 lone voxels
    indices = torch.stack(sites).int()
    w = plane_windows(indices, "xy", 8, 1)
    assert w.num_windows == 31 and w.max_size == 64
    assert [g.index.shape for g in w.groups] == [(30, 1), (1, 64)]  # smallest group first, each at its own size
    assert w.padded_slots == 30 + 64  # against 31 * 64 padded to the largest


def _groups(window: torch.Tensor, coords: list[int]) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for c, w in zip(coords, window.tolist()):
        out.setdefault(w, []).append(c)
    return sorted(out.values())


@pytest.mark.parametrize("plane", PLANES)
def test_shift_moves_window_boundaries_by_half(plane):
    s, t = 4, 2
    ext = plane_extent(plane, s, t)
    assert ext[THIN[plane]] == t and sorted(ext) == [t, s, s]
    for axis in range(3):  # a line of 13 voxels along each axis
        line = torch.zeros(13, 4, dtype=torch.int32)
        line[:, 3 - axis] = torch.arange(13)  # (batch, z, y, x): x is column 3
        coords = list(range(13))
        e = ext[axis]
        plain = _groups(plane_windows(line, plane, s, t, shift=False).window, coords)
        moved = _groups(plane_windows(line, plane, s, t, shift=True).window, coords)
        assert plain == [coords[i:i + e] for i in range(0, 13, e)]
        # boundaries at multiples of e, then at multiples of e minus e // 2
        h = e // 2
        first = [coords[:e - h]] if h else []
        assert moved == first + [coords[i:i + e] for i in range(e - h if h else 0, 13, e)]


def test_block_alternates_shift_in_stage():
    net = ConDaFormer(4, 3, 0.1, **TINY)
    blocks = [m for m in net.modules() if isinstance(m, ConDaFormerBlock)]
    assert [b.shift for b in blocks] == [False, True, False]  # depths (0, 2, 1)
    assert [b.num_heads for b in blocks] == [3, 3, 6]


def test_lse_is_truly_depthwise():
    c, k = 48, 3
    lse = LocalStructureEnhancement(c, k)
    assert isinstance(lse.dwconv, DepthwiseSubMConv3d)
    assert sum(p.numel() for p in lse.dwconv.parameters()) == k**3 * c  # not k^3 * c^2
    net = ConDaFormer(4, 3, 0.1, **TINY)
    dws = [m for m in net.modules() if isinstance(m, DepthwiseSubMConv3d)]
    assert len(dws) == 2 * sum(TINY["depths"])  # one before, one after each attention
    assert all(sum(p.numel() for p in m.parameters()) == 27 * m.channels for m in dws)
    # each output channel sees only its own input channel: O(K^3 N C) work
    indices = random_sites(150, 6, batch=1, seed=6).int()
    x = SparseVoxels(torch.randn(len(indices), c), indices, (6, 6, 6), 1)
    base = lse.dwconv(x).features
    bumped = x.features.clone()
    bumped[:, 7] += 1.0
    diff = (lse.dwconv(x.replace_feature(bumped)).features - base).abs().sum(0)
    assert diff[7] > 0 and diff[torch.arange(c) != 7].max() == 0


def test_bad_options_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.options\.channels"):
        POINT_NETS.build("condaformer", in_channels=3, out_channels=2, voxel_size=0.1,
                         options={"channels": (8, 16, 32), "depths": (0, 1, 1)})
    with pytest.raises(ConfigError, match=r"model\.options\.window"):
        POINT_NETS.build("condaformer", in_channels=3, out_channels=2, voxel_size=0.1, options={"window": 4})
    with pytest.raises(ValueError, match="multiple of 3"):
        DisassembledWindowAttention(4, 8, 4)


def test_overfits_two_classes_by_height():
    # features carry no height (a constant); the net must find z from the geometry
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(2000, 3, generator=g) * torch.tensor([2.0, 2.0, 1.0])
    label = (pts[:, 2] > 0.5).long()
    point = Point.from_clouds([pts[:1000], pts[1000:]], [torch.ones(1000, 1), torch.ones(1000, 1)])
    torch.manual_seed(0)
    net = ConDaFormer(1, 2, 0.1, channels=(16, 24, 48), depths=(0, 1, 2), window_size=4, mlp_ratio=2.0, point_mlp=0)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    acc = 0.0
    for step in range(150):
        net.train()
        loss = torch.nn.functional.cross_entropy(net(point), label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            net.eval()
            with torch.no_grad():
                acc = float((net(point).argmax(1) == label).float().mean())
            if acc > 0.9:
                break
    assert acc > 0.9, f"accuracy {acc:.3f} after {step + 1} steps"
