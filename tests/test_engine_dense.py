"""DenseGrid against MONAI's sliding_window_inference, and the engine's own behaviour."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from medvit.core.errors import MedvitError
from pipelines.engine import DenseGrid, segment_volume, sliding_window
from pipelines.engine.runner import mirrored, run_windows


def random_net(in_ch: int, k: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(in_ch, 6, 3, padding=1), torch.nn.GELU(), torch.nn.Conv3d(6, k, 3, padding=1)
    ).eval()


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
    grid, rep = segment_volume(x[0], net, roi_size=roi, batch_size=2, overlap=overlap, output="both")
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
    ref, _ = segment_volume(x, net, roi_size=(8, 8, 8), overlap=0.5, output="both", batch_size=1)
    run_windows(grid, net, batch_size=7)
    assert grid._acc.shape == (3, 8, 12, 10)
    assert torch.equal(grid.labels, ref.labels)


def test_many_classes_use_wider_labels():
    x = torch.randn(1, 10, 10, 10)
    grid, _ = segment_volume(x, random_net(1, 300, seed=2), roi_size=(8, 8, 8), overlap=0.5)
    assert grid.labels.dtype == torch.int32 and int(grid.labels.max()) < 300


def test_scores_stream_to_disk(tmp_path):
    x = torch.randn(1, 1, 20, 15, 9)
    net = random_net(1, 3, seed=3)
    with torch.no_grad():
        ref = sliding_window_inference(x, (8, 8, 8), 4, net, overlap=0.5, mode="gaussian")[0]
    grid, _ = segment_volume(x[0], net, roi_size=(8, 8, 8), output="scores", scores_path=tmp_path / "p.npy")
    on_disk = np.load(tmp_path / "p.npy", mmap_mode="r")
    assert on_disk.shape == (3, 20, 15, 9)
    assert np.abs(on_disk - ref.numpy()).max() <= 1e-5


def test_skip_empty_windows_sets_background_and_counts():
    x = torch.zeros(1, 40, 16, 16)
    x[:, 2:10, 4:12, 4:12] = torch.rand(1, 8, 8, 8) + 1.0  # only the first windows see foreground
    net = random_net(1, 3, seed=4)
    full, rep_full = segment_volume(x, net, roi_size=(8, 8, 8), overlap=0.5, output="labels")
    part, rep = segment_volume(x, net, roi_size=(8, 8, 8), overlap=0.5, output="labels", skip_below=0.5)
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
    grid, _ = segment_volume(x[0], net, roi_size=(8, 8, 8), output="scores", mirror_axes=(0, 1, 2))
    assert torch.allclose(grid.scores, expect[0], atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(overlap=1.0), "overlap"), (dict(overlap=-0.1), "overlap"), (dict(batch_size=0), "batch size"),
     (dict(overlap=[0.5, 0.5]), "one per spatial axis"), (dict(mode="foo"), "gaussian or constant"),
     (dict(mirror_axes=(-1,)), "mirror axes"), (dict(mirror_axes=(3,)), "mirror axes"),
     (dict(mirror_axes=(0, 0)), "mirror axes"),
     (dict(batch_size=0, skip_below=5.0), "batch size must be at least 1")],  # all windows skipped: checked anyway
)
def test_bad_arguments(kwargs, match):
    x = torch.randn(1, 8, 8, 8)
    with pytest.raises(MedvitError, match=match):
        segment_volume(x, random_net(1, 2, 0), roi_size=(8, 8, 8), **kwargs)


@pytest.mark.parametrize("step, match", [((4, 4), "three sizes"), ((12, 8, 8), "larger than the roi")])
def test_steps_that_would_leave_voxels_unscored_are_refused(step, match):
    with pytest.raises(MedvitError, match=match):
        DenseGrid(torch.randn(1, 30, 30, 30), (8, 8, 8), step=step)


def test_one_size_stands_for_all_three_axes():
    x = torch.randn(1, 1, 20, 15, 9)
    net = random_net(1, 2, seed=6)
    a = sliding_window(x, net, roi_size=8)
    b = sliding_window(x, net, roi_size=(8, 8, 8))
    assert torch.equal(a, b)


def test_every_window_skipped_still_gives_zero_scores(tmp_path):
    x = torch.zeros(1, 20, 15, 9)
    grid, rep = segment_volume(x, random_net(1, 3, 0), roi_size=8, output="both", skip_below=0.5, n_classes=3,
                               scores_path=tmp_path / "p.npy")
    assert rep.windows_run == 0 and int(grid.labels.max()) == 0
    on_disk = np.load(tmp_path / "p.npy")
    assert on_disk.shape == (3, 20, 15, 9) and not on_disk.any()
    with pytest.raises(MedvitError, match="n_classes"):
        segment_volume(x, random_net(1, 3, 0), roi_size=8, output="scores", skip_below=0.5)


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
        segment_volume(x, fails_on_third, roi_size=8, batch_size=1, output="scores", scores_path=target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.npy"] and target.read_bytes() == b"earlier"
    with pytest.raises(MedvitError, match="written as a .npy file"):
        segment_volume(x, fails_on_third, roi_size=8, output="scores", scores_path=tmp_path / "p.zarr")
    with pytest.raises(MedvitError, match="no such folder"):
        segment_volume(x, fails_on_third, roi_size=8, output="scores", scores_path=tmp_path / "nope" / "p.npy")


def test_predictor_with_wrong_shape_or_channels_is_named():
    x = torch.randn(1, 12, 12, 12)
    with pytest.raises(MedvitError, match=r"expected \(2, K, 8, 8, 8\)"):
        segment_volume(x, lambda t: t[:, :, :4], roi_size=(8, 8, 8), batch_size=2)
    calls = iter(range(100))
    flaky = lambda t: torch.zeros(t.shape[0], 2 + (next(calls) > 0), *t.shape[2:])  # noqa: E731
    with pytest.raises(MedvitError, match="3 channels, earlier windows had 2"):
        segment_volume(x, flaky, roi_size=(8, 8, 8), batch_size=1)
    with pytest.raises(MedvitError, match="0 channels"):
        segment_volume(x, lambda t: t[:, :0], roi_size=(8, 8, 8))


def test_nan_output_names_the_window():
    x = torch.randn(1, 16, 8, 8)

    def nan_in_second_half(t):
        out = torch.zeros(t.shape[0], 2, *t.shape[2:])
        out[t[:, 0, 0, 0, 0] > 100] = float("nan")
        return out

    x[0, 8, 0, 0] = 1000.0  # the window starting at depth 8 returns NaN
    with pytest.raises(MedvitError, match=r"NaN or inf for the window starting at voxel \(8, 0, 0\)"):
        segment_volume(x, nan_in_second_half, roi_size=(8, 8, 8), overlap=0.5, batch_size=1)


def test_out_of_memory_lowers_the_batch_then_moves_to_cpu():
    """A predictor that runs out of memory above one window: the run adapts and still matches."""
    x = torch.randn(1, 20, 12, 12)
    net = random_net(1, 3, seed=6)

    def picky(t):
        if t.shape[0] > 1:
            raise torch.OutOfMemoryError("simulated")
        return net(t)

    ref, _ = segment_volume(x, net, roi_size=(8, 8, 8), output="scores", batch_size=4)
    grid, rep = segment_volume(x, picky, roi_size=(8, 8, 8), output="scores", batch_size=4, device="cpu")
    assert rep.oom_events == 2 and rep.batch_size == 1
    assert torch.allclose(grid.scores, ref.scores, atol=1e-6)
    # remembered for the next case on the same device and window shape
    _, rep2 = segment_volume(x, picky, roi_size=(8, 8, 8), output="scores", batch_size=4, device="cpu")
    assert rep2.oom_events == 0 and rep2.batch_size == 1


@pytest.mark.parametrize("prefetch", [False, True])
def test_out_of_memory_while_cropping_a_batch_is_retried(prefetch, monkeypatch):
    """With the input on the GPU (no prefetch) the crops are stacked on the device and can run out
    of memory too: in the first batch's crop, or in the crop retried after the net ran out. Found
    by review: those two crops ran outside the runner's handling and the error escaped."""
    from pipelines.engine import runner

    monkeypatch.setattr(runner, "_LEARNT", {})
    x = torch.randn(1, 12, 8, 8)
    net = random_net(1, 2, seed=9)
    ref, _ = run_windows(DenseGrid(x, (6, 6, 6), overlap=0.5, output="scores"), net, batch_size=4, prefetch=prefetch)
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
        monkeypatch.setattr(runner, "_LEARNT", {})
        fails[:] = [1] if predictor is net else []
        grid, rep = run_windows(Picky(x, (6, 6, 6), overlap=0.5, output="scores"), predictor, batch_size=4,
                                prefetch=prefetch)
        assert rep.oom_events >= 1 and rep.batch_size < 4
        assert torch.allclose(grid.scores, ref.scores, atol=1e-6)


def test_out_of_memory_while_the_ring_is_allocated_is_retried(monkeypatch):
    """An out-of-memory error in the accumulator's first allocation leaves the grid as it was:
    the runner's retry (at batch 1, then on the CPU) sets it up again and the scores match."""
    import sys

    from pipelines.engine import dense, runner

    monkeypatch.setattr(runner, "_LEARNT", {})
    x = torch.randn(1, 20, 12, 12)
    net = random_net(1, 3, seed=7)
    ref, _ = segment_volume(x, net, roi_size=(8, 8, 8), output="scores", batch_size=2)
    zeros, failed = torch.zeros, []

    def zeros_failing_twice(*a, **k):
        if len(failed) < 2 and sys._getframe(1).f_code.co_name == "_setup":
            failed.append(1)
            raise torch.OutOfMemoryError("simulated")
        return zeros(*a, **k)

    monkeypatch.setattr(dense.torch, "zeros", zeros_failing_twice)
    grid, rep = segment_volume(x, net, roi_size=(8, 8, 8), output="scores", batch_size=2)
    assert rep.oom_events == 2 and "accumulating on the CPU" in rep.notes[-1]
    assert torch.allclose(grid.scores, ref.scores, atol=1e-6)


def test_accumulating_on_the_cpu_is_remembered_for_as_large_an_accumulator(monkeypatch):
    """After the device could not hold the accumulator, the next case whose accumulator is at
    least that large starts on the CPU without an error; a smaller one still tries the device."""
    import sys

    from pipelines.engine import dense, runner

    monkeypatch.setattr(runner, "_LEARNT", {})
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
    _, rep = segment_volume(big, net, roi_size=(8, 8, 8), batch_size=1)
    assert rep.oom_events == 1 and "accumulating on the CPU" in rep.notes[-1]
    _, rep = segment_volume(big, net, roi_size=(8, 8, 8), batch_size=1)
    assert rep.oom_events == 0 and rep.notes == ["accumulating on the CPU: remembered from an earlier out-of-memory error"]
    grid, rep = segment_volume(small, net, roi_size=(8, 8, 8), batch_size=1, output="scores")
    assert rep.oom_events == 0 and rep.notes == []
    monkeypatch.setattr(dense.torch, "zeros", zeros)
    ref, _ = segment_volume(small, net, roi_size=(8, 8, 8), batch_size=1, output="scores")
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
    with_thread, _ = run_windows(DenseGrid(x, (8, 8, 8), output="scores"), net, batch_size=3, prefetch=True)
    without, _ = run_windows(DenseGrid(x, (8, 8, 8), output="scores"), net, batch_size=3, prefetch=False)
    assert torch.equal(with_thread.scores, without.scores)
    _, rep = segment_volume(x, net, roi_size=(8, 8, 8), device="cpu")
    assert rep.input_device == "cpu"


def test_skip_source_decides_which_windows_run():
    """The empty-window test can look at another volume on the same grid (HU before clipping)."""
    x = torch.zeros(1, 24, 10, 10)  # what a clipping window leaves: nothing to tell apart
    hu = torch.full((1, 24, 10, 10), -1000.0)
    hu[:, 1:4, 2:5, 2:5] = -400.0  # lung-like tissue at the front, below the window's floor
    net = random_net(1, 3, seed=5)
    grid, rep = segment_volume(x, net, roi_size=(8, 12, 12), overlap=0.5, skip_below=-500.0, skip_source=hu)
    assert rep.windows_run == 1 and rep.windows_skipped == rep.windows_planned - 1  # padded to 12: one window holds it
    assert grid.run[0].start[0] == 0
    with pytest.raises(MedvitError, match="skip_source must be"):
        DenseGrid(x, (8, 8, 8), skip_below=0.0, skip_source=hu[:, :5])


def test_padding_never_counts_as_foreground_for_a_negative_threshold():
    """Below the roi in depth, the image is zero-padded: with a threshold under 0 that padding made
    every window look non-empty (found by review; 0 of 4 skipped at depth 6, 4 of 4 at depth 8)."""
    net = random_net(1, 2, seed=10)
    for depth in (6, 8):
        _, rep = segment_volume(torch.full((1, depth, 10, 10), -1.0), net, roi_size=(8, 8, 8), skip_below=-0.5)
        assert rep.windows_skipped == rep.windows_planned == 4


def test_full_batches_feed_one_batch_shape_and_keep_the_output(monkeypatch):
    """A compiled predictor sees one batch shape: the short last batch is filled, its filler dropped."""
    from pipelines.engine import runner

    monkeypatch.setattr(runner, "_LEARNT", {})  # no batch size remembered from another test's OOM
    x = torch.randn(1, 21, 18, 13)
    net = random_net(1, 3, seed=4)
    seen = []

    def pred(t):
        seen.append(t.shape[0])
        return net(t)

    want, rep = segment_volume(x, net, roi_size=(8, 8, 8), batch_size=7, output="scores")
    assert rep.windows_run % 7 != 0  # the case this test is about: a short last batch
    got, _ = segment_volume(x, pred, roi_size=(8, 8, 8), batch_size=7, output="scores", full_batches=True)
    assert set(seen) == {7}
    assert torch.equal(got.scores, want.scores)


@pytest.mark.parametrize("kind", [tuple, list])
def test_a_deep_supervision_output_is_read_by_its_full_resolution_first_element(kind):
    x = torch.randn(1, 13, 11, 9)
    net = random_net(1, 3, seed=7)

    def deep(t):  # (full, half) as a deep-supervision net in training mode returns them
        y = net(t)
        return kind([y, torch.nn.functional.avg_pool3d(y, 2)])

    plain, _ = segment_volume(x, net, roi_size=(8, 8, 8), output="both", mirror_axes=(1,))
    got, _ = segment_volume(x, deep, roi_size=(8, 8, 8), output="both", mirror_axes=(1,))
    assert torch.equal(got.scores, plain.scores) and torch.equal(got.labels, plain.labels)
    got, _ = segment_volume(x, deep, roi_size=(8, 8, 8), output="scores")
    assert torch.allclose(got.scores, segment_volume(x, net, roi_size=(8, 8, 8), output="scores")[0].scores)
