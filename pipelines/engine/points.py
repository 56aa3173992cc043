"""``PointScene``: the scene domain of the engine (LiDAR sweeps and aggregated scenes).

A scene runs through a point net (``net(Point) -> (n, K)`` logits) tile by tile, in the order
of a :class:`~pipelines.engine.tiling.TilePlan` (:func:`~pipelines.engine.tiling.plan_tiles`
decides the tiles), with coordinates made relative to each tile's centre. A point's logits
from every tile that holds it are averaged in fp32 with weights that peak at the tile centre
and fall linearly to :data:`EDGE_WEIGHT` at its edge, so a point near a tile border defers to
the tile it is central in.

Memory: the accumulator holds one column band of x-sorted points, not the scene: a ring of
``plan.ring`` rows allocated once; points before a column's first index are final when that
column starts, so their logits are reduced to labels and their rows cleared. Every point must
be covered by some tile; the domain checks it.

oneDNN (torch's CPU kernels) caches a compiled kernel per input shape and every tile has its
own point count, so ``segment_scene`` bounds that cache (:func:`bounded_onednn_cache`) to keep
the heap from fragmenting as the tiles pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medvit.core.errors import NonFiniteOutput
from pipelines.engine.runner import Engine, EngineReport, ring_runs
from pipelines.engine.tiling import Tile, TilePlan, plan_tiles

log = logging.getLogger(__name__)

MAX_TILES_PER_CALL = 64
"""Tiles packed into one call, per unit of batch size, at most: FlatFormer pads each cloud's last
group (up to 63 tokens), so thousands of tiny tiles in one call would be mostly padding."""

EDGE_WEIGHT = 1e-3
"""Weight at a tile's edge relative to its centre (never 0, so edge-only points count)."""

ONEDNN_CACHE_CAPACITY = 8
"""oneDNN primitive-cache size while a scene runs: enough for the kernels one batch of tiles
reuses (3 shapes for FlatFormer, 6 for ConDaFormer)."""

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


@dataclass
class TileBatch:
    """A batch of tiles as numpy arrays: what ``gather`` makes on the runner's copy thread.

    ``to(device)`` makes the net's :class:`~pointcloud.structure.Point` on the runner's own
    thread: torch ops on the copy thread would start a second OpenMP thread team, whose threads
    the nets' many small ops then wait on.
    """

    coords: list[np.ndarray]
    """Per tile ``(n_i, 3)`` float32 coordinates relative to the tile's centre."""
    feats: list[np.ndarray]
    """Per tile ``(n_i, F)`` float32 features."""

    def to(self, device: torch.device | str):
        from pointcloud.structure import Point

        return Point.from_clouds(self.coords, self.feats, device=device)


class PointScene:
    """The engine's domain for one scene: gathers each planned tile's points and accumulates
    the net's logits per point.

    Args:
        xyz: ``(N, 3)`` coordinates in metres (float64 kept for UTM-size scenes).
        features: ``(N, F)`` float32 per-point features given to the net.
        tile_size: tile edge in metres (default 50).
        overlap: fraction of a tile shared with its neighbour, in [0, 1) (default 0.25); or give
            ``stride``.
        stride: tile step in metres.
        max_points: points budget per tile (default 200,000); denser tiles are cut into
            overlapping pieces until they fit. It also sizes the net's calls: consecutive tiles
            are packed into one call while they hold at most ``batch_size * max_points`` points
            together (see :meth:`batch_len`).
        plan: the tiles to run, planned by :func:`~pipelines.engine.tiling.plan_tiles` from
            ``xyz[:, :2]``; instead of ``tile_size``, ``overlap``, ``stride`` and ``max_points``,
            from which the scene plans its own.
        num_classes: logits per point (checked against the net's output).
        coords_in_features: put the tile-relative ``x, y, z`` before the features given to the net.

    Raises:
        ValueError: coordinates or features of the wrong shape, non-finite coordinates (readers
            drop them), a plan made for another number of points, or tiling options
            :func:`~pipelines.engine.tiling.plan_tiles` refuses.
        TypeError: both a plan and tiling options.
    """

    def __init__(
        self,
        xyz: np.ndarray | torch.Tensor,
        features: np.ndarray | torch.Tensor,
        *,
        tile_size: float | None = None,
        overlap: float | None = None,
        stride: float | None = None,
        max_points: int | None = None,
        plan: TilePlan | None = None,
        num_classes: int | None = None,
        coords_in_features: bool = False,
    ):
        xyz = np.asarray(xyz, dtype=np.float64)
        feats = np.asarray(features, dtype=np.float32)
        if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) == 0:
            raise ValueError(f"a scene needs (N, 3) coordinates with N > 0, got shape {xyz.shape}")
        if feats.ndim != 2 or len(feats) != len(xyz):
            raise ValueError(f"features must be (N={len(xyz)}, F), got shape {feats.shape}")
        if not np.isfinite(xyz).all():
            raise ValueError("the scene has NaN or inf coordinates; drop them when reading")
        if plan is None:
            plan = plan_tiles(xyz[:, :2], tile_size=50.0 if tile_size is None else tile_size,
                              overlap=0.25 if overlap is None else overlap, stride=stride,
                              budget=200_000 if max_points is None else max_points)
        elif (tile_size, overlap, stride, max_points) != (None,) * 4:
            raise TypeError("give PointScene a plan or the tiling options (tile_size, overlap, stride, max_points), not both")
        elif plan.n != len(xyz):
            raise ValueError(f"the plan was made for {plan.n} points, the scene has {len(xyz)}")
        self.n = len(xyz)
        self.xyz, self.feats = xyz, feats
        self.plan = plan
        self.tiles = plan.tiles
        self.order = plan.order  # sorted index i is point order[i]
        self.tile_size, self.stride, self.max_points, self.overlap = plan.tile_size, plan.stride, plan.budget, plan.overlap
        self.num_classes = num_classes
        self.coords_in_features = coords_in_features
        self.window_shape = ("tile", self.max_points)
        self._col_lo = plan.column_lo  # first sorted index any tile of a column can hold
        self._cap = plan.ring  # every tile's points lie in [_done, _done + _cap) when it is added
        self._ready: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # tile -> (members, weights), from gather
        self._next = 0
        self._done = 0  # sorted points [0, _done) are final
        self._acc: torch.Tensor | None = None  # (_cap, K) ring: sorted point i lives at row i % _cap
        self._acc_device: torch.device | None = None  # where the ring goes; None: the net's output device
        self._wsum = np.zeros(0, dtype=np.float32)
        self.uncovered = 0
        self.labels: np.ndarray | None = None

    # ---------------------------------------------------------------- domain API
    def windows(self) -> list[Tile]:
        return self.tiles

    def batch_len(self, start: int, batch_size: int) -> int:
        """Tiles from ``start`` that run in one call: as many consecutive tiles as hold at most
        ``batch_size * max_points`` points together, and at most ``batch_size * MAX_TILES_PER_CALL``.

        A tile holds at most ``max_points`` (unless its points share one xy position), so a call
        holds at least ``batch_size`` tiles (the budget the memory bound was set for), and a sparse
        scene's many small tiles share calls instead of paying the net's per-call cost each. The
        nets treat each tile of a call as its own cloud. Always at least 1.
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
        idx = self.plan.members(t)
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
            raise ValueError(f"the point net returned {got} for {n} points in {len(ts)} tile(s); expected ({n}, K)")
        if out.shape[1] < 1:
            raise ValueError(f"the point net returned 0 classes for {n} points; expected one logit per class")
        k = self.num_classes
        if k is not None and out.shape[1] != k:
            raise ValueError(f"the point net returned {out.shape[1]} classes per point; expected {k}")
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
                raise RuntimeError(f"tile {t.index} reaches past the accumulator ring of {self._cap} points; this is a tiling bug")
            pos = idx % self._cap
            rel = torch.as_tensor(pos, device=self._acc.device)
            wt = torch.as_tensor(w, device=self._acc.device)
            self._acc.index_add_(0, rel, part.to(self._acc.device) * wt[:, None])
            self._wsum[pos] += w  # a tile's points are distinct and span at most the ring: no repeats
            self._next += 1

    def finalize(self) -> np.ndarray:
        self._finalize_until(self.n)
        if self.uncovered:
            raise RuntimeError(f"{self.uncovered} of {self.n} points were not covered by any tile; this is a tiling bug")
        return self.labels


def segment_scene(
    engine: Engine,
    xyz: np.ndarray,
    features: np.ndarray,
    net,
    *,
    tile_size: float = 50.0,
    max_points: int = 200_000,
    progress: bool = False,
    coords_in_features: bool = False,
):
    """Per-point labels for a whole scene through ``engine`` (its settings give the tiles' overlap,
    the batch size, the device and autocast); returns ``(labels (N,), report)``."""
    if not isinstance(engine, Engine):
        raise TypeError(f"segment_scene takes an Engine first, got {type(engine).__name__}")
    scene = PointScene(xyz, features, tile_size=tile_size, overlap=engine.settings.overlap, max_points=max_points,
                       coords_in_features=coords_in_features)
    rep = EngineReport(windows_planned=len(scene.tiles))
    with bounded_onednn_cache():
        labels, rep = engine.run(scene, net, progress=progress, desc="tiles", report=rep)
    return labels, rep
