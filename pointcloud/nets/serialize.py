"""Window sorting and equal-size grouping (FlatFormer), and what padding costs.

FlatFormer (Liu et al., 2023) replaces per-window attention with attention over groups of
equal size: the voxels are sorted window by window, then the sorted sequence is cut into
groups of ``group_size`` voxels. Every group then has the same shape, so attention runs as
one batched call with no masks, and the only padding is the tail of each cloud's last group.

Sorting (:func:`window_order`): a voxel's window is ``floor((g + shift) / window)`` per axis
and its place inside the window is ``(g + shift) mod window``, where ``g`` is its *world*
voxel index (grid index + :func:`grid_offset`), so windows sit on a world-aligned lattice and
a cloud's order does not depend on the other clouds in its batch. Windows are visited in
snake (boustrophedon) order over ``(major, minor, z)``: the minor axis runs backwards in odd
rows of the major axis and z where ``major + minor`` is odd, so consecutive windows touch.
Inside a window the voxels follow the same snake over the local coordinates, walked
backwards in the windows of backward rows (as in the authors' code). ``major="x"`` makes x
the slowest axis (the walk advances along y first); ``major="y"`` swaps the two. With
``shift`` each window moves by half its size, as in Swin/SST. The four orders a FlatFormer
block alternates over are :data:`FLAT_ORDERS`.

Window shapes are ``(wx, wy)`` (pillars spanning the whole height, the paper's BEV windows)
or ``(wx, wy, wz)``; always in voxels of the level they apply to.

Grouping (:func:`equal_size_groups`): per cloud of ``L`` sorted voxels, ``ceil(L / g)``
groups; the last group is filled by copying the voxels ``g`` places earlier (the previous
group's), or by repeating the cloud's voxels when it has a single partial group. Every
padded slot therefore holds a real voxel of the same cloud, and no attention mask is needed.

Padding statistics (:func:`flat_padding_stats`, :func:`window_padding_stats`) compare this
with SST-style per-window padding, where each window is padded to a common size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pointcloud.structure import SparseVoxels

__all__ = [
    "FLAT_ORDERS",
    "FlatGrouping",
    "PaddingStats",
    "equal_size_groups",
    "flat_grouping",
    "flat_padding_stats",
    "grid_offset",
    "snake_key",
    "window_ids",
    "window_order",
    "window_padding_stats",
]

#: (major axis, shifted) of the four orders a FlatFormer block cycles through
FLAT_ORDERS: tuple[tuple[str, bool], ...] = (("x", False), ("x", True), ("y", False), ("y", True))


def grid_offset(voxels: SparseVoxels) -> tuple[int, int, int]:
    """World voxel index ``(x, y, z)`` of the grid's voxel ``(0, 0, 0)``: ``origin / voxel_size``.

    ``(0, 0, 0)`` when the voxels carry no metric origin. Windows and position encodings computed
    from ``indices + grid_offset`` do not depend on where the batch's bounding box starts.
    """
    if voxels.origin is None or voxels.voxel_size is None:
        return (0, 0, 0)
    return tuple(int(round(o / v)) for o, v in zip(voxels.origin, voxels.voxel_size))  # type: ignore[return-value]


def window_ids(
    indices: torch.Tensor,
    spatial_shape: Sequence[int],
    window_shape: Sequence[int],
    shift: bool = False,
    offset: Sequence[int] = (0, 0, 0),
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """Window and in-window coordinates of each site.

    Args:
        indices: ``(M, 4)`` ``(batch, z, y, x)``.
        spatial_shape: ``(nz, ny, nx)``.
        window_shape: ``(wx, wy)`` (pillars over the whole height) or ``(wx, wy, wz)`` voxels.
        shift: move windows by half their size (x and y; z too for 3D windows).
        offset: ``(x, y, z)`` added to the indices first (:func:`grid_offset`), so windows
            sit on a world-aligned lattice.

    Returns:
        ``(win, local, window)``: ``win`` and ``local`` ``(M, 3)`` int64 ``(x, y, z)`` (``win`` may
        be negative); ``window`` ``(wx, wy, wz)``, with ``wz = nz`` for pillars.
    """
    w = tuple(int(v) for v in window_shape)
    if len(w) not in (2, 3) or min(w) < 1:
        raise ValueError(f"window_shape must be two or three positive ints (x, y[, z]), got {tuple(window_shape)}")
    g = indices[:, 1:].long().flip(1) + torch.tensor([int(o) for o in offset], device=indices.device)
    if len(w) == 2:  # pillars: one window over z, z inside it relative to the grid
        w = (*w, int(spatial_shape[0]))
        g[:, 2] = indices[:, 1].long()
        s = [v // 2 for v in w[:2]] + [0] if shift else [0, 0, 0]
    else:
        s = [v // 2 for v in w] if shift else [0, 0, 0]
    g = g + torch.tensor(s, device=g.device)
    wt = torch.tensor(w, device=g.device)
    return torch.div(g, wt, rounding_mode="floor"), torch.remainder(g, wt), w  # type: ignore[return-value]


def snake_key(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Sort key ``(M,)`` int64 of a boustrophedon walk over cells ``(a, b, c)``, ``a`` slowest.

    ``b`` runs backwards in odd rows of ``a`` and ``c`` backwards where ``a + b`` is odd, so cells
    with consecutive keys are face neighbours. Parities come from the coordinates themselves
    (not from ranks relative to a bounding box), so a cloud's order does not depend on the
    other clouds in its batch.
    """
    rb = torch.where(torch.remainder(a, 2) == 1, -b, b)
    rc = torch.where(torch.remainder(a + b, 2) == 1, -c, c)
    parts = [t - t.min() for t in (a, rb, rc)] if a.numel() else [a, rb, rc]
    nb, nc = int(parts[1].max()) + 1 if a.numel() else 1, int(parts[2].max()) + 1 if a.numel() else 1
    return (parts[0] * nb + parts[1]) * nc + parts[2]


def window_order(
    indices: torch.Tensor,
    spatial_shape: Sequence[int],
    window_shape: Sequence[int],
    major: str = "x",
    shift: bool = False,
    offset: Sequence[int] = (0, 0, 0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Window-based sort of the sites (see the module docstring); arguments as :func:`window_ids`.

    Returns:
        ``(perm, window_key)``: ``perm`` ``(M,)`` int64, the site rows in visiting order
        (batch first, then windows in snake order, then snake order inside each window);
        ``window_key`` ``(M,)`` int64, each site's window (equal keys: same window and cloud).
    """
    if major not in ("x", "y"):
        raise ValueError(f"major must be 'x' or 'y', got {major!r}")
    win, local, _ = window_ids(indices, spatial_shape, window_shape, shift, offset)
    ax = (0, 1) if major == "x" else (1, 0)  # (slowest, middle); z is always the fastest
    wkey = snake_key(win[:, ax[0]], win[:, ax[1]], win[:, 2])
    lkey = snake_key(local[:, ax[0]], local[:, ax[1]], local[:, 2])
    # windows in the snake's backward rows are walked backwards inside too (as the reference code does)
    lkey = torch.where(torch.remainder(win[:, ax[0]], 2) == 1, -lkey, lkey)
    window_key = indices[:, 0].long() * (int(wkey.max()) + 1 if wkey.numel() else 1) + wkey
    # sites are unique, so (window, place in window) is a total order: sort by the minor key,
    # then stably by the major one
    perm = torch.argsort(lkey, stable=True)
    perm = perm[torch.argsort(window_key[perm], stable=True)]
    return perm, window_key


def equal_size_groups(batch_sorted: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a sorted sequence into groups of ``group_size``, per cloud, padding by copying.

    Args:
        batch_sorted: ``(M,)`` cloud index of each position of the sorted sequence (non-decreasing).
        group_size: tokens per group ``g``.

    Returns:
        ``(source, real_pos)``: ``source`` ``(G * g,)`` int64, for each padded slot the sorted
        position it copies (a cloud's real positions in order, then its padding);
        ``real_pos`` ``(M,)`` int64, the padded slot holding sorted position ``i``.
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    device = batch_sorted.device
    m = batch_sorted.shape[0]
    if m == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    counts = torch.bincount(batch_sorted.long())
    padded = (counts + group_size - 1) // group_size * group_size
    start = torch.cumsum(counts, 0) - counts
    pstart = torch.cumsum(padded, 0) - padded
    total = int(padded.sum())
    cloud = torch.repeat_interleave(torch.arange(len(counts), device=device), padded)
    j = torch.arange(total, device=device) - pstart[cloud]  # slot within its cloud
    n = counts[cloud]
    back = j - group_size
    # padding copies the previous group's slot; a lone partial group repeats its own voxels
    local = torch.where(j < n, j, torch.where(back >= 0, back, j % n.clamp_min(1)))
    source = start[cloud] + local
    b = batch_sorted.long()
    real_pos = pstart[b] + torch.arange(m, device=device) - start[b]
    return source, real_pos


@dataclass
class FlatGrouping:
    """One order's equal-size groups over a voxel set.

    ``gather`` ``(G * g,)`` voxel rows filling the groups (``view(G, g)`` gives the groups);
    ``scatter`` ``(M,)``: voxel row ``i``'s slot in the padded sequence (its real slot);
    ``perm`` ``(M,)`` the sort order.
    """

    perm: torch.Tensor
    gather: torch.Tensor
    scatter: torch.Tensor
    group_size: int

    @property
    def num_groups(self) -> int:
        return self.gather.shape[0] // self.group_size


def flat_grouping(
    voxels: SparseVoxels,
    window_shape: Sequence[int],
    group_size: int,
    major: str = "x",
    shift: bool = False,
    cache_key: str | None = None,
) -> FlatGrouping:
    """Sort ``voxels`` by windows and cut them into equal-size groups.

    With ``cache_key`` the result is kept in ``voxels.cache["flat"]`` (shared by every tensor a
    net derives from one voxelisation), so each level computes each of its orders once; a
    cached entry built for other sites is rebuilt.
    """
    key = (cache_key, tuple(int(v) for v in window_shape), int(group_size), major, bool(shift))
    store = voxels.cache.setdefault("flat", {}) if cache_key is not None else None
    if store is not None and key in store:
        indices, grouping = store[key]
        if indices is voxels.indices or (
            indices.shape == voxels.indices.shape and bool(torch.equal(indices, voxels.indices))
        ):
            return grouping
    perm, _ = window_order(voxels.indices, voxels.spatial_shape, window_shape, major, shift, grid_offset(voxels))
    source, real_pos = equal_size_groups(voxels.indices[perm, 0], group_size)
    scatter = torch.empty_like(real_pos)
    scatter[perm] = real_pos
    grouping = FlatGrouping(perm=perm, gather=perm[source], scatter=scatter, group_size=int(group_size))
    if store is not None:
        store[key] = (voxels.indices, grouping)
    return grouping


@dataclass
class PaddingStats:
    """Tokens a grouping scheme computes on: ``padded`` slots for ``real`` voxels in ``groups`` groups.

    ``real`` counts the voxels that take part (all of them, less the ``dropped`` ones a capped
    scheme discards); ``overhead`` = padded / real - 1.
    """

    scheme: str
    groups: int
    real: int
    padded: int
    dropped: int = 0

    @property
    def overhead(self) -> float:
        return self.padded / self.real - 1.0 if self.real else 0.0


def flat_padding_stats(voxels: SparseVoxels, window_shape: Sequence[int], group_size: int,
                       major: str = "x", shift: bool = False) -> PaddingStats:
    """FlatFormer's equal-size groups: ``sum_b ceil(L_b / g)`` groups of ``g`` slots."""
    grouping = flat_grouping(voxels, window_shape, group_size, major, shift)
    return PaddingStats("flat", grouping.num_groups, voxels.num_sites, grouping.gather.shape[0])


def window_padding_stats(
    voxels: SparseVoxels,
    window_shape: Sequence[int],
    shift: bool = False,
    levels: Sequence[int] | None = None,
) -> PaddingStats:
    """SST-style per-window padding: every non-empty window is one group.

    Args:
        levels: ``None`` pads every window to the most populated window's count (one
            dense ``(windows, max_count)`` batch). Otherwise increasing caps: a window is
            padded to the smallest cap that holds it, and a window above the last cap keeps
            only that many voxels (the rest are ``dropped``), as SST's drop levels do.
    """
    _, window_key = window_order(voxels.indices, voxels.spatial_shape, window_shape, "x", shift, grid_offset(voxels))
    _, counts = torch.unique(window_key, return_counts=True)
    real = int(counts.sum())
    if levels is None:
        return PaddingStats("window_max", len(counts), real, len(counts) * int(counts.max()) if real else 0)
    caps = torch.tensor(sorted(int(v) for v in levels), device=counts.device)
    if len(caps) == 0 or int(caps[0]) < 1:
        raise ValueError(f"levels must be positive caps, got {levels}")
    slot = torch.searchsorted(caps, counts).clamp_max(len(caps) - 1)  # smallest cap >= count
    size = caps[slot]
    dropped = int((counts - size).clamp_min(0).sum())
    return PaddingStats("window_levels", len(counts), real - dropped, int(size.sum()), dropped)
