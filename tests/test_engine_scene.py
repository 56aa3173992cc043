"""PointScene: tiles, budget splits, weighted per-point merging, coverage, bounded accumulators."""

import os
import sys

import numpy as np
import pytest
import torch

from medvit.core.errors import MedvitError
from pipelines.engine import Engine, InferenceSettings, PointScene, segment_scene
from pipelines.engine import points as scene_module
from pipelines.engine.tiling import plan_tiles


def run(domain, net, batch_size=4, engine=None):
    """A domain through a fresh engine with ``batch_size`` (or ``engine``, keeping what it learnt)."""
    settings = InferenceSettings(batch_size=batch_size)
    return (Engine(settings) if engine is None else engine.with_settings(settings)).run(domain, net)


def labels_of(xyz, feats, net, *, overlap=0.25, batch_size=1, **kw):
    """``segment_scene`` through a fresh engine with these settings."""
    return segment_scene(Engine(InferenceSettings(overlap=overlap, batch_size=batch_size)), xyz, feats, net, **kw)


class LinearPointNet(torch.nn.Module):
    """Logits that depend on the tile-relative position, so overlapping tiles disagree."""

    def __init__(self, k: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(4, k)

    def forward(self, point):
        return self.lin(torch.cat([point.coord / 10.0, point.feat[:, :1]], 1))


def scene(n=4000, extent=(120.0, 60.0), seed=0):
    rng = np.random.default_rng(seed)
    xyz = np.c_[rng.uniform(0, extent[0], n), rng.uniform(0, extent[1], n), rng.normal(0, 1, n)]
    xyz[:, :2] += (500_000.0, 5_400_000.0)  # UTM-size coordinates
    feats = rng.uniform(0, 1, (n, 2)).astype(np.float32)
    return xyz, feats


def reference_labels(sc: PointScene, net) -> np.ndarray:
    """Every tile's weighted logits summed into a full (N, K) array: the memory-hungry way."""
    acc = np.zeros((sc.n, 4), np.float64)
    wsum = np.zeros(sc.n)
    for t in sc.tiles:
        idx, w = sc._tile_points(t)
        with torch.no_grad():
            out = net(sc.gather([t]).to("cpu")).numpy()
        acc[idx] += out * w[:, None]
        wsum[idx] += w
    lab_sorted = (acc / wsum[:, None]).argmax(1)
    lab = np.empty(sc.n, int)
    lab[sc.order] = lab_sorted
    return lab


def test_labels_equal_full_memory_reference_and_input_order():
    xyz, feats = scene()
    net = LinearPointNet()
    sc = PointScene(xyz, feats, tile_size=30.0, overlap=0.5, max_points=10_000)
    labels, rep = run(sc, net, batch_size=3)
    assert labels.shape == (len(xyz),) and labels.dtype == np.uint8
    ref = reference_labels(PointScene(xyz, feats, tile_size=30.0, overlap=0.5, max_points=10_000), net)
    assert (labels == ref).mean() > 0.999  # float32 vs float64 sums may flip exact ties only
    assert rep.windows_run == len(sc.tiles) and sc.uncovered == 0


def test_labels_follow_points_through_the_sort():
    """A net that copies a per-point class from the features returns exactly that class per point."""
    xyz, feats = scene(seed=1)
    cls = np.random.default_rng(2).integers(0, 5, len(xyz))
    feats = np.c_[feats, cls].astype(np.float32)
    onehot = lambda p: torch.nn.functional.one_hot(p.feat[:, 2].long(), 5).float()  # noqa: E731
    labels, _ = labels_of(xyz, feats, onehot, tile_size=25.0, overlap=0.3, max_points=500, batch_size=2)
    assert np.array_equal(labels, cls)


def test_small_tiles_share_calls_up_to_the_points_budget():
    """A sparse scene's tiles are packed into calls of at most batch_size * max_points points
    (and batch_size * MAX_TILES_PER_CALL tiles); labels equal running every tile alone."""
    xyz, feats = scene(n=600, extent=(400.0, 200.0), seed=6)  # a handful of points a tile
    net = LinearPointNet(seed=6)
    sizes = []

    def counting(p):
        sizes.append((p.batch_size, p.num_points))
        return net(p)

    sc = PointScene(xyz, feats, tile_size=20.0, overlap=0.25, max_points=40)
    assert len(sc.tiles) > 300
    labels, rep = run(sc, counting, batch_size=2)
    assert sum(b for b, _ in sizes) == len(sc.tiles) == rep.windows_run and rep.calls == len(sizes)
    assert len(sizes) < len(sc.tiles) / 5
    assert max(n for _, n in sizes) <= 2 * 40
    assert max(b for b, _ in sizes) <= 2 * scene_module.MAX_TILES_PER_CALL
    assert np.array_equal(labels, reference_labels(sc, net))
    # a call never holds fewer tiles than the batch size asked for
    sc = PointScene(xyz, feats, tile_size=20.0, overlap=0.25, max_points=40)
    assert all(sc.batch_len(i, 3) >= min(3, len(sc.tiles) - i) for i in range(len(sc.tiles)))


def test_one_tile_a_call_after_out_of_memory_is_remembered_for_the_next_scene(monkeypatch):
    """Packed calls that run out of memory at batch 1 fall back to one tile a call; the next
    scene on the same device and budget starts there instead of paying the error again."""
    xyz, feats = scene(n=600, extent=(400.0, 200.0), seed=6)
    net = LinearPointNet(seed=6)

    def one_tile_only(p):
        if p.batch_size > 1:
            raise torch.OutOfMemoryError("simulated")
        return net(p)

    kw = dict(tile_size=20.0, overlap=0.25, max_points=40)
    ref, _ = run(PointScene(xyz, feats, **kw), net, batch_size=1)
    engine = Engine()
    first, rep = run(PointScene(xyz, feats, **kw), one_tile_only, batch_size=1, engine=engine)
    assert rep.oom_events == 1 and "one window a call" in rep.notes[-1]
    again, rep2 = run(PointScene(xyz, feats, **kw), one_tile_only, batch_size=1, engine=engine)
    assert rep2.oom_events == 0 and rep2.calls == rep2.windows_run and "remembered" in rep2.notes[0]
    assert np.array_equal(first, ref) and np.array_equal(again, ref)


def cut_scene(kind: str) -> tuple[np.ndarray, dict]:
    """Scenes whose tiles the planner cuts (tests/test_tiling.py checks the cuts themselves)."""
    rng = np.random.default_rng(3)
    if kind == "halves":  # 2,000 points in one 40 m tile, 1,500 a tile
        return scene(n=2000, extent=(40.0, 40.0), seed=4)[0], dict(tile_size=40.0, overlap=0.25, max_points=1500)
    if kind == "strips":  # a 1 m lattice, 125 a tile: strips each cut across
        g = np.arange(40) + 0.5
        return np.c_[np.repeat(g, 40), np.tile(g, 40), np.zeros(1600)], dict(tile_size=40.0, overlap=0.25, max_points=125)
    if kind == "blob":  # runs of points cut at once
        r = np.random.default_rng(1)
        xyz = np.r_[np.c_[r.uniform(0, 50, (2000, 2)), np.zeros(2000)], np.c_[r.normal(25, 0.5, (20000, 2)), np.zeros(20000)]]
        xyz[:, :2] += (500_000.0, 5_400_000.0)
        return xyz, dict(tile_size=50.0, overlap=0.5, max_points=1000)
    if kind == "cluster":  # a 2 m cluster inside the halves' overlap, cut at its box
        xyz = np.c_[rng.uniform(24, 26, (4000, 2)), rng.normal(0, 1, 4000)]
        return np.r_[xyz, [[0.0, 0.0, 0.0], [50.0, 50.0, 0.0]]], dict(tile_size=50.0, overlap=0.25, max_points=1000)
    # a pole at one xy among scattered points: one over-budget tile holds it
    pole = np.c_[np.full(1500, 20.0), np.full(1500, 20.0), np.linspace(0, 10, 1500)]
    xyz = np.r_[np.random.default_rng(0).uniform([0, 0, 0], [40, 40, 5], (1500, 3)), pole]
    return xyz, dict(tile_size=50.0, overlap=0.25, max_points=150)


@pytest.mark.parametrize("kind", ["halves", "strips", "blob", "cluster", "pole"])
def test_labels_over_cut_tiles_equal_the_full_memory_reference(kind):
    xyz, kw = cut_scene(kind)
    feats = np.random.default_rng(0).uniform(0, 1, (len(xyz), 1)).astype(np.float32)
    sc = PointScene(xyz, feats, **kw)
    assert any(t.width < kw["tile_size"] or t.height < kw["tile_size"] for t in sc.tiles)
    net = LinearPointNet()
    labels, _ = run(sc, net, batch_size=2)
    assert sc.uncovered == 0
    np.testing.assert_array_equal(labels, reference_labels(sc, net))


def test_a_plan_made_apart_runs_to_the_same_labels():
    xyz, feats = scene(seed=3)
    kw = dict(tile_size=30.0, overlap=0.5, max_points=800)
    plan = plan_tiles(xyz[:, :2], tile_size=30.0, overlap=0.5, budget=800)
    sc = PointScene(xyz, feats, plan=plan)
    assert sc.tiles is plan.tiles and sc.max_points == 800 and sc.window_shape == ("tile", 800)
    net = LinearPointNet(seed=3)
    got, _ = run(sc, net, batch_size=2)
    want, _ = run(PointScene(xyz, feats, **kw), net, batch_size=2)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="not both"):
        PointScene(xyz, feats, plan=plan, tile_size=30.0)
    with pytest.raises(ValueError, match=f"made for {len(xyz)} points"):
        PointScene(xyz[:-1], feats[:-1], plan=plan)


def test_accumulator_holds_a_band_not_the_scene():
    xyz, feats = scene(n=20_000, extent=(400.0, 40.0))
    sc = PointScene(xyz, feats, tile_size=40.0, overlap=0.25)
    peak = [0]
    orig = sc.accumulate

    def spy(ts, out):
        orig(ts, out)
        peak[0] = max(peak[0], sc._acc.shape[0])

    sc.accumulate = spy
    run(sc, LinearPointNet(), batch_size=1)
    assert peak[0] < len(xyz) / 5  # about two tile widths of a 400 m scene


def test_center_weights_favour_the_tile_a_point_is_central_in():
    sc = PointScene(np.array([[0.0, 0, 0], [100.0, 0, 0]]), np.zeros((2, 1)), tile_size=100.0, overlap=0.5)
    t = sc.tiles[0]
    idx, w = sc._tile_points(t)
    assert w.max() <= 1 and w.min() >= 1e-6


@pytest.mark.parametrize(
    "xyz, kwargs, match",
    [
        (np.zeros((0, 3)), {}, "N > 0"),
        (np.array([[0.0, np.nan, 0.0]]), {}, "NaN"),
        (np.zeros((3, 3)), {"max_points": 0}, "budget"),
        (np.zeros((3, 3)), {"tile_size": 0}, "tile_size"),
        (np.zeros((3, 3)), {"tile_size": float("nan")}, "tile_size"),
        (np.zeros((3, 3)), {"max_points": float("nan")}, "budget"),
    ],
)
def test_bad_scenes(xyz, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        PointScene(xyz, np.zeros((len(xyz), 1)), **kwargs)


def test_a_bad_overlap_is_a_bad_argument():
    with pytest.raises(ValueError, match=r"overlap must lie in \[0, 1\), got 1.0"):
        PointScene(np.zeros((3, 3)), np.zeros((3, 1)), overlap=1.0)


def test_bad_net_outputs_are_named():
    xyz, feats = scene(n=500)
    with pytest.raises(ValueError, match="expected"):
        labels_of(xyz, feats, lambda p: torch.zeros(3, 4), tile_size=50.0)
    with pytest.raises(ValueError, match="0 classes"):
        labels_of(xyz, feats, lambda p: torch.zeros(p.num_points, 0), tile_size=50.0)

    def nan_net(p):
        out = torch.zeros(p.num_points, 3)
        out[0] = float("nan")
        return out

    with pytest.raises(MedvitError, match=r"NaN or inf for the tile at x="):
        labels_of(xyz, feats, nan_net, tile_size=50.0)


def test_points_on_tile_edges_at_utm_scale():
    """Points exactly on column starts and ends, at UTM-size x: every one merged, none lost or double-finalised."""
    rng = np.random.default_rng(7)
    edges = 512_345.678 + np.arange(0, 400, 15.0)  # column starts and ends for tile 20 m, stride 15 m
    x = np.r_[rng.choice(edges, 6000), rng.uniform(edges[0], edges[-1], 6000)]
    xyz = np.c_[x, rng.uniform(0, 60, len(x)) + 5.4e6, rng.normal(0, 1, len(x))]
    feats = rng.uniform(0, 1, (len(x), 1)).astype(np.float32)
    net = LinearPointNet()
    sc = PointScene(xyz, feats, tile_size=20.0, overlap=0.25, max_points=400)
    labels, _ = run(sc, net, batch_size=2)
    ref = reference_labels(PointScene(xyz, feats, tile_size=20.0, overlap=0.25, max_points=400), net)
    assert sc.uncovered == 0 and (labels == ref).mean() > 0.999


def test_accumulator_ring_is_as_wide_as_the_widest_band_and_wraps():
    """The ring sized at plan time equals the widest live band of the run; over a long strip
    it wraps many times, and every point still gets exactly its own class."""
    xyz, feats = scene(n=6000, extent=(600.0, 20.0), seed=4)
    cls = np.random.default_rng(5).integers(0, 5, len(xyz))
    feats = np.c_[feats, cls].astype(np.float32)
    onehot = lambda p: torch.nn.functional.one_hot(p.feat[:, 2].long(), 5).float()  # noqa: E731
    sc = PointScene(xyz, feats, tile_size=10.0, overlap=0.25, max_points=60)
    reached, widest = [0], [0]
    orig = sc.accumulate

    def spy(ts, out):
        orig(ts, out)
        for t in ts:
            reached[0] = max(reached[0], int(sc._tile_points(t)[0].max()) + 1)
        widest[0] = max(widest[0], reached[0] - sc._done)  # live band: [done, furthest point added)

    sc.accumulate = spy
    labels, _ = run(sc, onehot, batch_size=2)
    assert sc._acc.shape[0] == sc._cap == widest[0]
    assert len(xyz) > 10 * sc._cap  # wrapped many times
    assert np.array_equal(labels, cls) and sc.uncovered == 0
    assert not sc._acc.any() and not sc._wsum.any()  # every row cleared when its point was final
    net = LinearPointNet()
    labels, _ = run(PointScene(xyz, feats[:, :2], tile_size=10.0, overlap=0.25, max_points=60), net, batch_size=3)
    ref = reference_labels(PointScene(xyz, feats[:, :2], tile_size=10.0, overlap=0.25, max_points=60), net)
    assert (labels == ref).mean() > 0.999


def test_onednn_cache_bound_holds_for_the_run_only(monkeypatch):
    var = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
    monkeypatch.delenv(var, raising=False)
    seen = []

    def net(p):
        seen.append(os.environ.get(var))
        return torch.zeros(p.num_points, 3)

    xyz, feats = scene(n=500)
    labels_of(xyz, feats, net, tile_size=50.0)
    assert seen and set(seen) == {str(scene_module.ONEDNN_CACHE_CAPACITY)}
    assert var not in os.environ  # removed afterwards: child processes do not inherit it
    monkeypatch.setenv(var, "1024")  # a value the user set wins and stays
    seen.clear()
    labels_of(xyz, feats, net, tile_size=50.0)
    assert set(seen) == {"1024"} and os.environ[var] == "1024"


def test_tile_members_are_found_once_and_survive_an_out_of_memory_retry(monkeypatch):
    """gather hands each tile's members and weights to accumulate (no second search); a batch
    retried after an out-of-memory error still merges to the same labels."""
    xyz, feats = scene(seed=4)
    net = LinearPointNet(seed=4)
    kw = dict(tile_size=30.0, overlap=0.5, max_points=10_000)
    calls = []
    original = PointScene._tile_points
    monkeypatch.setattr(PointScene, "_tile_points", lambda self, t: calls.append(t.index) or original(self, t))
    sc = PointScene(xyz, feats, **kw)
    ref, _ = run(sc, net, batch_size=2)
    assert sorted(calls) == [t.index for t in sc.tiles] and not sc._ready

    def picky(p):
        if p.batch_size > 1:
            raise torch.OutOfMemoryError("simulated")
        return net(p)

    sc = PointScene(xyz, feats, **kw)
    labels, rep = run(sc, picky, batch_size=2)
    assert rep.oom_events >= 1 and np.array_equal(labels, ref) and not sc._ready


def test_tiles_are_gathered_as_arrays_and_made_into_tensors_on_the_runner_thread(monkeypatch):
    # torch ops on the copy thread slowed the point nets 2x on the CPU (see scene.TileBatch)
    import threading

    xyz, feats = scene()
    sc = PointScene(xyz, feats, tile_size=30.0, overlap=0.5, max_points=10_000)
    batch = sc.gather(sc.tiles[:2])
    assert all(isinstance(a, np.ndarray) for a in batch.coords + batch.feats)
    made_on = []
    to = scene_module.TileBatch.to

    def spy(self, device):
        made_on.append(threading.current_thread())
        return to(self, device)

    net = LinearPointNet()
    want, _ = run(PointScene(xyz, feats, tile_size=30.0, overlap=0.5, max_points=10_000), net, batch_size=2)
    monkeypatch.setattr(scene_module.TileBatch, "to", spy)
    got, _ = run(PointScene(xyz, feats, tile_size=30.0, overlap=0.5, max_points=10_000), net, batch_size=2)
    assert made_on and all(t is threading.main_thread() for t in made_on)
    np.testing.assert_array_equal(got, want)


def test_out_of_memory_while_the_ring_is_allocated_or_the_tiles_copied_is_retried(monkeypatch):
    """Out of memory in the accumulator's first allocation, or in the copy of a batch to the
    device, is handled like one in the net: the retry gives the same labels."""
    xyz, feats = scene(seed=5)
    net = LinearPointNet(seed=5)
    kw = dict(tile_size=30.0, overlap=0.5, max_points=1000)  # several calls, a few tiles each
    ref, _ = run(PointScene(xyz, feats, **kw), net, batch_size=2)

    zeros, failed = torch.zeros, []

    def zeros_once(*a, **k):
        if not failed and sys._getframe(1).f_code.co_name == "accumulate":  # the ring's allocation
            failed.append(1)
            raise torch.OutOfMemoryError("simulated")
        return zeros(*a, **k)

    monkeypatch.setattr(scene_module.torch, "zeros", zeros_once)
    labels, rep = run(PointScene(xyz, feats, **kw), net, batch_size=2)
    monkeypatch.setattr(scene_module.torch, "zeros", zeros)
    assert failed and rep.oom_events == 1 and np.array_equal(labels, ref)

    to, copies = scene_module.TileBatch.to, []

    def to_once(self, device):
        copies.append(1)
        if len(copies) == 2:
            raise torch.OutOfMemoryError("simulated")
        return to(self, device)

    monkeypatch.setattr(scene_module.TileBatch, "to", to_once)
    labels, rep = run(PointScene(xyz, feats, **kw), net, batch_size=2)
    assert rep.oom_events == 1 and np.array_equal(labels, ref)


def test_a_broken_plan_is_a_bug_with_its_traceback_not_a_user_error():
    xyz, feats = scene(n=2000)
    sc = PointScene(xyz, feats, tile_size=30.0, overlap=0.5, max_points=10_000)
    sc._cap = 1  # as if the plan had sized the accumulator ring too small
    with pytest.raises(RuntimeError, match="this is a tiling bug") as e:
        run(sc, LinearPointNet())
    assert not isinstance(e.value, MedvitError)
