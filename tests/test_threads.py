"""Torch threads fitted to the cores other processes leave (pipelines.threads)."""

from __future__ import annotations

import pytest
import torch

from pipelines import threads as th
from pipelines.threads import AdaptiveThreads, busy_seconds, threads_left


@pytest.mark.parametrize("ceiling, others, want", [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 2.0, 1), (2, 3.5, 1),
                                                   (4, 1.2, 3), (8, 2.6, 5), (1, 0.0, 1)])
def test_threads_left(ceiling, others, want):
    assert threads_left(ceiling, others) == want


def test_busy_seconds_sums_the_busy_fields_of_our_cpus(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal
    stat.write_text("cpu  9 9 9 9 9 9 9 9\n"
                    "cpu0 100 10 20 5000 7 1 2 50\n"
                    "cpu1 200 0 40 5000 0 3 4 60\n"
                    "cpu2 999 0 0 0 0 0 0 0\n"
                    "intr 12345\n")
    tick = th._TICK_S
    assert busy_seconds({0}, stat) == pytest.approx((100 + 10 + 20 + 1 + 2) * tick)
    assert busy_seconds({0, 1}, stat) == pytest.approx((133 + 247) * tick)
    assert busy_seconds({0}, tmp_path / "none") is None


class FakeMachine:
    """A clock, the busy seconds of the CPUs and this process's CPU seconds, advanced by hand."""

    def __init__(self, monkeypatch):
        self.now, self.busy, self.own = 100.0, 0.0, 0.0
        monkeypatch.setattr(th.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(th, "busy_seconds", lambda cpus: self.busy)
        monkeypatch.setattr(th, "own_seconds", lambda: self.own)

    def run(self, seconds: float, ours: float, others: float) -> None:
        """``seconds`` pass with ``ours`` and ``others`` cores busy."""
        self.now += seconds
        self.own += ours * seconds
        self.busy += (ours + others) * seconds


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.delenv("MEDVIT_ADAPT_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_gives_way_to_another_job_and_takes_the_cores_back(monkeypatch, two_threads):
    m = FakeMachine(monkeypatch)
    with AdaptiveThreads(interval_s=2.0) as adapt:
        m.run(1.0, ours=2, others=1.0)
        assert adapt.tick() == 2  # not measured yet: under the interval
        m.run(1.5, ours=2, others=1.0)
        assert adapt.tick() == 1 and torch.get_num_threads() == 1
        m.run(2.5, ours=1, others=1.0)
        assert adapt.tick() == 1  # the other job still holds a core
        m.run(2.5, ours=1, others=0.1)
        assert adapt.tick() == 2 and torch.get_num_threads() == 2
        m.run(2.5, ours=2, others=1.0)
        adapt.tick()
    assert torch.get_num_threads() == 2  # put back on leaving
    assert adapt.changes == [(1.0, 1), (0.1, 2), (1.0, 1)]


def test_never_above_the_count_it_started_with(monkeypatch, two_threads):
    m = FakeMachine(monkeypatch)
    torch.set_num_threads(1)
    with AdaptiveThreads(interval_s=1.0) as adapt:
        m.run(3.0, ours=1, others=0.0)
        assert adapt.tick() == 1
    assert torch.get_num_threads() == 1


def test_off_by_environment(monkeypatch, two_threads):
    m = FakeMachine(monkeypatch)
    monkeypatch.setenv("MEDVIT_ADAPT_THREADS", "0")
    with AdaptiveThreads(interval_s=1.0) as adapt:
        m.run(3.0, ours=2, others=2.0)
        assert adapt.tick() == 2
    assert adapt.changes == []


def test_no_proc_stat_does_nothing(monkeypatch, two_threads):
    monkeypatch.setattr(th, "busy_seconds", lambda cpus: None)
    with AdaptiveThreads(interval_s=1e-9) as adapt:
        assert adapt.tick() == 2


def test_bad_interval():
    with pytest.raises(ValueError, match="interval_s"):
        AdaptiveThreads(interval_s=0)


def test_the_engine_gives_way_and_puts_threads_back(monkeypatch, two_threads):
    from pipelines.engine import Engine, InferenceSettings, segment_volume

    m = FakeMachine(monkeypatch)
    seen = []

    class Net(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            m.run(3.0, ours=1, others=1.5)  # another job holds more than a core while each window runs
            return torch.cat([-x, x], 1)

    engine = Engine(InferenceSettings(batch_size=1, overlap=0.0))
    segment_volume(engine, torch.zeros(1, 20, 8, 8), Net(), roi_size=(8, 8, 8), progress=False)
    assert seen[0] == 2 and seen[-1] == 1  # the first window ran before anything was measured
    assert torch.get_num_threads() == 2
