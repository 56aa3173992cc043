"""plan_tiles without a net: coverage, the budget, the overlap, run order, the ring, and the
scenes the reviews found."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medvit.core.errors import MedvitError
from pipelines.engine.tiling import (
    MAX_TILE_GRID,
    TilePlan,
    check_scene_extent,
    plan_tiles,
)

REPO = Path(__file__).resolve().parents[1]
UTM = (500_000.0, 5_400_000.0)


def uniform(n, extent, seed=0, offset=(0.0, 0.0)):
    rng = np.random.default_rng(seed)
    return np.c_[rng.uniform(0, extent[0], n), rng.uniform(0, extent[1], n)] + offset


def boxes(plan: TilePlan) -> list[tuple[float, float, float, float]]:
    return [(t.x0, t.y0, t.width, t.height) for t in plan.tiles]


def held(plan: TilePlan) -> int:
    """Points the tiles hold, each point counted once per tile holding it."""
    return sum(t.n_points for t in plan.tiles)


def check_plan(plan: TilePlan, xy: np.ndarray) -> None:
    """Every guarantee of a plan, checked point by point against ``xy``."""
    xy = np.asarray(xy, np.float64)
    n = len(xy)
    assert plan.n == n and np.array_equal(np.sort(plan.order), np.arange(n))
    # x as the boxes see it: relative to the scene's minimum, in float32
    rel = np.c_[(xy[:, 0] - xy[:, 0].min()).astype(np.float32), (xy[:, 1] - xy[:, 1].min()).astype(np.float32)]
    assert np.all(np.diff(rel[plan.order, 0]) >= 0)  # order sorts the points by x
    covered = np.zeros(n, bool)
    done = 0
    widest = 0
    for i, t in enumerate(plan.tiles):
        assert t.index == i
        if i:  # column by column, pieces within a column by (x0, y0)
            p = plan.tiles[i - 1]
            assert (p.column, p.x0, p.y0) <= (t.column, t.x0, t.y0)
        m = plan.members(t)
        assert len(m) == t.n_points > 0 and len(np.unique(m)) == len(m)
        pts = xy[plan.order[m]]
        # the members are the points in the box, give or take a float32 step at its edges
        eps = 1e-4
        assert np.all((pts[:, 0] >= t.x0 - eps) & (pts[:, 0] <= t.x0 + t.width + eps))
        assert np.all((pts[:, 1] >= t.y0 - eps) & (pts[:, 1] <= t.y0 + t.height + eps))
        inside = ((xy[:, 0] >= t.x0) & (xy[:, 0] <= t.x0 + t.width)
                  & (xy[:, 1] >= t.y0) & (xy[:, 1] <= t.y0 + t.height))
        assert set(np.flatnonzero(inside)) <= set(plan.order[m])
        covered[plan.order[m]] = True
        if t.n_points > plan.budget:  # only points on one xy to float32 precision stay over budget
            assert len(np.unique(rel[plan.order[m]], axis=0)) == 1, t
        assert t.hi == m.max() + 1 and plan.column_lo[t.column] <= t.lo <= m.min()
        # replayed in run order, every tile's points lie in the ring's live band
        done = max(done, plan.column_lo[t.column])
        assert done <= m.min() and m.max() < done + plan.ring
        widest = max(widest, t.hi - done)
    assert covered.all(), f"{(~covered).sum()} of {n} points in no tile"
    assert plan.ring == max(widest, 1)  # and no wider than the run needs


def test_a_sparse_scene_is_the_grid_stepped_by_the_stride_the_last_tile_flush():
    xy = np.r_[uniform(500, (100.0, 60.0), offset=UTM), [UTM, (UTM[0] + 100, UTM[1] + 60)]]
    plan = plan_tiles(xy, tile_size=20.0, overlap=0.25, budget=10_000)
    check_plan(plan, xy)
    x0s = sorted({t.x0 - UTM[0] for t in plan.tiles})
    y0s = sorted({t.y0 - UTM[1] for t in plan.tiles})
    assert x0s == pytest.approx([0, 15, 30, 45, 60, 75, 80]) and y0s == pytest.approx([0, 15, 30, 40])
    assert {(t.width, t.height) for t in plan.tiles} == {(20.0, 20.0)}
    assert [t.column for t in plan.tiles] == sorted(t.column for t in plan.tiles)
    assert plan.tile_size == 20.0 and plan.stride == 15.0 and plan.overlap == 0.25


def test_a_stride_gives_the_same_plan_as_its_overlap():
    xy = uniform(800, (90.0, 50.0), seed=1)
    by_stride = plan_tiles(xy, tile_size=20.0, stride=10.0, budget=100)
    by_overlap = plan_tiles(xy, tile_size=20.0, overlap=0.5, budget=100)
    check_plan(by_stride, xy)
    assert by_stride.tiles == by_overlap.tiles and by_stride.overlap == 0.5


def test_a_scene_narrower_than_a_tile_is_one_tile_at_its_corner():
    xy = uniform(300, (10.0, 5.0), offset=UTM)
    plan = plan_tiles(xy, tile_size=50.0, budget=1000)
    check_plan(plan, xy)
    (t,) = plan.tiles
    assert (t.x0, t.y0, t.width, t.height, t.n_points) == (xy[:, 0].min(), xy[:, 1].min(), 50.0, 50.0, 300)


def test_one_point_is_one_tile():
    plan = plan_tiles(np.array([[3.0, -4.0]]), tile_size=50.0, budget=1)
    check_plan(plan, np.array([[3.0, -4.0]]))
    assert len(plan.tiles) == 1 and plan.tiles[0].n_points == 1 and plan.ring == 1


@pytest.mark.parametrize(
    "xy, kwargs, match",
    [
        (np.zeros((0, 2)), {}, "N > 0"),
        (np.zeros((3, 3)), {}, r"\(N, 2\)"),
        (np.array([[0.0, np.nan]]), {}, "NaN"),
        (np.array([[0.0, np.inf]]), {}, "NaN or inf"),
        (np.zeros((3, 2)), {"overlap": 1.0}, "overlap"),
        (np.zeros((3, 2)), {"overlap": -0.1}, "overlap"),
        (np.zeros((3, 2)), {"stride": 0.0}, "stride"),
        (np.zeros((3, 2)), {"stride": 60.0}, "stride"),
        (np.zeros((3, 2)), {"budget": 0}, "budget"),
        (np.zeros((3, 2)), {"budget": float("nan")}, "budget"),
        (np.zeros((3, 2)), {"tile_size": 0}, "tile_size"),
        (np.zeros((3, 2)), {"tile_size": float("nan")}, "tile_size"),
    ],
)
def test_bad_plans_are_refused(xy, kwargs, match):
    kw = dict(tile_size=50.0, budget=10) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        plan_tiles(xy, **kw)


def test_stray_points_far_away_are_the_users_error():
    xy = np.array([[0.0, 0.0], [1e7, 0.0], [0.0, 1e7]])
    with pytest.raises(MedvitError, match="stray points"):
        plan_tiles(xy, tile_size=50.0, budget=10)


def test_the_extent_check_counts_tile_positions():
    side = 49.0 * (2000 - 1) + 50  # exactly 2,000 x 2,000 positions at 50 m tiles and 1 m overlap
    check_scene_extent(np.array([[0.0, 0.0], [side, side]]), 50.0, 49.0)
    with pytest.raises(MedvitError, match=f"at most {MAX_TILE_GRID:,}"):
        check_scene_extent(np.array([[0.0, 0.0, 0.0], [side + 49, side, 0.0]]), 50.0, 49.0)


def test_the_planner_needs_no_torch():
    """The planner and the option checks import numpy and the error types only."""
    code = ("import sys, numpy as np; from pipelines.engine.tiling import plan_tiles; "
            "plan_tiles(np.random.default_rng(0).uniform(0, 100, (500, 2)), tile_size=20.0, budget=50); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'monai')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_dense_tiles_are_cut_to_the_budget():
    rng = np.random.default_rng(3)
    xy = np.r_[uniform(3000, (120.0, 60.0), offset=UTM), np.c_[rng.normal(UTM[0] + 10, 0.5, 6000),
                                                                 rng.normal(UTM[1] + 10, 0.5, 6000)]]
    plan = plan_tiles(xy, tile_size=40.0, overlap=0.25, budget=1500)
    check_plan(plan, xy)
    assert max(t.n_points for t in plan.tiles) <= 1500
    assert min(min(t.width, t.height) for t in plan.tiles) < 40.0


def test_a_tile_just_over_budget_is_halved_not_quartered():
    """One cut suffices: two pieces across the longer side, overlapping by the overlap fraction."""
    xy = uniform(2000, (40.0, 40.0), seed=4, offset=UTM)
    plan = plan_tiles(xy, tile_size=40.0, overlap=0.25, budget=1500)
    check_plan(plan, xy)
    x0, y0 = xy.min(0)
    got = [v for t in plan.tiles for v in (t.x0 - x0, t.y0 - y0, t.width, t.height)]
    assert got == pytest.approx([0.0, 0.0, 25.0, 40.0, 15.0, 0.0, 25.0, 40.0])
    in_both = int(((xy[:, 0] >= x0 + 15.0) & (xy[:, 0] <= x0 + 25.0)).sum())
    assert held(plan) == len(xy) + in_both


def test_halves_still_over_budget_are_halved_across_the_other_side():
    xy = uniform(3500, (40.0, 40.0), seed=5, offset=UTM)
    plan = plan_tiles(xy, tile_size=40.0, overlap=0.25, budget=1500)
    check_plan(plan, xy)
    assert len(plan.tiles) == 4 and {(t.width, t.height) for t in plan.tiles} == {(25.0, 25.0)}


def test_a_tile_far_over_budget_is_cut_once_into_strips_and_each_strip_once_across():
    """1,600 points on a 1 m lattice in a 40 m tile, 125 a tile: 6 strips of 10 m sharing
    2 overlap / (1 + overlap) = 0.4 of a strip (step 6 m), each cut once across."""
    g = np.arange(40) + 0.5
    xy = np.c_[np.repeat(g, 40), np.tile(g, 40)]
    plan = plan_tiles(xy, tile_size=40.0, overlap=0.25, budget=125)
    check_plan(plan, xy)
    assert {t.width for t in plan.tiles} == {10.0} and min(t.height for t in plan.tiles) == 10.0
    assert sorted({t.x0 - 0.5 for t in plan.tiles}) == pytest.approx([0, 6, 12, 18, 24, 30])
    assert len(plan.tiles) <= 36  # the last strip holds 10 columns, not 11, and fits in 5 pieces


@pytest.mark.parametrize("overlap, most", [(0.25, 4), (0.5, 15)])
def test_the_points_held_grow_linearly_with_the_cuts(overlap, most):
    """1,500 points in 40 m, 150 a tile: cut k ways at once, not halved level after level (which
    multiplies the points held by 1 + overlap per level)."""
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 40, (1500, 2))
    plan = plan_tiles(xy, tile_size=50.0, overlap=overlap, budget=150)
    check_plan(plan, xy)
    assert held(plan) < most * len(xy)


@pytest.mark.parametrize("overlap, most", [(0.25, 3.0), (0.5, 9.0)])
def test_a_dense_blob_is_cut_into_several_runs_at_once(overlap, most):
    """A 20k-point blob (0.5 m across) among 2,000 points, 1,000 a tile: several runs of points
    at once, not two at a time level after level."""
    rng = np.random.default_rng(1)
    xy = np.r_[rng.uniform(0, 50, (2000, 2)), rng.normal(25, 0.5, (20000, 2))] + UTM
    plan = plan_tiles(xy, tile_size=50.0, overlap=overlap, budget=1000)
    check_plan(plan, xy)
    assert max(t.n_points for t in plan.tiles) <= 1000 and held(plan) < most * len(xy)


def test_a_dense_cluster_inside_the_halves_overlap_is_cut_at_its_own_box():
    """A 2 m cluster in a 50 m tile's middle sits in both halves' overlap: the tile is cut at the
    cluster's box, so pieces fit the budget and no piece holds the whole cluster."""
    rng = np.random.default_rng(3)
    xy = np.r_[rng.uniform(24, 26, (4000, 2)), [[0.0, 0.0], [50.0, 50.0]]]  # with the tile's corners
    plan = plan_tiles(xy, tile_size=50.0, overlap=0.25, budget=1000)
    check_plan(plan, xy)
    assert max(t.n_points for t in plan.tiles) <= 1000 and len(plan.tiles) < 30
    assert len(set(boxes(plan))) == len(plan.tiles)  # a piece reached twice is made once


def test_points_at_one_xy_go_to_one_piece_not_to_every_piece():
    """A 1,500-point pole (one xy) among 1,500 scattered points, 150 a tile: the pole stays whole
    in one over-budget tile instead of being copied into both pieces at every depth."""
    rng = np.random.default_rng(0)
    xy = np.r_[rng.uniform(0, 40, (1500, 2)), np.full((1500, 2), 20.0)]
    plan = plan_tiles(xy, tile_size=50.0, overlap=0.25, budget=150)
    check_plan(plan, xy)
    whole = [t for t in plan.tiles if t.n_points > 150]
    assert len(whole) == 1 and whole[0].n_points == 1500  # the pole, alone: it cannot be cut
    assert held(plan) < 9000
    assert len(set(boxes(plan))) == len(plan.tiles)


def test_a_value_crowding_the_quantile_band_goes_to_one_piece():
    """A 100-point pole among 100 points, 150 a tile: the pole fills the band the two pieces would
    share, so the cut has no overlap and the pole is in one piece only (each point in one tile)."""
    rng = np.random.default_rng(0)
    xy = np.r_[rng.uniform(0, 40, (100, 2)), np.full((100, 2), 20.0)]
    plan = plan_tiles(xy, tile_size=50.0, overlap=0.5, budget=150)
    check_plan(plan, xy)
    assert len(plan.tiles) == 2 and held(plan) == len(xy)


@pytest.mark.parametrize("where", [(22.5, 22.5), (0.0, 0.0)])
def test_points_on_one_xy_position_make_one_tile_not_thousands(where):
    """Twenty points on one xy over a budget of ten cannot be cut: they stay in one or two
    over-budget tiles; a cut at the points parts only the corners from them."""
    xy = np.r_[np.full((20, 2), where), [[0.0, 0.0], [50.0, 50.0]]]
    plan = plan_tiles(xy, tile_size=50.0, overlap=0.25, budget=10)
    check_plan(plan, xy)
    assert len(plan.tiles) <= 3 and held(plan) <= 2 * 22


def test_points_closer_than_float32_far_from_the_scene_start_stay_covered():
    """x = 1000.5 and 1000.50001 are one float32 value relative to the scene's start: the cut at
    the points parts them, their boxes cannot, so they share one over-budget tile."""
    xy = np.array([[0.0, 0], [1000.50001, 0], [1000.5, 0]])
    plan = plan_tiles(xy, tile_size=4.0, overlap=0.0, budget=1)
    check_plan(plan, xy)
    assert max(t.n_points for t in plan.tiles) == 2


@pytest.mark.parametrize("size", [2.5, 4.0, 240.0])
def test_three_points_two_on_one_x_are_parted(size):
    """Cut along x, every piece would hold all three; the overlap-free cut parts them."""
    xy = np.array([[10.0, 87.3], [10.3, 87.3], [10.3, 89.5]])
    plan = plan_tiles(xy, tile_size=size, overlap=0.5, budget=2)
    check_plan(plan, xy)
    assert max(t.n_points for t in plan.tiles) <= 2


@pytest.mark.parametrize("kwargs", [dict(overlap=1 - 1e-9), dict(stride=1e-9), dict(overlap=0.999)])
def test_an_overlap_near_one_still_plans_a_few_pieces(kwargs):
    """Pieces overlap by at most 0.5, so an overlap near 1 does not ask for countless pieces."""
    xy = np.random.default_rng(0).uniform(0, 40, (1000, 2))
    plan = plan_tiles(xy, tile_size=50.0, budget=500, **kwargs)
    check_plan(plan, xy)
    assert len(plan.tiles) < 50 and max(t.n_points for t in plan.tiles) <= 500


def test_the_point_on_the_top_y_edge_is_covered():
    """The last tile starts at hi - size, and (hi - size) + size can round below hi: the box
    query allows for it (found by review: y -100, -70, -46.04265724722594 at 50 m tiles)."""
    xy = np.array([[0.0, -100.0], [1.0, -70.0], [2.0, -46.04265724722594]])
    plan = plan_tiles(xy, tile_size=50.0, overlap=0.25, budget=200_000)
    check_plan(plan, xy)
    assert len(plan.tiles) >= 2
    rng = np.random.default_rng(7)
    for _ in range(40):  # the review's random search
        xy = np.round(rng.uniform(-60, 10, (50, 2)), 2)
        check_plan(plan_tiles(xy, tile_size=50.0, overlap=0.25, budget=200_000), xy)


@pytest.mark.parametrize("budget", [400, 250])
def test_points_on_tile_edges_at_utm_scale_are_covered(budget):
    """Points exactly on column starts and ends at UTM-size x, whole tiles and cut ones."""
    rng = np.random.default_rng(7)
    edges = 512_345.678 + np.arange(0, 400, 15.0)  # column starts and ends for tile 20 m, stride 15 m
    x = np.r_[rng.choice(edges, 6000), rng.uniform(edges[0], edges[-1], 6000)]
    xy = np.c_[x, rng.uniform(0, 60, len(x)) + 5.4e6]
    plan = plan_tiles(xy, tile_size=20.0, overlap=0.25, budget=budget)
    check_plan(plan, xy)
    assert any(t.width < 20.0 or t.height < 20.0 for t in plan.tiles) == (budget < 400)


def test_a_long_strip_needs_a_ring_of_a_band_not_the_scene():
    xy = uniform(20_000, (400.0, 40.0), offset=UTM)
    plan = plan_tiles(xy, tile_size=40.0, overlap=0.25, budget=200_000)
    check_plan(plan, xy)
    assert plan.ring < len(xy) / 5  # about two tile widths of a 400 m scene


def test_members_are_the_same_from_another_thread():
    from concurrent.futures import ThreadPoolExecutor

    xy = uniform(5000, (200.0, 100.0), seed=9)
    plan = plan_tiles(xy, tile_size=20.0, overlap=0.5, budget=200)
    here = [plan.members(t) for t in plan.tiles]
    with ThreadPoolExecutor(2) as pool:
        there = list(pool.map(plan.members, plan.tiles))
    assert all(np.array_equal(a, b) for a, b in zip(here, there))
