"""``PointScene``: the scene domain of the engine (LiDAR sweeps and aggregated scenes).

A scene is cut into overlapping square xy tiles (size and stride in metres); a tile
holding more points than the budget is cut across its longer side into as few overlapping
pieces as would fit it at its mean density (two pieces: its halves, overlapping by the grid's
overlap fraction of the tile), and a piece still over budget is cut again. A dense cluster in
the pieces' overlap would be copied into every piece, so a cut whose pieces hold far more
points than an evenly filled tile's would (1.9x the tile's for two pieces), or that leaves one
piece with over 90 % of them, is replaced by cuts at the points' quantiles (each piece the box
of its points); points sharing one xy position cannot be cut, and their tile stays over budget.
The points the tiles hold (each point counted once per tile holding it) thus grow linearly
with the cuts of evenly filled tiles: 1.96x the scene's points on the 1.2M-point synthetic map
at 150k points a tile (quartering gave 2.75x), and 21x rather than 94x at 50k points and
overlap 0.5, where halving again and again multiplied them by ``1 + overlap`` per level; the
cuts at the points likewise make several runs of points at once when two would not do (a
20k-point blob at 1,000 a tile and overlap 0.5: 7.5x, not 86x). A tile whose points fill a
thin band of its box (a road) is still cut as if they filled it, and halves again and again.
Each tile runs through a point net (``net(Point) -> (n, K)`` logits) with coordinates
made relative to the tile's centre. A point's logits from every tile that holds it are
averaged in fp32 with weights that peak at the tile centre and fall linearly to a small
floor at its edge, so a point near a tile border defers to the tile it is central in.

Memory: points are sorted by x once; tiles run column by column, and the points left of
the next column are final as soon as that column starts, so their logits are reduced to
labels and their slots cleared. The float accumulator holds one column band of points,
not the scene: a ring allocated once with the widest band any tile needs (known from the
plan), so no band-sized buffer is re-made per tile. Every point must be covered by some
tile; the domain checks it.

oneDNN (torch's CPU kernels for GELU and others) caches a compiled kernel per input shape,
up to 1024 of them, and every tile has its own point count, so each tile left a few cached
kernels (about 0.5 MB of heap each) that fragmented the heap: peak memory grew with the
number of tiles (about 70 bytes a point). ``segment_scene`` bounds that cache (see
:func:`bounded_onednn_cache`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medvit.core.errors import MedvitError, NonFiniteOutput
from pipelines.engine.runner import EngineReport, ring_runs, run_windows

log = logging.getLogger(__name__)

MAX_TILES_PER_CALL = 64
"""Tiles packed into one call, per unit of batch size, at most: FlatFormer pads each cloud's last
group (up to 63 tokens), so thousands of tiny tiles in one call would be mostly padding."""

EDGE_WEIGHT = 1e-3
"""Weight at a tile's edge relative to its centre (never 0, so edge-only points count)."""

ONEDNN_CACHE_CAPACITY = 8
"""oneDNN primitive-cache size while a scene runs: enough for the kernels one batch of tiles
reuses (3 shapes for FlatFormer, 6 for ConDaFormer); the default 1024 kept up to ~0.5 GB."""

_ONEDNN_VAR = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
_onednn_logged = False


@contextlib.contextmanager
def bounded_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> Iterator[None]:
    """Set ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` for the block; a value the user set is left alone.

    oneDNN reads the variable once, when the process makes its first primitive, and torch
    exports no call to change the size later. So this bounds the cache (for the rest of the
    process) only where the block makes the process's first primitive, as in ``medvit lidar
    segment`` (loading a checkpoint runs no kernel) and the bench worker; elsewhere it does
    nothing, and setting the variable at process start covers every case. It is removed
    after the block so child processes do not inherit it.
    """
    global _onednn_logged
    if _ONEDNN_VAR in os.environ:
        yield
        return
    os.environ[_ONEDNN_VAR] = str(capacity)
    if not _onednn_logged:
        _onednn_logged = True
        log.info("%s=%d while scenes run: per-tile kernel shapes would otherwise fill oneDNN's cache and fragment "
                 "the heap (no effect if this process already ran a oneDNN kernel)", _ONEDNN_VAR, capacity)
    try:
        yield
    finally:
        os.environ.pop(_ONEDNN_VAR, None)


@dataclass(frozen=True)
class Tile:
    index: int
    column: int
    """Index of the tile column this tile belongs to (tiles run column by column)."""
    x0: float
    y0: float
    width: float
    """Extent along x in metres (tiles are square until a dense one is cut)."""
    height: float
    """Extent along y in metres."""
    lo: int
    """First index of the tile's column in the x-sorted order (points before it are in no later tile)."""
    hi: int
    """One past the largest x-sorted index among the tile's points (sizes the accumulator ring)."""
    n_points: int


@dataclass
class TileBatch:
    """A batch of tiles as numpy arrays: what ``gather`` makes on the runner's copy thread.

    ``to(device)`` makes the net's :class:`~pointcloud.structure.Point` on the runner's own
    thread. Tensors made on the copy thread cost the point nets 2.6x on the 2-core CPU: torch
    ops there start a second OpenMP thread team, and the nets' thousands of small ops then
    wait on threads of both teams (sparse_unet, 1M-point map: 23 s against 9 s).
    """

    coords: list[np.ndarray]
    """Per tile ``(n_i, 3)`` float32 coordinates relative to the tile's centre."""
    feats: list[np.ndarray]
    """Per tile ``(n_i, F)`` float32 features."""

    def to(self, device: torch.device | str):
        from pointcloud.structure import Point

        return Point.from_clouds(self.coords, self.feats, device=device)


def _n_starts(extent: float, size: float, stride: float) -> int:
    """How many tiles of ``size`` at ``stride`` cover ``extent`` along one axis (see :func:`_starts`)."""
    return 1 if extent <= size else math.ceil((extent - size) / stride) + 1


def _starts(lo: float, hi: float, size: float, stride: float) -> list[float]:
    """Tile starts along one axis covering [lo, hi]: evenly spaced, the last flush with hi."""
    if hi - lo <= size:
        return [lo]
    return [min(lo + i * stride, hi - size) for i in range(_n_starts(hi - lo, size, stride))]


MAX_TILE_GRID = 4_000_000
"""Tile positions a scene's xy extent may span (2,000 x 2,000: 75 km square at 50 m tiles and 0.25
overlap). Past that the extent is almost always a few stray points (x = 1e30) far from the rest,
and planning the tiles alone would not end."""


def check_scene_extent(xyz: np.ndarray, tile_size: float, stride: float) -> None:
    """MedvitError when the xy extent of ``xyz`` spans more than :data:`MAX_TILE_GRID` tile positions."""
    lo, hi = xyz[:, :2].min(0), xyz[:, :2].max(0)
    ext = hi - lo
    n = math.prod(_n_starts(float(e), tile_size, stride) for e in ext)
    if n > MAX_TILE_GRID:
        raise MedvitError(f"the points span {ext[0]:.4g} m x {ext[1]:.4g} m, {n:.3g} tile positions of {tile_size:g} m "
                          f"(at most {MAX_TILE_GRID:,}): stray points far from the rest? Crop them with point_range "
                          "in the config, or use larger tiles")


class PointScene:
    """Overlapping xy tiles over one scene.

    Args:
        xyz: ``(N, 3)`` coordinates in metres (float64 kept for UTM-size scenes).
        features: ``(N, F)`` float32 per-point features given to the net.
        tile_size: tile edge in metres.
        overlap: fraction of a tile shared with its neighbour, in [0, 1); or give ``stride``.
        stride: tile step in metres.
        max_points: points budget per tile; denser tiles are cut across their longer side into
            overlapping pieces until they fit. It also sizes the net's calls: consecutive tiles
            are packed into one call while they hold at most ``batch_size * max_points`` points
            together (see :meth:`batch_len`).
        num_classes: logits per point (checked against the net's output).
        coords_in_features: put the tile-relative ``x, y, z`` before the features given to the net.
    """

    def __init__(
        self,
        xyz: np.ndarray | torch.Tensor,
        features: np.ndarray | torch.Tensor,
        *,
        tile_size: float = 50.0,
        overlap: float = 0.25,
        stride: float | None = None,
        max_points: int = 200_000,
        num_classes: int | None = None,
        coords_in_features: bool = False,
    ):
        xyz = np.asarray(xyz, dtype=np.float64)
        feats = np.asarray(features, dtype=np.float32)
        if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) == 0:
            raise MedvitError(f"a scene needs (N, 3) coordinates with N > 0, got shape {xyz.shape}")
        if feats.ndim != 2 or len(feats) != len(xyz):
            raise MedvitError(f"features must be (N={len(xyz)}, F), got shape {feats.shape}")
        if not np.isfinite(xyz).all():
            raise MedvitError("the scene has NaN or inf coordinates; drop them when reading")
        if not (math.isfinite(tile_size) and tile_size > 0):
            raise MedvitError(f"tile size must be a positive number of metres, got {tile_size}")
        if stride is None:
            if not 0 <= overlap < 1:
                raise MedvitError(f"overlap must lie in [0, 1), got {overlap}")
            stride = tile_size * (1 - overlap)
        if not 0 < stride <= tile_size:
            raise MedvitError(f"stride must lie in (0, tile size], got {stride}")
        if not (math.isfinite(max_points) and max_points >= 1):
            raise MedvitError(f"the points budget per tile must be at least 1, got {max_points}")
        check_scene_extent(xyz, tile_size, stride)
        self.n = len(xyz)
        # no sorted copies of the scene: the x-sort order and the sorted x (16 bytes a point)
        self.xyz, self.feats = xyz, feats
        # x relative to the scene's minimum fits float32 to a fraction of a millimetre over
        # kilometres, and the order fits int32: 8 bytes a point for the sweep index
        self.x0 = float(xyz[:, 0].min())
        rel = (xyz[:, 0] - self.x0).astype(np.float32)
        order = np.argsort(rel, kind="stable")
        self.order = order.astype(np.int32) if self.n < 2**31 else order
        del order
        self.xs = rel[self.order]
        del rel
        self._columns: dict[tuple[float, float], tuple[int, np.ndarray, np.ndarray]] = {}
        self._columns_lock = threading.Lock()  # gather runs on the runner's copy thread
        self._ready: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # tile -> (members, weights), from gather
        self.tile_size, self.stride, self.max_points = float(tile_size), float(stride), int(max_points)
        self.overlap = 1 - self.stride / self.tile_size  # also when the stride was given
        # the overlap a dense tile's pieces get, at most 0.5: near 1, pieces overlapping that much
        # are countless (planning a 40 m scene at overlap 0.999999999 did not end)
        self.cut_overlap = min(self.overlap, 0.5)
        self.cut_share = 2 * self.cut_overlap / (1 + self.cut_overlap)  # of a piece, shared with its neighbour
        self.num_classes = num_classes
        self.coords_in_features = coords_in_features
        self.window_shape = ("tile", self.max_points)
        self.tiles = self._plan()
        self._col_lo: dict[int, int] = {}  # first sorted index any tile of a column can hold
        for t in self.tiles:
            self._col_lo[t.column] = min(self._col_lo.get(t.column, t.lo), t.lo)
        # Ring size: before a tile is added, points below its column's start are final, so
        # the live band is [done, largest index added so far); its widest extent over the
        # run, replayed here in run order, is all the ring needs.
        done, self._cap = 0, 1
        for t in self.tiles:
            done = max(done, self._col_lo[t.column])
            self._cap = max(self._cap, t.hi - done)
        self._next = 0
        self._done = 0  # sorted points [0, _done) are final
        self._acc: torch.Tensor | None = None  # (_cap, K) ring: sorted point i lives at row i % _cap
        self._acc_device: torch.device | None = None  # where the ring goes; None: the net's output device
        self._wsum = np.zeros(0, dtype=np.float32)
        self.uncovered = 0
        self.labels: np.ndarray | None = None

    # ------------------------------------------------------------------ planning
    def _column(self, x0: float, size: float) -> tuple[int, np.ndarray, np.ndarray]:
        """Points with x in [x0, x0 + size]: (first sorted index, their y sorted, positions in that order).

        Built once per column and kept while tiles of nearby columns run, so a tile's
        members come from two binary searches instead of a scan of the column.
        """
        key = (x0, size)
        with self._columns_lock:
            return self._columns.get(key) or self._build_column(key)

    def _build_column(self, key: tuple[float, float]) -> tuple[int, np.ndarray, np.ndarray]:
        x0, size = key
        # widened by one float32 step each way, so rounding never drops an edge point
        lo = int(np.searchsorted(self.xs, np.nextafter(np.float32(x0 - self.x0), np.float32(-np.inf)), "left"))
        hi = int(np.searchsorted(self.xs, np.nextafter(np.float32(x0 + size - self.x0), np.float32(np.inf)), "right"))
        y = self.xyz[self.order[lo:hi], 1]
        perm = np.argsort(y, kind="stable")
        if len(self._columns) >= 8:  # columns are visited in x order: forget the oldest
            self._columns.pop(next(iter(self._columns)))
        self._columns[key] = (lo, y[perm], perm)
        return self._columns[key]

    def _members(self, x0: float, y0: float, width: float, height: float) -> np.ndarray:
        """Sorted-order indices of the points in the tile [x0, x0 + width] × [y0, y0 + height]."""
        lo, ys, perm = self._column(x0, width)
        # widened a few float64 steps each way: the last tile's (hi - size) + size can round a
        # couple of steps below hi (x is widened by a float32 step of its relative coordinate)
        tol = 4 * np.finfo(np.float64).eps * (abs(y0) + height)
        a, b = np.searchsorted(ys, y0 - tol, "left"), np.searchsorted(ys, y0 + height + tol, "right")
        return lo + perm[a:b]

    def _split(self, col: int, x0: float, y0: float, width: float, height: float, out: list[Tile],
               depth: int, seen: set[tuple[float, float, float, float]], crowded: bool = False,
               idx: np.ndarray | None = None) -> None:
        """Append the tile [x0, x0 + width] × [y0, y0 + height] to ``out``, or its pieces when it
        holds more than the budget; ``idx``: its members, when the caller has them already."""
        if idx is None:
            idx = self._members(x0, y0, width, height)
        n = len(idx)
        if n == 0:
            return
        if n > self.max_points and depth < 32:
            # across the longer side, else across the other (points in a band along the longer one)
            for along_x in ((width >= height, width < height) if not crowded else ()):
                pieces, spread = self._pieces(x0, y0, width, height, n, along_x)
                members = [self._members(*p) for p in pieces]
                if not self._copies_too_many(members, n, spread) and max(map(len, members)) <= 0.9 * n:
                    for p, m in zip(pieces, members):
                        self._split(col, *p, out, depth + 1, seen, idx=m)
                    return
            # A poor cut: a dense cluster lies in the pieces' overlap, and cutting on would copy it
            # into every piece, or in one piece, and the cut gained nothing. From here on this
            # tile's pieces are cut at the points instead. (At 1.5x this also fired on the demo
            # maps at 50k points a tile and cost mIoU; at 1.9x their plans were unchanged.)
            # Far over budget, the points are cut into several runs at once (halving at the points
            # level after level grew them by 1 + overlap a level: a 20k-point blob at 1,000 a tile and
            # overlap 0.5 ran 86x its points); else, or when those runs' boxes overlap too much
            # (a heavy coordinate value), into two.
            for cut in (self._cut_at_ranks, lambda i: (self._cut_at_points(i, prefer_x=width >= height), None)):
                pieces, spread = cut(idx)
                members = [self._members(*box) for box in pieces]
                # A piece's members are found by box, with x widened by a float32 step of the scene's
                # x: points apart by less than that (micrometres a kilometre out) part in the cut but
                # not in the boxes, and a piece holding them all made no progress; with it in `seen`,
                # they were dropped from every tile.
                if not pieces or not all(len(m) < n for m in members):
                    continue
                if spread is not None and self._copies_too_many(members, n, spread):
                    continue
                for box, m in zip(pieces, members):
                    if box not in seen:  # another branch or tile may reach the same piece
                        seen.add(box)
                        self._split(col, *box, out, depth + 1, seen, crowded=True, idx=m)
                return
            # points sharing one xy position (to float32 precision) cannot be separated: their
            # tile stays over budget
        lo = self._column(x0, width)[0]  # the same (widened) bound the members come from
        out.append(Tile(len(out), col, x0, y0, width, height, lo, int(idx.max()) + 1, n))

    def _copies_too_many(self, members: list[np.ndarray], n: int, spread: float) -> bool:
        """Whether pieces hold more of the tile's ``n`` points than a cut of an evenly filled tile
        would, ``spread`` times them, allows: 1.9x the tile's points for two pieces, as many more
        for more pieces as their wider overlap takes (a dense cluster in the overlap is copied
        into every piece)."""
        return sum(map(len, members)) > 1.9 * n * spread / (1 + self.cut_overlap)

    def _pieces(self, x0: float, y0: float, width: float, height: float, n: int,
                along_x: bool) -> tuple[list[tuple[float, float, float, float]], float]:
        """Overlapping pieces of a tile along x (or y), as few as would each fit the budget if the
        tile's ``n`` points were spread evenly, and how many times its points they hold then.

        The target piece is square (side ``sqrt(area * budget / n)``) unless the tile is thinner
        than that, so a tile far over budget is cut once into strips here and each strip once
        across: the points the pieces hold grow linearly with the cuts, where halving again and
        again multiplied them by ``1 + overlap`` per level (a 50 m tile of 1,500 points at 150 a
        tile and overlap 0.5 ran 72x its points through the net). Neighbouring pieces share
        ``2 overlap / (1 + overlap)`` of a piece, so two pieces are the halves the tile had before
        (overlapping by the grid's overlap fraction of the tile; ``overlap`` here is
        ``cut_overlap``, at most 0.5). A piece still over budget is cut again.
        """
        long, short = (width, height) if along_x else (height, width)
        share = self.cut_share
        target = max(math.sqrt(long * short * self.max_points / n), long * self.max_points / n)
        k = max(2, math.ceil(1 + (long / target - 1) / (1 - share) - 1e-9))
        size = long / ((k - 1) * (1 - share) + 1)
        starts = [long - size if i == k - 1 else i * (long - size) / (k - 1) for i in range(k)]
        if along_x:
            pieces = [(x0 + a, y0, size, height) for a in starts]
        else:
            pieces = [(x0, y0 + a, width, size) for a in starts]
        return pieces, k * size / long

    def _cut_at_ranks(self, idx: np.ndarray) -> tuple[list[tuple[float, float, float, float]], float]:
        """Three or more pieces of consecutive points along the longer side of the points' box,
        as :meth:`_pieces` cuts a tile but counted in points rather than metres (each piece the
        box of its run of points, neighbouring runs sharing ``2 overlap / (1 + overlap)`` of a
        run), and how many times the points they hold; none when two pieces would do
        (:meth:`_cut_at_points` makes those)."""
        n = len(idx)
        p = self.xyz[self.order[idx], :2]
        ext = p.max(0) - p.min(0)
        axis = 0 if ext[0] >= ext[1] else 1
        long, short = float(ext[axis]), float(ext[1 - axis])
        if long <= 0:
            return [], 1.0
        share = self.cut_share
        frac = max(math.sqrt(short * self.max_points / (long * n)), self.max_points / n)
        k = math.ceil(1 + (1 / frac - 1) / (1 - share) - 1e-9)
        if k < 3:
            return [], 1.0
        run = math.ceil(n / ((k - 1) * (1 - share) + 1))
        order = np.argsort(p[:, axis], kind="stable")
        pieces = []
        for i in range(k):
            q = p[order[round(i * (n - run) / (k - 1)):][:run]]
            a, b = q.min(0), q.max(0)
            pieces.append((float(a[0]), float(a[1]), float(b[0] - a[0]), float(b[1] - a[1])))
        return pieces, k * run / n

    def _cut_at_points(self, idx: np.ndarray, prefer_x: bool) -> list[tuple[float, float, float, float]]:
        """Two pieces cut at the points' quantiles rather than the tile's middle, for points
        crowded into one spot: along x (or y), one piece holds the points up to the
        ``0.5 + overlap / 2`` quantile and the other those from the ``0.5 - overlap / 2`` one, so each
        holds about ``(1 + overlap) / 2`` of them as halves of an evenly filled tile do; each
        piece is the box of its points. Empty when the points share one position on both axes.

        ``overlap`` here is ``cut_overlap``. When more points than that share the band (many at
        one coordinate: a pole, the scanner's origin), or the overlapping pieces would not part
        the points (three points, two on one x), the cut is made without overlap instead: copied
        into both pieces at every depth, such a group filled dozens of over-budget tiles (a
        1,500-point pole among 1,500 points, 150 a tile: 20 tiles held it whole, 12x the scene's
        points through the net)."""
        p = self.xyz[self.order[idx], :2]
        f = self.cut_overlap / 2
        for axis in ((0, 1) if prefer_x else (1, 0)):
            v = p[:, axis]
            lo_q, hi_q = np.quantile(v, [0.5 - f, 0.5 + f])
            parts = [p[v <= hi_q], p[v >= lo_q]]
            heavy = len(parts[0]) + len(parts[1]) > (1 + self.cut_overlap) * len(p) + 1  # a heavy value in the band
            if heavy or not all(0 < len(q) < len(p) for q in parts):  # or too few points to overlap
                m = np.median(v)
                cuts = [(v <= m, v > m), (v < m, v >= m)]  # the heavy value on one side only
                parts = min(([p[a], p[b]] for a, b in cuts), key=lambda q: (min(map(len, q)) == 0, max(map(len, q))))
            if all(0 < len(q) < len(p) for q in parts):
                return [(float(a[0]), float(a[1]), float(b[0] - a[0]), float(b[1] - a[1]))
                        for a, b in ((q.min(0), q.max(0)) for q in parts)]
        return []

    def _plan(self) -> list[Tile]:
        lo, hi = self.xyz.min(0), self.xyz.max(0)
        tiles: list[Tile] = []
        seen: set[tuple[float, float, float, float]] = set()  # point boxes already cut
        for col, x0 in enumerate(_starts(lo[0], hi[0], self.tile_size, self.stride)):
            for y0 in _starts(lo[1], hi[1], self.tile_size, self.stride):
                self._split(col, x0, y0, self.tile_size, self.tile_size, tiles, 0, seen)
        # tiles run column by column; within a split column its pieces sort by x
        tiles.sort(key=lambda t: (t.column, t.x0, t.y0))
        self._columns.clear()
        return [Tile(i, t.column, t.x0, t.y0, t.width, t.height, t.lo, t.hi, t.n_points) for i, t in enumerate(tiles)]

    # ---------------------------------------------------------------- domain API
    def windows(self) -> list[Tile]:
        return self.tiles

    def batch_len(self, start: int, batch_size: int) -> int:
        """Tiles from ``start`` that run in one call: as many consecutive tiles as hold at most
        ``batch_size * max_points`` points together, and at most ``batch_size * MAX_TILES_PER_CALL``.

        A tile holds at most ``max_points`` (unless its points share one xy position), so a call
        holds at least ``batch_size`` tiles (the budget the memory bound was set for), and a sparse
        scene's many small tiles share calls instead of paying the net's per-call cost each
        (the 1,065-point ``simple.las`` at 50 m tiles: 1,797 tiles, one call each, 18 s). The
        nets treat each tile of a call as its own cloud.
        """
        budget = batch_size * self.max_points
        last = min(len(self.tiles), start + batch_size * MAX_TILES_PER_CALL)
        total, end = 0, start
        while end < last and total + self.tiles[end].n_points <= budget:
            total += self.tiles[end].n_points
            end += 1
        return max(1, end - start)

    def _tile_points(self, t: Tile) -> tuple[np.ndarray, np.ndarray]:
        """Sorted indices of the tile's points and their weights."""
        idx = self._members(t.x0, t.y0, t.width, t.height)
        p = self.xyz[self.order[idx]]
        hx, hy = max(t.width / 2, 1e-9), max(t.height / 2, 1e-9)  # a cut point box can be a line
        dx = np.abs(p[:, 0] - (t.x0 + hx)) / hx
        dy = np.abs(p[:, 1] - (t.y0 + hy)) / hy
        w = np.clip(1.0 - dx, EDGE_WEIGHT, 1.0) * np.clip(1.0 - dy, EDGE_WEIGHT, 1.0)
        return idx, w.astype(np.float32)

    def gather(self, ts: Sequence[Tile]) -> TileBatch:
        coords, feats = [], []
        for t in ts:
            idx, w = self._tile_points(t)
            self._ready[t.index] = (idx, w)  # accumulate takes them from here instead of recomputing
            orig = self.order[idx]
            c = self.xyz[orig]
            c[:, 0] -= t.x0 + t.width / 2
            c[:, 1] -= t.y0 + t.height / 2
            c = c.astype(np.float32)
            coords.append(c)
            f = self.feats[orig]
            feats.append(np.concatenate([c, f], 1) if self.coords_in_features else f)
        return TileBatch(coords, feats)

    def check(self, ts: Sequence[Tile], out: torch.Tensor) -> None:
        n = sum(t.n_points for t in ts)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != n:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise MedvitError(f"the point net returned {got} for {n} points in {len(ts)} tile(s); expected ({n}, K)")
        if out.shape[1] < 1:
            raise MedvitError(f"the point net returned 0 classes for {n} points; expected one logit per class")
        k = self.num_classes
        if k is not None and out.shape[1] != k:
            raise MedvitError(f"the point net returned {out.shape[1]} classes per point; expected {k}")
        if not bool(torch.isfinite(out).all()):
            bad = ts[0]
            start = 0
            for t in ts:
                if not bool(torch.isfinite(out[start : start + t.n_points]).all()):
                    bad = t
                    break
                start += t.n_points
            raise NonFiniteOutput(f"the point net returned NaN or inf for the tile at x={bad.x0:.2f}, y={bad.y0:.2f} m ({bad.width:g} × {bad.height:g} m)")

    def accumulate_on_cpu(self) -> bool:
        if self._acc_device is not None and self._acc_device.type == "cpu":
            return False
        self._acc_device = torch.device("cpu")
        if self._acc is not None:
            self._acc = self._acc.cpu()
        return True

    def accumulator_bytes(self, n_classes: int) -> int:
        return self._cap * (self.num_classes or n_classes) * 4  # the float32 logit ring

    def _finalize_until(self, upto: int) -> None:
        """Sorted points [_done, upto) are final: argmax their logits and clear their ring rows."""
        if upto <= self._done:
            return
        n = upto - self._done
        # only the first _cap of them can have been reached: a tile never adds past _done + _cap
        have = min(n, 0 if self._acc is None else self._cap)
        for i, r, m in ring_runs(self._done, self._done + have, self._cap):
            w = self._wsum[r : r + m]
            lab = self._acc[r : r + m].argmax(1).cpu().numpy()
            lab[w == 0] = 0
            self.labels[self.order[i : i + m]] = lab
            self.uncovered += int((w == 0).sum())
            self._acc[r : r + m] = 0
            w[:] = 0
        self.uncovered += n - have  # points no tile reached before they were passed
        self._done = upto

    def accumulate(self, ts: Sequence[Tile], out: torch.Tensor) -> None:
        if self._acc is None:
            k = self.num_classes or int(out.shape[1])
            dev = self._acc_device if self._acc_device is not None else out.device
            # allocated once for the whole run (re-made buffers would interleave with the net's
            # temporaries on the heap), and recorded only once all of it is allocated: an
            # out-of-memory error here leaves the scene as it was for the runner's retry
            acc = torch.zeros((self._cap, k), dtype=torch.float32, device=dev)
            self.labels = np.zeros(self.n, dtype=np.uint8 if k <= 256 else np.int32)
            self._wsum = np.zeros(self._cap, dtype=np.float32)
            self._acc, self._acc_device, self.num_classes = acc, dev, k
        out = out.float()
        start = 0
        for t in ts:
            part = out[start : start + t.n_points]
            start += t.n_points
            ready = self._ready.pop(t.index, None)
            if t.index < self._next:
                continue  # added before an out-of-memory retry
            # points left of this tile's column start are final
            self._finalize_until(self._col_lo[t.column])
            idx, w = ready if ready is not None else self._tile_points(t)
            if t.hi - self._done > self._cap:  # the plan sized the ring for run order
                raise MedvitError(f"tile {t.index} reaches past the accumulator ring of {self._cap} points; this is a tiling bug")
            pos = idx % self._cap
            rel = torch.as_tensor(pos, device=self._acc.device)
            wt = torch.as_tensor(w, device=self._acc.device)
            self._acc.index_add_(0, rel, part.to(self._acc.device) * wt[:, None])
            self._wsum[pos] += w  # a tile's points are distinct and span at most the ring: no repeats
            self._next += 1

    def finalize(self) -> np.ndarray:
        self._finalize_until(self.n)
        if self.uncovered:
            raise MedvitError(f"{self.uncovered} of {self.n} points were not covered by any tile; this is a tiling bug")
        return self.labels


def segment_scene(
    xyz: np.ndarray,
    features: np.ndarray,
    net,
    *,
    tile_size: float = 50.0,
    overlap: float = 0.25,
    max_points: int = 200_000,
    batch_size: int = 1,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    coords_in_features: bool = False,
):
    """Per-point labels for a whole scene through the engine; returns ``(labels (N,), report)``."""
    scene = PointScene(xyz, features, tile_size=tile_size, overlap=overlap, max_points=max_points,
                       coords_in_features=coords_in_features)
    rep = EngineReport(windows_planned=len(scene.tiles))
    with bounded_onednn_cache():
        labels, rep = run_windows(scene, net, batch_size=batch_size, device=device, amp_dtype=amp_dtype,
                                  progress=progress, desc="tiles", report=rep)
    return labels, rep
