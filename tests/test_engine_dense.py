"""DenseGrid against MONAI's sliding_window_inference, and the engine's own behaviour."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from medvit.core.errors import MedvitError
from pipelines.engine import DenseGrid, Engine, InferenceSettings, plan_windows, segment_volume, sliding_window
from pipelines.engine.runner import mirrored


def random_net(in_ch: int, k: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_ch, 6, 3, padding=1), torch.nn.GELU(), torch.nn.Conv3d(6, k, 3, padding=1)
    ).eval()


def segment(x, net, *, engine=None, batch_size=4, overlap=0.5, mode="gaussian", mirror_axes=(), device="cpu", **kw):
    """``segment_volume`` through a fresh engine with these settings (or ``engine`` given them, keeping
    what it learnt)."""
    settings = InferenceSettings(overlap=overlap, batch_size=batch_size, mode=mode, mirror_axes=mirror_axes,
                                 device=device)
    return segment_volume(Engine(settings) if engine is None else engine.with_settings(settings), x, net, **kw)


def run(domain, net, batch_size=4, **kw):
    """A domain through a fresh engine."""
    return Engine(InferenceSettings(batch_size=batch_size)).run(domain, net, **kw)


CASES = [
    # shape, roi, overlap: odd shapes, roi larger than the volume in one axis, steps that don't divide
    ((23, 17, 30), (8, 8, 8), 0.5),
    ((5, 19, 14), (8, 8, 8), 0.25),
    ((16, 16, 16), (16, 16, 16), 0.5),
    ((31, 12, 9), (10, 12, 4), 0.6),
    ((7, 7, 7), (12, 10, 8), 0.5),
]


@pytest.mark.parametrize("shape, roi, overlap", CASES)
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_scores_equal_monai(shape, roi, overlap, mode):
    x = torch.randn(2, 2, *shape)
    net = random_net(2, 4, seed=sum(shape))
    with torch.no_grad():
        ref = sliding_window_inference(x, roi, 3, net, overlap=overlap, mode=mode)
    ours = sliding_window(x, net, roi_size=roi, sw_batch_size=3, overlap=overlap, mode=mode)
    assert ours.shape == ref.shape
    assert float((ours - torch.as_tensor(ref)).abs().max()) <= 1e-5


@pytest.mark.parametrize("shape, roi, overlap", CASES)
def test_labels_equal_argmax_of_monai(shape, roi, overlap):
    x = torch.randn(1, 1, *shape)
    net = random_net(1, 5, seed=7)
    with torch.no_grad():
        ref = sliding_window_inference(x, roi, 2, net, overlap=overlap, mode="gaussian").argmax(1)[0]
    grid, rep = segment(x[0], net, roi_size=roi, batch_size=2, overlap=overlap, output="both")
    assert grid.labels.dtype == torch.uint8
    # labels may differ only where two classes tie to within float rounding
    diff = grid.labels.long() != ref
    assert int(diff.sum()) == 0 or float(torch.sort(grid.scores, 0).values[-2:].diff(dim=0).abs()[0][diff].max()) < 1e-5
    assert rep.windows_run == rep.windows_planned and rep.windows_skipped == 0


def test_float_accumulator_spans_one_window_depth():
    """The float ring holds one window's depth, whatever the volume's depth and batch size."""
    x = torch.randn(1, 64, 12, 10)
    net = random_net(1, 3, seed=1)
    grid = DenseGrid(x, (8, 8, 8), overlap=0.5)
    ref, _ = segment(x, net, roi_size=(8, 8, 8), overlap=0.5, output="both", batch_size=1)
    run(grid, net, batch_size=7)
    assert grid._acc.shape == (3, 8, 12, 10)
    assert torch.equal(grid.labels, ref.labels)


def test_many_classes_use_wider_labels():
    x = torch.randn(1, 10, 10, 10)
    grid, _ = segment(x, random_net(1, 300, seed=2), roi_size=(8, 8, 8), overlap=0.5)
    assert grid.labels.dtype == torch.int32 and int(grid.labels.max()) < 300


def test_scores_stream_to_disk(tmp_path):
    x = torch.randn(1, 1, 20, 15, 9)
    net = random_net(1, 3, seed=3)
    with torch.no_grad():
        ref = sliding_window_inference(x, (8, 8, 8), 4, net, overlap=0.5, mode="gaussian")[0]
    grid, _ = segment(x[0], net, roi_size=(8, 8, 8), output="scores", scores_path=tmp_path / "p.npy")
    on_disk = np.load(tmp_path / "p.npy", mmap_mode="r")
    assert on_disk.shape == (3, 20, 15, 9)
    assert np.abs(on_disk - ref.numpy()).max() <= 1e-5


def test_skip_empty_windows_sets_background_and_counts():
    x = torch.zeros(1, 40, 16, 16)
    x[:, 2:10, 4:12, 4:12] = torch.rand(1, 8, 8, 8) + 1.0  # only the first windows see foreground
    net = random_net(1, 3, seed=4)
    full, rep_full = segment(x, net, roi_size=(8, 8, 8), overlap=0.5, output="labels")
    part, rep = segment(x, net, roi_size=(8, 8, 8), overlap=0.5, output="labels", skip_below=0.5)
    assert rep.windows_skipped > 0 and rep.windows_run + rep.windows_skipped == rep_full.windows_run
    # voxels covered only by skipped windows are background; the foreground region is unchanged
    covered_only_by_run = torch.zeros(40, dtype=torch.bool)
    for w in part.run:
        covered_only_by_run[w.start[0] : w.start[0] + 8] = True
    # every window overlapping the foreground holds foreground, so it ran: same labels there
    assert torch.equal(part.labels[2:10, 4:12, 4:12], full.labels[2:10, 4:12, 4:12])
    assert int(part.labels[~covered_only_by_run].max()) == 0


def test_mirror_tta_averages_flips():
    x = torch.randn(1, 1, 8, 8, 8)
    net = random_net(1, 2, seed=5)
    tta = mirrored(net, axes=(0, 1, 2))
    with torch.no_grad():
        expect = sum(torch.flip(net(torch.flip(x, d)), d) if d else net(x)
                     for d in ([], [2], [3], [2, 3], [4], [2, 4], [3, 4], [2, 3, 4])) / 8
        assert torch.allclose(tta(x), expect, atol=1e-6)
    grid, _ = segment(x[0], net, roi_size=(8, 8, 8), output="scores", mirror_axes=(0, 1, 2))
    assert torch.allclose(grid.scores, expect[0], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [(dict(overlap=1.0), ValueError, r"overlap must lie in \[0, 1\), got 1.0"), (dict(overlap=-0.1), ValueError, "overlap"),
     (dict(batch_size=0), ValueError, "batch_size must be at least 1, got 0"),
     (dict(batch_size=2.5), TypeError, "batch_size must be an integer"),
     (dict(overlap=[0.5, 0.5]), TypeError, "overlap must be a number"),
     (dict(mode="foo"), ValueError, "gaussian or constant"),
     (dict(mirror_axes=(-1,)), ValueError, "mirror axes"), (dict(mirror_axes=(3,)), ValueError, "mirror axes"),
     (dict(mirror_axes=(0, 0)), ValueError, "mirror axes"), (dict(device=3), TypeError, "device")],
)
def test_bad_settings_are_refused_when_built(kwargs, error, match):
    """Bad settings from code are bugs: ValueError/TypeError when built, before any window runs
    (also for a volume whose windows would all be skipped)."""
    with pytest.raises(error, match=match):
        InferenceSettings(**kwargs)


def test_bad_user_options_name_the_option():
    from pipelines.engine.checks import check_options

    for options, match in [(dict(overlap=1.5), r"--overlap must lie in \[0, 1\), got 1.5"),
                           (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
                           (dict(skip_below_hu=float("nan")), "--skip-below-hu must be a finite HU value")]:
        with pytest.raises(MedvitError, match=match):
            check_options(**options)
        with pytest.raises(MedvitError, match=match):
            InferenceSettings.from_sources(None, **options)


def test_settings_come_from_the_config_under_the_overrides():
    from medvit.config import InferConfig
    from pointcloud.config import SceneInferConfig

    s = InferenceSettings.from_sources(InferConfig(overlap=0.25, sw_batch_size=3, mode="constant"), tta=True)
    assert (s.overlap, s.batch_size, s.mode, s.mirror_axes, s.device.type) == (0.25, 3, "constant", (0, 1, 2), "cpu")
    s = InferenceSettings.from_sources(InferConfig(overlap=0.25, sw_batch_size=3), overlap=0.6, batch_size=1)
    assert (s.overlap, s.batch_size, s.mirror_axes) == (0.6, 1, ())
    s = InferenceSettings.from_sources(SceneInferConfig(overlap=0.1, batch_size=2))
    assert (s.overlap, s.batch_size) == (0.1, 2)
    assert s.amp_dtype is None  # autocast is for CUDA: on the CPU there is none


@pytest.mark.parametrize("kwargs, match", [(dict(overlap=[0.5, 0.5]), "one per spatial axis"),
                                           (dict(overlap=1.0), "overlap must lie in"), (dict(mode="foo"), "gaussian"),
                                           (dict(output="probs"), "labels, scores or both")])
def test_bad_grid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseGrid(torch.randn(1, 8, 8, 8), (8, 8, 8), **kwargs)


@pytest.mark.parametrize("step, match", [((4, 4), "three sizes"), ((12, 8, 8), "larger than the roi")])
def test_steps_that_would_leave_voxels_unscored_are_refused(step, match):
    with pytest.raises(ValueError, match=match):
        DenseGrid(torch.randn(1, 30, 30, 30), (8, 8, 8), step=step)


def test_one_size_stands_for_all_three_axes():
    x = torch.randn(1, 1, 20, 15, 9)
    net = random_net(1, 2, seed=6)
    a = sliding_window(x, net, roi_size=8)
    b = sliding_window(x, net, roi_size=(8, 8, 8))
    assert torch.equal(a, b)


def test_every_window_skipped_still_gives_zero_scores(tmp_path):
    x = torch.zeros(1, 20, 15, 9)
    grid, rep = segment(x, random_net(1, 3, 0), roi_size=8, output="both", skip_below=0.5, n_classes=3,
                               scores_path=tmp_path / "p.npy")
    assert rep.windows_run == 0 and int(grid.labels.max()) == 0
    on_disk = np.load(tmp_path / "p.npy")
    assert on_disk.shape == (3, 20, 15, 9) and not on_disk.any()
    with pytest.raises(ValueError, match="n_classes"):
        segment(x, random_net(1, 3, 0), roi_size=8, output="scores", skip_below=0.5)


def test_a_failed_run_leaves_no_scores_file(tmp_path):
    x = torch.randn(1, 24, 8, 8)
    calls = iter(range(100))

    def fails_on_third(t):
        if next(calls) == 2:
            raise RuntimeError("boom")
        return torch.zeros(t.shape[0], 2, *t.shape[2:])

    target = tmp_path / "p.npy"
    target.write_bytes(b"earlier")
    with pytest.raises(RuntimeError, match="boom"):
        segment(x, fails_on_third, roi_size=8, batch_size=1, output="scores", scores_path=target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy"] and target.read_bytes() == b"earlier"
    with pytest.raises(ValueError, match="written as a .npy file"):
        segment(x, fails_on_third, roi_size=8, output="scores", scores_path=tmp_path / "p.zarr")
    with pytest.raises(ValueError, match="no such folder"):
        segment(x, fails_on_third, roi_size=8, output="scores", scores_path=tmp_path / "nope" / "p.npy")


def test_predictor_with_wrong_shape_or_channels_is_named():
    x = torch.randn(1, 12, 12, 12)
    with pytest.raises(ValueError, match=r"expected \(2, K, 8, 8, 8\)"):
        segment(x, lambda t: t[:, :, :4], roi_size=(8, 8, 8), batch_size=2)
    calls = iter(range(100))
    flaky = lambda t: torch.zeros(t.shape[0], 2 + (next(calls) > 0), *t.shape[2:])  # noqa: E731
    with pytest.raises(ValueError, match="3 channels, earlier windows had 2"):
        segment(x, flaky, roi_size=(8, 8, 8), batch_size=1)
    with pytest.raises(ValueError, match="0 channels"):
        segment(x, lambda t: t[:, :0], roi_size=(8, 8, 8))


def test_nan_output_names_the_window():
    x = torch.randn(1, 16, 8, 8)

    def nan_in_second_half(t):
        out = torch.zeros(t.shape[0], 2, *t.shape[2:])
        out[t[:, 0, 0, 0, 0] > 100] = float("nan")
        return out

    x[0, 8, 0, 0] = 1000.0  # the window starting at depth 8 returns NaN
    with pytest.raises(MedvitError, match=r"NaN or inf for the window starting at voxel \(8, 0, 0\)"):
        segment(x, nan_in_second_half, roi_size=(8, 8, 8), overlap=0.5, batch_size=1)


def test_out_of_memory_lowers_the_batch_then_moves_to_cpu():
    """A predictor that runs out of memory above one window: the run adapts and still matches."""
    x = torch.randn(1, 20, 12, 12)
    net = random_net(1, 3, seed=6)

    def picky(t):
        if t.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")
        return net(t)

    ref, _ = segment(x, net, roi_size=(8, 8, 8), output="scores", batch_size=4)
    engine = Engine(InferenceSettings(batch_size=4))
    grid, rep = segment_volume(engine, x, picky, roi_size=(8, 8, 8), output="scores")
    assert rep.oom_events == 2 and rep.batch_size == 1
    assert torch.allclose(grid.scores, ref.scores, atol=1e-6)
    # remembered by the engine for the next case on the same device and window shape
    _, rep2 = segment_volume(engine, x, picky, roi_size=(8, 8, 8), output="scores")
    assert rep2.oom_events == 0 and rep2.batch_size == 1
    # a fresh engine has learnt nothing; one with other settings made from it shares the lesson
    assert segment_volume(Engine(InferenceSettings(batch_size=4)), x, net, roi_size=8)[1].batch_size == 4
    _, rep3 = segment_volume(engine.with_settings(overlap=0.25), x, picky, roi_size=(8, 8, 8), output="scores")
    assert rep3.oom_events == 0 and rep3.batch_size == 1


@pytest.mark.parametrize("prefetch", [False, True])
def test_out_of_memory_while_cropping_a_batch_is_retried(prefetch, monkeypatch):
    """With the input on the GPU (no prefetch) the crops are stacked on the device and can run out
    of memory too: in the first batch's crop, or in the crop retried after the net ran out. Found
    by review: those two crops ran outside the runner's handling and the error escaped."""
    x = torch.randn(1, 12, 8, 8)
    net = random_net(1, 2, seed=9)
    ref, _ = run(DenseGrid(x, (6, 6, 6), overlap=0.5, output="scores"), net, batch_size=4, prefetch=prefetch)
    fails = [1]

    class Picky(DenseGrid):
        def gather(self, ws):
            if len(ws) > 1 and fails:
                fails.pop()
                raise torch.OutOfMemoryError("simulated: a stack of crops")
            return super().gather(ws)

    calls = []

    def net_fails_first(t):
        calls.append(1)
        if len(calls) == 1:
            fails.append(1)  # and the crop retried after it fails too
            raise torch.OutOfMemoryError("simulated: the net")
        return net(t)

    for predictor in (net, net_fails_first):
        fails[:] = [1] if predictor is net else []
        grid, rep = run(Picky(x, (6, 6, 6), overlap=0.5, output="scores"), predictor, batch_size=4,
                                prefetch=prefetch)
        assert rep.oom_events >= 1 and rep.batch_size < 4
        assert torch.allclose(grid.scores, ref.scores, atol=1e-6)


def test_out_of_memory_while_the_ring_is_allocated_is_retried(monkeypatch):
    """An out-of-memory error in the accumulator's first allocation leaves the grid as it was:
    the runner's retry (at batch 1, then on the CPU) sets it up again and the scores match."""
    import sys

    from pipelines.engine import dense

    x = torch.randn(1, 20, 12, 12)
    net = random_net(1, 3, seed=7)
    ref, _ = segment(x, net, roi_size=(8, 8, 8), output="scores", batch_size=2)
    zeros, failed = torch.zeros, []

    def zeros_failing_twice(*a, **k):
        if len(failed) < 2 and sys._getframe(1).f_code.co_name == "_setup":
            failed.append(1)
            raise torch.OutOfMemoryError("simulated")
        return zeros(*a, **k)

    monkeypatch.setattr(dense.torch, "zeros", zeros_failing_twice)
    grid, rep = segment(x, net, roi_size=(8, 8, 8), output="scores", batch_size=2)
    assert rep.oom_events == 2 and "accumulating on the CPU" in rep.notes[-1]
    assert torch.allclose(grid.scores, ref.scores, atol=1e-6)


def test_accumulating_on_the_cpu_is_remembered_for_as_large_an_accumulator(monkeypatch):
    """After the device could not hold the accumulator, the next case whose accumulator is at
    least that large starts on the CPU without an error; a smaller one still tries the device."""
    import sys

    from pipelines.engine import dense

    zeros, limit = torch.zeros, 3 * 8 * 16 * 16 * 4  # bytes of "device" memory for a ring

    def device_holds_little(*a, **k):
        frame = sys._getframe(1)
        if frame.f_code.co_name == "_setup" and frame.f_locals["self"].acc_device is None:
            if "device" in k and torch.Size(a[0]).numel() * 4 > limit:  # the ring, not the CPU outputs
                raise torch.OutOfMemoryError("simulated")
        return zeros(*a, **k)

    monkeypatch.setattr(dense.torch, "zeros", device_holds_little)
    big, small = torch.randn(1, 20, 24, 24), torch.randn(1, 20, 12, 12)
    net = random_net(1, 3, seed=8)
    engine = Engine()
    _, rep = segment(big, net, engine=engine, roi_size=(8, 8, 8), batch_size=1)
    assert rep.oom_events == 1 and "accumulating on the CPU" in rep.notes[-1]
    _, rep = segment(big, net, engine=engine, roi_size=(8, 8, 8), batch_size=1)
    assert rep.oom_events == 0 and rep.notes == ["accumulating on the CPU: remembered from an earlier out-of-memory error"]
    grid, rep = segment(small, net, engine=engine, roi_size=(8, 8, 8), batch_size=1, output="scores")
    assert rep.oom_events == 0 and rep.notes == []
    monkeypatch.setattr(dense.torch, "zeros", zeros)
    ref, _ = segment(small, net, roi_size=(8, 8, 8), batch_size=1, output="scores")
    assert torch.equal(grid.scores, ref.scores)


def test_input_goes_to_the_gpu_only_when_it_fits(monkeypatch):
    """The whole input is copied to the GPU once when it takes at most a quarter of its free memory."""
    from pipelines.engine import dense

    x = torch.zeros(1, 64, 64, 64)  # 1 MiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 << 20, 80 << 30))
    assert dense.fits_on_device(x, torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: ((4 << 20) - 4, 80 << 30))
    assert not dense.fits_on_device(x, torch.device("cuda"))


def test_without_the_copy_thread_the_output_is_the_same():
    """Windows cropped in the launching thread (input already on the device) give the same scores."""
    x = torch.randn(1, 21, 18, 13)
    net = random_net(1, 3, seed=9)
    with_thread, _ = run(DenseGrid(x, (8, 8, 8), output="scores"), net, batch_size=3, prefetch=True)
    without, _ = run(DenseGrid(x, (8, 8, 8), output="scores"), net, batch_size=3, prefetch=False)
    assert torch.equal(with_thread.scores, without.scores)
    _, rep = segment(x, net, roi_size=(8, 8, 8), device="cpu")
    assert rep.input_device == "cpu"


def test_skip_source_decides_which_windows_run():
    """The empty-window test can look at another volume on the same grid (HU before clipping)."""
    x = torch.zeros(1, 24, 10, 10)  # what a clipping window leaves: nothing to tell apart
    hu = torch.full((1, 24, 10, 10), -1000.0)
    hu[:, 1:4, 2:5, 2:5] = -400.0  # lung-like tissue at the front, below the window's floor
    net = random_net(1, 3, seed=5)
    grid, rep = segment(x, net, roi_size=(8, 12, 12), overlap=0.5, skip_below=-500.0, skip_source=hu)
    assert rep.windows_run == 1 and rep.windows_skipped == rep.windows_planned - 1  # padded to 12: one window holds it
    assert grid.run[0].start[0] == 0
    with pytest.raises(ValueError, match="skip_source must be"):
        DenseGrid(x, (8, 8, 8), skip_below=0.0, skip_source=hu[:, :5])


def test_padding_never_counts_as_foreground_for_a_negative_threshold():
    """Below the roi in depth, the image is zero-padded: with a threshold under 0 that padding made
    every window look non-empty (found by review; 0 of 4 skipped at depth 6, 4 of 4 at depth 8)."""
    net = random_net(1, 2, seed=10)
    for depth in (6, 8):
        _, rep = segment(torch.full((1, depth, 10, 10), -1.0), net, roi_size=(8, 8, 8), skip_below=-0.5)
        assert rep.windows_skipped == rep.windows_planned == 4


def test_full_batches_feed_one_batch_shape_and_keep_the_output(monkeypatch):
    """A compiled predictor sees one batch shape: the short last batch is filled, its filler dropped."""
    x = torch.randn(1, 21, 18, 13)
    net = random_net(1, 3, seed=4)
    seen = []

    def pred(t):
        seen.append(t.shape[0])
        return net(t)

    want, rep = segment(x, net, roi_size=(8, 8, 8), batch_size=7, output="scores")
    assert rep.windows_run % 7 != 0  # the case this test is about: a short last batch
    got, _ = segment(x, pred, roi_size=(8, 8, 8), batch_size=7, output="scores", full_batches=True)
    assert set(seen) == {7}
    assert torch.equal(got.scores, want.scores)


@pytest.mark.parametrize("kind", [tuple, list])
def test_a_deep_supervision_output_is_read_by_its_full_resolution_first_element(kind):
    x = torch.randn(1, 13, 11, 9)
    net = random_net(1, 3, seed=7)

    def deep(t):  # (full, half) as a deep-supervision net in training mode returns them
        y = net(t)
        return kind([y, torch.nn.functional.avg_pool3d(y, 2)])

    plain, _ = segment(x, net, roi_size=(8, 8, 8), output="both", mirror_axes=(1,))
    got, _ = segment(x, deep, roi_size=(8, 8, 8), output="both", mirror_axes=(1,))
    assert torch.equal(got.scores, plain.scores) and torch.equal(got.labels, plain.labels)
    got, _ = segment(x, deep, roi_size=(8, 8, 8), output="scores")
    assert torch.allclose(got.scores, segment(x, net, roi_size=(8, 8, 8), output="scores")[0].scores)


@pytest.mark.parametrize("shape, roi, overlap", CASES + [((40, 9, 33), (8, 8, 8), 0.0), ((50, 50, 50), (16, 12, 20), 0.9)])
def test_plan_windows_covers_every_voxel_with_monais_windows(shape, roi, overlap):
    """The pure planner: as many windows as MONAI runs, each inside the padded volume, every voxel covered."""
    calls = []

    def counting(t):
        calls.append(t.shape[0])
        return t[:, :1]

    sliding_window_inference(torch.zeros(1, 1, *shape), roi, 1, counting, overlap=overlap)
    windows = plan_windows(shape, roi, overlap)
    assert len(windows) == sum(calls)
    padded = [max(s, r) for s, r in zip(shape, roi)]
    covered = torch.zeros(padded, dtype=torch.bool)
    for w in windows:
        assert all(0 <= s <= p - r for s, p, r in zip(w.start, padded, roi))
        covered[w.start[0] : w.start[0] + roi[0], w.start[1] : w.start[1] + roi[1], w.start[2] : w.start[2] + roi[2]] = True
    assert bool(covered.all())
    assert [w.start for w in windows] == sorted(w.start for w in windows) and [w.index for w in windows] == list(range(len(windows)))


@pytest.mark.parametrize("args, match", [(((0, 8, 8), 8), "shape"), (((8, 8, 8), (8, 8)), "roi_size"),
                                         (((8, 8, 8), 8, 1.0), "overlap must lie in")])
def test_plan_windows_refuses_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        plan_windows(*args)


def test_the_importance_map_cache_is_bounded_and_least_recently_used():
    engine = Engine(cache_size=2)
    a = engine.importance_map((4, 4, 4), "gaussian", 0.125, torch.float32, "cpu")
    engine.importance_map((6, 6, 6), "gaussian", 0.125, torch.float32, "cpu")
    assert engine.importance_map((4, 4, 4), "gaussian", 0.125, torch.float32, "cpu") is a  # a hit, now the newest
    engine.importance_map((8, 8, 8), "constant", 0.125, torch.float32, "cpu")  # evicts (6, 6, 6)
    assert len(engine._cache) == 2
    assert engine.importance_map((4, 4, 4), "gaussian", 0.125, torch.float32, "cpu") is a
    # a grid run through the engine blends with the engine's map: the same scores as MONAI's
    x = torch.randn(1, 1, 13, 11, 9)
    net = random_net(1, 3, seed=11)
    with torch.no_grad():
        ref = sliding_window_inference(x, (4, 4, 4), 2, net, overlap=0.5, mode="gaussian")
    assert float((sliding_window(x, net, roi_size=4, engine=engine) - ref).abs().max()) <= 1e-5
    assert len(engine._cache) == 2


def test_sliding_window_takes_an_engine_or_options_not_both():
    x = torch.randn(1, 1, 8, 8, 8)
    with pytest.raises(TypeError, match="either an engine or overlap"):
        sliding_window(x, random_net(1, 2, 0), roi_size=8, overlap=0.25, engine=Engine())
