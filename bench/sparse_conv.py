"""Time our torch sparse convs against spconv 2.3.8 on CPU.

SubMConv3d 32 -> 32 (3x3x3) on surface-like voxel sets (what a LiDAR sweep looks like
after voxelisation: ~8 active neighbours per site, not uniform noise), 20k and 100k
voxels, one torch thread: the only setting in which spconv's CPU conv is correct.
Prints map-build and forward times and the ratio ours / spconv, both measured here.

``--facts`` re-measures the spconv defects that ``pointcloud.sparse.spconv_compat``
works around (wrong results with several threads, CPU backward, eval + bias, groups).

    python bench/sparse_conv.py [--repeat 5] [--facts]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from pointcloud.sparse.conv import SubMConv3d, apply_kernel_map, submanifold_map
from pointcloud.structure import SparseVoxels


def surface_voxels(n: int, seed: int = 0) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``(n, 4)`` int32 sites ``(0, z, y, x)`` on random sphere shells and planes."""
    rng = np.random.default_rng(seed)
    side = int(math.ceil((n / 2.5) ** 0.5)) + 8  # a shell set of n voxels fits in side^3
    found: set[int] = set()
    keys = np.empty(0, dtype=np.int64)
    while len(keys) < n:
        if rng.random() < 0.5:  # sphere shell
            c = rng.uniform(0.2, 0.8, 3) * side
            r = rng.uniform(0.1, 0.3) * side
            v = rng.normal(size=(20000, 3))
            p = c + r * v / np.linalg.norm(v, axis=1, keepdims=True)
        else:  # tilted plane patch
            o = rng.uniform(0, 1, 3) * side
            a, b = rng.normal(size=(2, 3))
            uv = rng.uniform(-0.3, 0.3, (20000, 2)) * side
            p = o + uv[:, :1] * a / np.linalg.norm(a) + uv[:, 1:] * b / np.linalg.norm(b)
        g = np.floor(p).astype(np.int64)
        g = g[((g >= 0) & (g < side)).all(1)]
        k = (g[:, 0] * side + g[:, 1]) * side + g[:, 2]
        found.update(k.tolist())
        keys = np.fromiter(found, dtype=np.int64)
    keys = np.sort(rng.permutation(keys)[:n])  # sorted like voxelize's output
    zyx = np.stack([keys // (side * side), (keys // side) % side, keys % side], 1)
    idx = np.concatenate([np.zeros((n, 1), np.int64), zyx], 1)
    return torch.from_numpy(idx).int(), (side, side, side)


def best(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(n: int, channels: int, repeat: int) -> None:
    import spconv.pytorch as spconv

    indices, shape = surface_voxels(n)
    feats = torch.randn(n, channels)
    ours = SubMConv3d(channels, channels, 3, bias=False)
    theirs = spconv.SubMConv3d(channels, channels, 3, bias=False).eval()
    theirs.weight.data.copy_(ours.weight.data)
    x = SparseVoxels(feats, indices, shape, 1)
    kmap = submanifold_map(x.indices, shape, (3, 3, 3))
    pairs = kmap.in_idx.numel() + n

    def ours_full():
        ours(SparseVoxels(feats, indices, shape, 1))

    def theirs_full():
        theirs(spconv.SparseConvTensor(feats, indices, list(shape), 1))

    # a layer that reuses its level's map (indice_key): how most convs in a net run
    keyed = spconv.SubMConv3d(channels, channels, 3, bias=False, indice_key="bench").eval()
    keyed.weight.data.copy_(ours.weight.data)
    with torch.no_grad():
        warm = keyed(spconv.SparseConvTensor(feats, indices, list(shape), 1))
        t_map = best(lambda: submanifold_map(indices, shape, (3, 3, 3)), repeat)
        t_ours_fwd = best(lambda: apply_kernel_map(feats, ours.weight, kmap), repeat)
        t_ours = best(ours_full, repeat)
        t_sp = best(theirs_full, repeat)
        t_sp_fwd = best(lambda: keyed(warm), repeat)
        a = apply_kernel_map(feats, ours.weight, kmap)
        b = theirs(spconv.SparseConvTensor(feats, indices, list(shape), 1)).features
    print(
        f"n={n:>6} grid={shape[0]}^3 neighbours/site={pairs / n:.1f}  max |ours - spconv| {float((a - b).abs().max()):.1e}\n"
        f"    map + conv:  ours {t_ours * 1e3:7.1f} ms (map {t_map * 1e3:.1f})  spconv {t_sp * 1e3:7.1f} ms"
        f"   ratio ours/spconv {t_ours / t_sp:5.2f}\n"
        f"    map reused:  ours {t_ours_fwd * 1e3:7.1f} ms              spconv {t_sp_fwd * 1e3:7.1f} ms"
        f"   ratio ours/spconv {t_ours_fwd / t_sp_fwd:5.2f}"
    )


def facts(runs: int) -> None:
    import spconv.pytorch as spconv

    def dense_check(threads: int, subm: bool, n: int, side: int, c: int) -> tuple[int, float]:
        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        lin = torch.randperm(side**3, generator=g)[:n]
        idx = torch.stack([torch.zeros_like(lin), lin // side**2, (lin // side) % side, lin % side], 1).int()
        f = torch.randn(n, c, generator=g)
        conv = (spconv.SubMConv3d(c, c, 3, bias=False) if subm
                else spconv.SparseConv3d(c, c, 3, stride=2, padding=1, bias=False))
        dense = SparseVoxels(f, idx, (side,) * 3, 1).dense()
        ref = F.conv3d(dense, conv.weight.detach().permute(0, 4, 1, 2, 3), stride=1 if subm else 2, padding=1)
        i = idx.long()
        wrong, worst = 0, 0.0
        with torch.no_grad():
            for _ in range(runs):
                out = conv(spconv.SparseConvTensor(f, idx, [side] * 3, 1))
                err = float(((out.features - ref[0, :, i[:, 1], i[:, 2], i[:, 3]].T) if subm else (out.dense() - ref)).abs().max())
                wrong += err > 1e-3
                worst = max(worst, err)
        return wrong, worst

    threads = torch.get_num_threads()
    for subm, n, side, c in [(True, 20000, 64, 32), (False, 4000, 32, 16), (False, 20000, 64, 32)]:
        for t in sorted({1, 2, threads}):
            wrong, worst = dense_check(t, subm, n, side, c)
            name = "SubMConv3d k3" if subm else "SparseConv3d k3 s2 p1"
            print(f"{name} n={n} C={c} threads={t}: {wrong}/{runs} runs wrong vs dense conv3d, max error {worst:.3g}")
    torch.set_num_threads(threads)
    f = torch.randn(50, 4)
    idx = torch.stack([torch.zeros(50, dtype=torch.long), *torch.randint(0, 8, (3, 50))], 1).unique(dim=0).int()
    f = f[: len(idx)]
    for label, make, call in [
        ("eval with bias", lambda: spconv.SubMConv3d(4, 4, 3, bias=True).eval(), lambda m, t: m(t)),
        ("backward", lambda: spconv.SubMConv3d(4, 4, 3, bias=False),
         lambda m, t: m(t).features.sum().backward()),
        ("groups=4", lambda: spconv.SubMConv3d(4, 4, 3, groups=4), lambda m, t: m(t)),
    ]:
        try:
            call(make(), spconv.SparseConvTensor(f.clone().requires_grad_(), idx, [8, 8, 8], 1))
            print(f"{label}: works")
        except AssertionError as err:
            print(f"{label}: AssertionError: {err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--facts", action="store_true", help="re-measure spconv's CPU defects")
    parser.add_argument("--runs", type=int, default=20, help="runs per setting for --facts")
    args = parser.parse_args()
    if args.facts:
        facts(args.runs)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, SubMConv3d 32->32 k3, forward without grad, best of {args.repeat}")
    for n in (20000, 100000):
        bench(n, 32, args.repeat)
    if threads > 1:
        # ours stays correct with more threads; spconv on CPU does not (see --facts)
        torch.set_num_threads(threads)
        for n in (20000, 100000):
            indices, shape = surface_voxels(n)
            feats = torch.randn(n, 32)
            conv = SubMConv3d(32, 32, 3, bias=False)
            kmap = submanifold_map(indices, shape, (3, 3, 3))
            with torch.no_grad():
                full = best(lambda: conv(SparseVoxels(feats, indices, shape, 1)), args.repeat)
                reused = best(lambda: apply_kernel_map(feats, conv.weight, kmap), args.repeat)
            print(f"ours with {threads} threads, n={n:>6}: map + conv {full * 1e3:7.1f} ms, map reused {reused * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
