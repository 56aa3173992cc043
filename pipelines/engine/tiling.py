"""Tile planning for point scenes: the overlapping xy boxes a scene is cut into (numpy only).

:func:`plan_tiles` covers a scene's xy extent with square tiles of ``tile_size`` metres at
``stride`` metres (the last tile of a row or column flush with the points' maximum). A tile
holding more points than the budget is cut into overlapping pieces, and a piece still over
budget is cut again:

- across its longer side (else across the other, when that cut is poor) into as few pieces as
  its mean density needs, each as near square as the tile allows; neighbouring pieces share
  ``2c / (1 + c)`` of a piece, ``c = min(overlap, 0.5)``, so two pieces are the tile's halves
  overlapping by ``c`` of the tile;
- a cut is poor when its pieces hold more than ``1.9 / (1 + c)`` times the points the same cut
  of an evenly filled tile would (a dense cluster in the pieces' overlap, copied into each), or
  when one piece keeps over 90 % of them; the tile's subtree is then cut at the points instead:
  several runs of consecutive points along the points' longer extent when two pieces would not
  do (taken under the same rule), else two pieces at the points' quantiles, each piece the box
  of its points; a coordinate value crowding the quantile band, or pieces that would not part
  the points, get a cut without overlap, so such points go to one piece; a piece box reached
  twice is made once;
- a cut is taken only when every piece's box holds fewer points than the tile. Boxes select x to
  float32 precision relative to the scene's minimum x, so points sharing one xy position to that
  precision cannot be parted and their tile stays over budget.

Guarantees of a :class:`TilePlan`: every point lies in at least one tile; a tile holds at most
the budget unless its points share one xy position (as above) or it was cut 32 times; tiles
come column by column (a column: the grid tiles of one x start and all their pieces), pieces
within a column sorted by ``(x0, y0)``; no point before a column's ``column_lo`` (in x-sorted
order) is in that column or a later one, so an accumulator that finalises points as columns
pass needs :attr:`TilePlan.ring` slots only.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from medvit.core.errors import MedvitError
from pipelines.engine.checks import check_overlap, check_points_budget, check_tile_size

MAX_TILE_GRID = 4_000_000
"""Tile positions a scene's xy extent may span (2,000 x 2,000: 75 km square at 50 m tiles and 0.25
overlap). Past that the extent is almost always a few stray points (x = 1e30) far from the rest,
and planning the tiles alone would not end."""

MAX_CUT_DEPTH = 32
"""Times a tile may be cut, nested; a deeper piece stays over budget."""

Box = tuple[float, float, float, float]
"""``(x0, y0, width, height)`` in metres: the closed box [x0, x0 + width] × [y0, y0 + height]."""


def _n_starts(extent: float, size: float, stride: float) -> int:
    """How many tiles of ``size`` at ``stride`` cover ``extent`` along one axis (see :func:`_starts`)."""
    return 1 if extent <= size else math.ceil((extent - size) / stride) + 1


def _starts(lo: float, hi: float, size: float, stride: float) -> list[float]:
    """Tile starts along one axis covering [lo, hi]: evenly spaced, the last flush with hi."""
    if hi - lo <= size:
        return [lo]
    return [min(lo + i * stride, hi - size) for i in range(_n_starts(hi - lo, size, stride))]


def check_scene_extent(xy: np.ndarray, tile_size: float, stride: float) -> None:
    """Refuse a scene whose xy extent spans more than :data:`MAX_TILE_GRID` tile positions.

    Args:
        xy: ``(N, 2+)`` coordinates in metres; columns 0 and 1 are x and y, others are ignored.
        tile_size, stride: tile edge and step in metres.

    Raises:
        MedvitError: naming the extent and suggesting ``point_range`` or larger tiles.
    """
    lo, hi = xy[:, :2].min(0), xy[:, :2].max(0)
    ext = hi - lo
    n = math.prod(_n_starts(float(e), tile_size, stride) for e in ext)
    if n > MAX_TILE_GRID:
        raise MedvitError(f"the points span {ext[0]:.4g} m x {ext[1]:.4g} m, {n:.3g} tile positions of {tile_size:g} m "
                          f"(at most {MAX_TILE_GRID:,}): stray points far from the rest? Crop them with point_range "
                          "in the config, or use larger tiles")


@dataclass(frozen=True)
class Tile:
    """One tile of a plan: a box in metres and the points it holds."""

    index: int
    """Position in the plan's run order."""
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
    """Points in the box: ``len(plan.members(tile))``."""


class _SortedX:
    """The scene's points sorted by x, answering "which points lie in this box" by binary search.

    Holds the x-sort order and the sorted x relative to the scene's minimum in float32 (8 bytes
    a point with an int32 order), not a sorted copy of the points. Thread-safe: the runner's
    copy thread asks for members while the main thread accumulates.
    """

    def __init__(self, xy: np.ndarray):
        self.xy = xy
        n = len(xy)
        # x relative to the scene's minimum fits float32 to a fraction of a millimetre over
        # kilometres, and the order fits int32
        self.x0 = float(xy[:, 0].min())
        rel = (xy[:, 0] - self.x0).astype(np.float32)
        order = np.argsort(rel, kind="stable")
        self.order = order.astype(np.int32) if n < 2**31 else order
        del order
        self.xs = rel[self.order]
        del rel
        self._columns: dict[tuple[float, float], tuple[int, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def column(self, x0: float, size: float) -> tuple[int, np.ndarray, np.ndarray]:
        """Points with x in [x0, x0 + size]: (first sorted index, their y sorted, positions in that order).

        Kept for the last 8 columns asked for: tiles of nearby columns reuse them, so a tile's
        members come from two binary searches instead of a scan of the column.
        """
        key = (x0, size)
        with self._lock:
            return self._columns.get(key) or self._build_column(key)

    def _build_column(self, key: tuple[float, float]) -> tuple[int, np.ndarray, np.ndarray]:
        x0, size = key
        # widened by one float32 step each way, so rounding never drops an edge point
        lo = int(np.searchsorted(self.xs, np.nextafter(np.float32(x0 - self.x0), np.float32(-np.inf)), "left"))
        hi = int(np.searchsorted(self.xs, np.nextafter(np.float32(x0 + size - self.x0), np.float32(np.inf)), "right"))
        y = self.xy[self.order[lo:hi], 1]
        perm = np.argsort(y, kind="stable")
        if len(self._columns) >= 8:  # columns are visited in x order: forget the oldest
            self._columns.pop(next(iter(self._columns)))
        self._columns[key] = (lo, y[perm], perm)
        return self._columns[key]

    def forget(self) -> None:
        with self._lock:
            self._columns.clear()

    def members(self, x0: float, y0: float, width: float, height: float) -> np.ndarray:
        """Sorted-order indices of the points in the box [x0, x0 + width] × [y0, y0 + height]."""
        lo, ys, perm = self.column(x0, width)
        # widened a few float64 steps each way: the last tile's (hi - size) + size can round a
        # couple of steps below hi (x is widened by a float32 step of its relative coordinate)
        tol = 4 * np.finfo(np.float64).eps * (abs(y0) + height)
        a, b = np.searchsorted(ys, y0 - tol, "left"), np.searchsorted(ys, y0 + height + tol, "right")
        return lo + perm[a:b]


class TilePlan:
    """The tiles of one scene in run order, and the x-sorted index their members come from.

    Attributes:
        tiles: the tiles in the order their outputs are to be accumulated (see the module
            docstring for the order and the guarantees).
        order: ``(N,)`` int32 (int64 past 2**31 points) x-sort order of the scene's points;
            "sorted index" ``i`` is point ``order[i]``.
        column_lo: per tile column, the first sorted index any of its tiles can hold.
        ring: the widest live band of sorted points over the run: replayed in run order, with
            points below a tile's ``column_lo`` final, every tile's points lie in
            ``[done, done + ring)``.
        tile_size, stride: the grid's tile edge and step in metres; ``overlap = 1 - stride /
            tile_size``.
        budget: points a tile may hold.
        n: points in the scene.
    """

    def __init__(self, index: _SortedX, tiles: list[Tile], *, tile_size: float, stride: float, budget: int):
        self._index = index
        self.tiles = tiles
        self.order = index.order
        self.n = len(index.order)
        self.tile_size, self.stride, self.budget = tile_size, stride, budget
        self.overlap = 1 - stride / tile_size
        self.column_lo: dict[int, int] = {}
        for t in tiles:
            self.column_lo[t.column] = min(self.column_lo.get(t.column, t.lo), t.lo)
        done, self.ring = 0, 1
        for t in tiles:
            done = max(done, self.column_lo[t.column])
            self.ring = max(self.ring, t.hi - done)

    def members(self, tile: Tile) -> np.ndarray:
        """Sorted indices (into :attr:`order`) of the points in ``tile``'s box, ascending in y.

        Found by binary search each call, so a plan holds no per-tile index arrays; safe to call
        from another thread.
        """
        return self._index.members(tile.x0, tile.y0, tile.width, tile.height)


def plan_tiles(xy: np.ndarray, *, tile_size: float, overlap: float = 0.25, stride: float | None = None,
               budget: int) -> TilePlan:
    """Plan the tiles of a scene.

    Args:
        xy: ``(N, 2)`` float64 x, y in metres, N > 0, all finite (a float64 view, such as
            ``xyz[:, :2]``, is kept without a copy: the plan's :meth:`TilePlan.members` reads it).
        tile_size: tile edge in metres.
        overlap: fraction of a tile shared with its neighbour, in [0, 1); used unless ``stride``
            is given.
        stride: tile step in metres, in (0, tile_size].
        budget: points a tile may hold (at least 1); denser tiles are cut.

    Returns:
        The :class:`TilePlan` (see the module docstring for what it guarantees).

    Raises:
        ValueError, TypeError: empty or non-finite ``xy``, or a tile size, overlap, stride or
            budget out of range (the commands check the user's values before, naming the option).
        MedvitError: an extent past :data:`MAX_TILE_GRID` tile positions (the user's scan).
    """
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) == 0:
        raise ValueError(f"a scene needs (N, 2) xy coordinates with N > 0, got shape {xy.shape}")
    if not np.isfinite(xy).all():
        raise ValueError("the scene has NaN or inf coordinates; drop them when reading")
    tile_size = check_tile_size(tile_size)
    if stride is None:
        stride = tile_size * (1 - check_overlap(overlap))
    if not 0 < stride <= tile_size:
        raise ValueError(f"stride must lie in (0, tile size], got {stride}")
    budget = check_points_budget(budget, "budget")
    check_scene_extent(xy, tile_size, stride)
    tile_size, stride, budget = float(tile_size), float(stride), int(budget)
    index = _SortedX(xy)
    tiles = _Planner(index, tile_size=tile_size, stride=stride, budget=budget).plan()
    index.forget()
    return TilePlan(index, tiles, tile_size=tile_size, stride=stride, budget=budget)


class _Planner:
    """The cuts of :func:`plan_tiles`; one instance plans one scene."""

    def __init__(self, index: _SortedX, *, tile_size: float, stride: float, budget: int):
        self.index, self.tile_size, self.stride, self.budget = index, tile_size, stride, budget
        # the overlap a dense tile's pieces get, at most 0.5: near 1, pieces overlapping that
        # much would be countless
        self.cut_overlap = min(1 - stride / tile_size, 0.5)
        self.cut_share = 2 * self.cut_overlap / (1 + self.cut_overlap)  # of a piece, shared with its neighbour
        self.seen: set[Box] = set()  # point boxes already cut

    def plan(self) -> list[Tile]:
        xy = self.index.xy
        lo, hi = xy.min(0), xy.max(0)
        tiles: list[Tile] = []
        for col, x0 in enumerate(_starts(lo[0], hi[0], self.tile_size, self.stride)):
            for y0 in _starts(lo[1], hi[1], self.tile_size, self.stride):
                self._split(col, x0, y0, self.tile_size, self.tile_size, tiles, 0)
        # tiles run column by column; within a split column its pieces sort by x
        tiles.sort(key=lambda t: (t.column, t.x0, t.y0))
        return [Tile(i, t.column, t.x0, t.y0, t.width, t.height, t.lo, t.hi, t.n_points) for i, t in enumerate(tiles)]

    def _split(self, col: int, x0: float, y0: float, width: float, height: float, out: list[Tile],
               depth: int, crowded: bool = False, idx: np.ndarray | None = None) -> None:
        """Append the tile [x0, x0 + width] × [y0, y0 + height] to ``out``, or its pieces when it
        holds more than the budget; ``idx``: its members, when the caller has them already;
        ``crowded``: cut at the points only."""
        members_of = self.index.members
        if idx is None:
            idx = members_of(x0, y0, width, height)
        n = len(idx)
        if n == 0:
            return
        if n > self.budget and depth < MAX_CUT_DEPTH:
            # across the longer side, else across the other (points in a band along the longer one)
            for along_x in ((width >= height, width < height) if not crowded else ()):
                pieces, spread = self._pieces(x0, y0, width, height, n, along_x)
                members = [members_of(*p) for p in pieces]
                if not self._copies_too_many(members, n, spread) and max(map(len, members)) <= 0.9 * n:
                    for p, m in zip(pieces, members):
                        self._split(col, *p, out, depth + 1, idx=m)
                    return
            # A poor cut (a dense cluster in the pieces' overlap would be copied into every piece,
            # or one piece keeps nearly all points): cut this subtree at the points instead,
            # several runs at once when far over budget, else two.
            for cut in (self._cut_at_ranks, lambda i: (self._cut_at_points(i, prefer_x=width >= height), None)):
                pieces, spread = cut(idx)
                members = [members_of(*box) for box in pieces]
                # Boxes select x to a float32 step of the scene's x, so points parted by the cut
                # may share every box; a piece holding them all would make no progress.
                if not pieces or not all(len(m) < n for m in members):
                    continue
                if spread is not None and self._copies_too_many(members, n, spread):
                    continue
                for box, m in zip(pieces, members):
                    if box not in self.seen:  # another branch or tile may reach the same piece
                        self.seen.add(box)
                        self._split(col, *box, out, depth + 1, crowded=True, idx=m)
                return
            # points sharing one xy position (to float32 precision) cannot be parted: their
            # tile stays over budget
        lo = self.index.column(x0, width)[0]  # the same (widened) bound the members come from
        out.append(Tile(len(out), col, x0, y0, width, height, lo, int(idx.max()) + 1, n))

    def _copies_too_many(self, members: list[np.ndarray], n: int, spread: float) -> bool:
        """Whether pieces hold more of the tile's ``n`` points than ``1.9 / (1 + cut_overlap)``
        times what the same cut of an evenly filled tile would (``spread`` times ``n``): 1.9x
        the tile's points for two pieces."""
        return sum(map(len, members)) > 1.9 * n * spread / (1 + self.cut_overlap)

    def _pieces(self, x0: float, y0: float, width: float, height: float, n: int,
                along_x: bool) -> tuple[list[Box], float]:
        """Overlapping pieces of a tile along x (or y), as few as would each fit the budget if the
        tile's ``n`` points were spread evenly, and how many times its points they hold then.

        The target piece is square (side ``sqrt(area * budget / n)``) unless the tile is thinner
        than that, so a tile far over budget is cut once into strips here and each strip once
        across. Neighbouring pieces share ``cut_share`` of a piece; two pieces are the tile's
        halves overlapping by ``cut_overlap`` of the tile.
        """
        long, short = (width, height) if along_x else (height, width)
        share = self.cut_share
        target = max(math.sqrt(long * short * self.budget / n), long * self.budget / n)
        k = max(2, math.ceil(1 + (long / target - 1) / (1 - share) - 1e-9))
        size = long / ((k - 1) * (1 - share) + 1)
        starts = [long - size if i == k - 1 else i * (long - size) / (k - 1) for i in range(k)]
        if along_x:
            pieces = [(x0 + a, y0, size, height) for a in starts]
        else:
            pieces = [(x0, y0 + a, width, size) for a in starts]
        return pieces, k * size / long

    def _xy(self, idx: np.ndarray) -> np.ndarray:
        return self.index.xy[self.index.order[idx]]

    def _cut_at_ranks(self, idx: np.ndarray) -> tuple[list[Box], float]:
        """Three or more pieces of consecutive points along the longer side of the points' box,
        as :meth:`_pieces` cuts a tile but counted in points rather than metres (each piece the
        box of its run of points, neighbouring runs sharing ``cut_share`` of a run), and how many
        times the points they hold; none when two pieces would do (:meth:`_cut_at_points`)."""
        n = len(idx)
        p = self._xy(idx)
        ext = p.max(0) - p.min(0)
        axis = 0 if ext[0] >= ext[1] else 1
        long, short = float(ext[axis]), float(ext[1 - axis])
        if long <= 0:
            return [], 1.0
        share = self.cut_share
        frac = max(math.sqrt(short * self.budget / (long * n)), self.budget / n)
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

    def _cut_at_points(self, idx: np.ndarray, prefer_x: bool) -> list[Box]:
        """Two pieces cut at the points' quantiles rather than the tile's middle: along x (or y),
        one piece holds the points up to the ``0.5 + cut_overlap / 2`` quantile and the other
        those from the ``0.5 - cut_overlap / 2`` one, each piece the box of its points. When more
        points than an even spread puts there share that band (one coordinate value held by
        many points: a pole), or the overlapping pieces would not part the points, the cut is at
        the median without overlap, the crowded value on one side only. Empty when the points
        share one position on both axes."""
        p = self._xy(idx)
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
