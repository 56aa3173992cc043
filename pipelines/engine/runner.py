"""The runner shared by every domain: plan → batch → predictor → accumulate → finalize.

A *domain* (``DenseGrid`` for volumes, ``PointScene`` for scenes) knows how to plan its
windows, gather a window's input, weight and scatter a window's output, and finalize
what no later window touches. The runner owns everything else: batching, moving data to
the device (the next batch is gathered, and a tensor batch copied, on a worker thread while
the current one runs), autocast, a progress bar, and adapting to out-of-memory errors.

An :class:`Engine` holds the run's :class:`~pipelines.engine.settings.InferenceSettings` and
what earlier runs taught it; a long-lived caller (``medvit segment`` over many cases, a batch
worker, validation during training) keeps one engine so that this carries over between cases.

Out of memory (``torch.OutOfMemoryError`` only; nothing else is caught): the batch is
halved and retried; at batch 1 a domain that packs several windows into a call (a scene's
small tiles) runs one window a call, and then the domain moves its accumulators to the CPU. What
worked is remembered by the engine per (device, window shape) for the next case: the batch size,
one window a call, and the accumulator size from which accumulation starts on the CPU.

A predictor that returns a tuple or list (a deep-supervision net, full resolution first) is
read by its first element: inference uses the full-resolution output only.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm import tqdm

from medvit.core.errors import MedvitError
from pipelines.engine.checks import check_mirror_axes
from pipelines.engine.settings import InferenceSettings
from pipelines.threads import AdaptiveThreads

@dataclass
class _Learnt:
    """What out-of-memory errors taught about one (device, window shape)."""

    batch: int | None = None
    """The largest batch that fitted."""
    single: bool = False
    """Packed calls did not fit even at batch 1: one window a call."""
    cpu_from: int | None = None
    """Accumulator bytes that did not fit beside the net: an accumulator this large or larger
    starts on the CPU."""


class Domain(Protocol):
    """What the runner needs from a domain."""

    window_shape: tuple[int, ...]

    def windows(self) -> Sequence[Any]:
        """The windows to run, in the order the domain wants them accumulated."""

    def gather(self, windows: Sequence[Any]) -> Any:
        """The CPU input batch for ``windows``: a tensor, or a record with ``.to(device)``.

        May run on the copy thread (``prefetch``). A record's ``.to(device)`` runs on the runner's
        thread, so a record should hold arrays (numpy) and leave making tensors to ``.to``.
        """

    def check(self, windows: Sequence[Any], out: torch.Tensor) -> None:
        """Raise a clear error if ``out`` is not what the domain expects."""

    def accumulate(self, windows: Sequence[Any], out: torch.Tensor) -> None:
        """Weight and add a batch of outputs; must allocate before it adds anything."""

    def accumulate_on_cpu(self) -> bool:
        """Move accumulators to the CPU after an out-of-memory error; False if they already are.

        Also called before the first ``accumulate``, when an earlier case learnt that an
        accumulator of this size does not fit on the device."""

    def accumulator_bytes(self, n_classes: int) -> int:
        """Bytes the device-side accumulators take for ``n_classes`` output channels."""

    def finalize(self) -> Any:
        """The domain's result once every window has been accumulated."""


def _batch_len(domain: Any, windows: Sequence[Any], start: int, batch_size: int, single: bool) -> int:
    """How many windows from ``start`` form the next batch: ``batch_size``, unless the domain
    sizes its own batches (``domain.batch_len``, e.g. a scene packing small tiles up to a points
    budget) or ``single`` (after an out-of-memory error at batch 1); always at least one."""
    sized = getattr(domain, "batch_len", None)
    if single:
        return 1
    n = sized(start, batch_size) if sized is not None else batch_size
    return max(1, min(int(n), len(windows) - start))


def _accumulator_bytes(domain: Any, n_classes: int) -> int | None:
    """The domain's accumulator size for ``n_classes`` channels; None if it cannot tell."""
    size = getattr(domain, "accumulator_bytes", None)
    return int(size(n_classes)) if size is not None else None


@dataclass
class EngineReport:
    """What a run did: counts, times and memory, for logs and benchmarks."""

    windows_planned: int = 0
    windows_run: int = 0
    windows_skipped: int = 0
    calls: int = 0
    """Predictor calls that went through (a scene packs several tiles into one)."""
    batch_size: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    """Time inside the predictor (synchronised on CUDA)."""
    oom_events: int = 0
    accumulate_device: str = ""
    input_device: str = ""
    """Where the windows were cropped from (dense volumes): the CPU, or the GPU when the input fitted there."""
    peak_gpu_bytes: int | None = None
    notes: list[str] = field(default_factory=list)


def ring_runs(i0: int, i1: int, cap: int) -> list[tuple[int, int, int]]:
    """Rows ``[i0, i1)`` of a ring buffer of ``cap`` rows (row ``i`` lives at ``i % cap``) as
    contiguous runs ``(first row, its position in the ring, count)``; the domains' accumulators
    are such rings."""
    runs, i = [], i0
    while i < i1:
        p = i % cap
        n = min(i1 - i, cap - p)
        runs.append((i, p, n))
        i += n
    return runs


def sync_device(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA), so that a timer around it measures the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast on ``device`` in ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def full_resolution(out: Any) -> Any:
    """A net's output for the engine: a deep-supervision net's tuple or list (nnU-Net's order,
    full resolution first) becomes its first element; anything else is returned as is."""
    return out[0] if isinstance(out, (tuple, list)) else out


def mirrored(predictor: Callable[[torch.Tensor], torch.Tensor], axes: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Test-time augmentation: the mean of ``predictor`` over every flip combination of ``axes``.

    ``axes`` are spatial axes (0 is the first spatial axis; ValueError otherwise). Outputs are
    flipped back before averaging, so the result lines up with the unflipped input.
    """
    dims = [a + 2 for a in check_mirror_axes(axes)]
    combos = [[d for j, d in enumerate(dims) if (m >> j) & 1] for m in range(1 << len(dims))]

    def predict(x: torch.Tensor) -> torch.Tensor:
        total = None
        for flip in combos:
            out = full_resolution(predictor(torch.flip(x, flip) if flip else x))
            out = torch.flip(out, flip) if flip else out
            total = out.float() if total is None else total + out.float()
        return total / len(combos)

    return predict


class Engine:
    """Runs domains' windows through a predictor with one set of :class:`InferenceSettings`.

    An engine owns what out-of-memory errors taught it, per (device, window shape): the batch
    that fitted, one window a call, the accumulator size that starts on the CPU (see the module
    docstring); and a bounded LRU cache (``cache_size`` entries) of volume importance maps and of
    the predictors :meth:`predictor` compiled. Keep one engine across cases for both to carry
    over; :meth:`with_settings` gives an engine with other settings that shares them.
    ``runtime_threads`` and ``runtime_cache`` are :meth:`predictor`'s thread count and cache root
    (None: :func:`~medvit.runtimes.compile_predictor`'s defaults, the CPUs this process may use and
    :func:`~medvit.runtimes.default_cache_dir`).
    """

    def __init__(self, settings: InferenceSettings | None = None, *, cache_size: int = 8,
                 runtime_threads: int | None = None, runtime_cache: str | None = None):
        if settings is not None and not isinstance(settings, InferenceSettings):
            raise TypeError(f"Engine takes InferenceSettings, got {type(settings).__name__}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {cache_size}")
        if runtime_threads is not None and runtime_threads < 1:
            raise ValueError(f"runtime_threads must be at least 1, got {runtime_threads}")
        self.settings = settings if settings is not None else InferenceSettings()
        self.cache_size = cache_size
        self.runtime_threads = runtime_threads
        self.runtime_cache = runtime_cache
        self._learnt: dict[tuple[str, tuple[Any, ...]], _Learnt] = {}
        self._cache: OrderedDict[Hashable, Any] = OrderedDict()

    def with_settings(self, settings: InferenceSettings | None = None, **changes: Any) -> Engine:
        """An engine with ``settings`` (or these settings with ``changes``) that shares this one's
        out-of-memory lessons and importance-map cache."""
        new = Engine((settings or self.settings).replace(**changes) if changes else (settings or self.settings),
                     cache_size=self.cache_size, runtime_threads=self.runtime_threads, runtime_cache=self.runtime_cache)
        new._learnt, new._cache = self._learnt, self._cache
        return new

    def learnt(self, device: torch.device | str, window_shape: Sequence[Any]) -> _Learnt:
        """What out-of-memory errors taught about ``window_shape`` on ``device`` (a fresh record
        the first time; the runner updates it in place)."""
        return self._learnt.setdefault((str(torch.device(device)), tuple(window_shape)), _Learnt())

    def cached(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """``make()`` kept under ``key`` among the :attr:`cache_size` most recently used entries."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        value = self._cache[key] = make()
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def importance_map(self, roi: Sequence[int], mode: str, sigma_scale: float, dtype: torch.dtype,
                       device: torch.device | str) -> torch.Tensor:
        """MONAI's importance map for windows of ``roi`` (cached, see :meth:`cached`)."""
        from monai.data.utils import compute_importance_map

        key = ("importance", tuple(roi), mode, float(sigma_scale), dtype, str(device))
        return self.cached(key, lambda: compute_importance_map(tuple(roi), mode=mode, sigma_scale=sigma_scale,
                                                               device=device, dtype=dtype))

    def predictor(self, net: torch.nn.Module, *, roi: Sequence[int], in_channels: int,
                  checkpoint_sha256: str) -> Callable[[torch.Tensor], Any]:
        """What runs ``net``'s windows under this engine's ``runtime`` setting: ``net`` itself for
        torch; else :func:`medvit.runtimes.compile_predictor` for windows of ``roi`` with
        ``in_channels`` channels at this engine's batch size (a ``Predictor``, which says in
        ``.runtime`` and ``.note`` what ran and why), kept in the engine's cache so that every case
        of a run reuses one compiled model. ``checkpoint_sha256`` keys the on-disk cache (see
        :mod:`medvit.runtimes.cache`). Only the predictor changes: windows, weights and
        accumulation stay the same. Raises MedvitError when the runtime's package is missing.
        """
        runtime = self.settings.runtime
        if runtime == "torch":
            return net
        from medvit.runtimes import compile_predictor

        roi = tuple(int(r) for r in roi)
        batch = self.settings.batch_size
        key = ("predictor", id(net), runtime, roi, batch, int(in_channels), checkpoint_sha256)
        return self.cached(key, lambda: compile_predictor(
            net, runtime=runtime, roi=roi, batch=batch, in_channels=int(in_channels),
            checkpoint_sha256=checkpoint_sha256, cache_dir=self.runtime_cache, threads=self.runtime_threads))

    def run(
        self,
        domain: Domain,
        predictor: Callable[[torch.Tensor], torch.Tensor],
        *,
        progress: bool = False,
        prefetch: bool = True,
        desc: str = "windows",
        report: EngineReport | None = None,
        full_batches: bool = False,
    ) -> tuple[Any, EngineReport]:
        """Run ``predictor`` over ``domain``'s windows with this engine's settings (batch size,
        device, autocast) and return ``(domain.finalize(), report)``.

        ``prefetch``: gather the next batch (and copy a tensor batch) on a worker thread while
        the current one runs. ``full_batches``: a short last batch of tensor windows is filled up
        to the batch size with copies of its last window, whose outputs are dropped, so that a
        predictor compiled for one batch shape (``torch.compile`` with static shapes) never sees
        a second shape and recompiles. ``report``: the record to fill (a new one by default).
        Raises MedvitError when one window does not fit the device even with accumulation on the
        CPU; whatever the predictor or the domain raises passes through.
        """
        return _run_windows(self, domain, predictor, progress=progress, prefetch=prefetch, desc=desc, report=report,
                            full_batches=full_batches)


def _run_windows(engine: Engine, domain: Domain, predictor: Callable[[torch.Tensor], torch.Tensor], *, progress: bool,
                 prefetch: bool, desc: str, report: EngineReport | None, full_batches: bool) -> tuple[Any, EngineReport]:
    """:meth:`Engine.run`'s loop."""
    settings = engine.settings
    batch_size, device, amp_dtype = settings.batch_size, settings.device, settings.amp_dtype
    rep = report or EngineReport()
    wins = list(domain.windows())
    rep.windows_run = len(wins)
    learnt = engine.learnt(device, domain.window_shape)
    bs = min(batch_size, learnt.batch or batch_size)
    if bs < batch_size:
        rep.notes.append(f"batch {bs}: remembered from an earlier out-of-memory error")
    single = learnt.single  # one window a call: set by an out-of-memory error at batch 1 on a packed batch
    if single:
        rep.notes.append("one window a call: remembered from an earlier out-of-memory error")
    classes: int | None = None  # the output's channels, once the net has answered
    pin = device.type == "cuda"

    def load(ws: Sequence[Any]) -> Any:
        x = domain.gather(ws)
        if not isinstance(x, torch.Tensor):  # a record (a scene's tiles): made into tensors by `take`
            return x
        if pin and x.device.type == "cpu":
            x = x.pin_memory()
        return x.to(device, non_blocking=pin)

    def take(pending: Future | Callable[[], Any]) -> Any:
        x = pending.result() if isinstance(pending, Future) else pending()
        # records become tensors here, on this thread: torch ops on the copy thread start a
        # second OpenMP thread team that slows the net's small ops (measured: scene.TileBatch)
        return x if isinstance(x, torch.Tensor) else x.to(device)

    pool = ThreadPoolExecutor(max_workers=1) if prefetch else None

    def submit(start: int, size: int) -> tuple[int, Future | Callable[[], Any]] | None:
        """Start loading the batch at ``start`` on the copy thread, or (no prefetch) defer it to
        ``take``, inside the loop's out-of-memory handling: a crop of an input already on the GPU
        can run out of memory too. Returns (its window count, its future or loader)."""
        if start >= len(wins):
            return None
        n = _batch_len(domain, wins, start, size, single)
        ws = wins[start : start + n]
        return n, (pool.submit(load, ws) if pool is not None else lambda: load(ws))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    bar = tqdm(total=len(wins), disable=not progress, desc=desc, unit="win", dynamic_ncols=True)
    i = 0
    pending = submit(0, bs)
    with AdaptiveThreads() as threads:  # fewer torch threads while other jobs hold cores
        try:
            while i < len(wins):
                n, loading = pending
                batch = wins[i : i + n]
                x = None
                try:
                    x = take(loading)  # inside the try: the copy to the device may not fit either
                    pending = submit(i + n, bs)  # the next batch loads while this one runs
                    filled = full_batches and isinstance(x, torch.Tensor) and x.shape[0] < bs
                    if filled:  # inside the try: on a GPU the full batch may not fit
                        x = torch.cat([x, x[-1:].expand(bs - x.shape[0], *x.shape[1:])])
                    tm = time.perf_counter()
                    with torch.no_grad(), autocast_context(device, amp_dtype):
                        out = full_resolution(predictor(x))
                        if filled:
                            out = out[: len(batch)]
                    sync_device(device)
                    rep.model_seconds += time.perf_counter() - tm
                    domain.check(batch, out)
                    if classes is None:
                        classes = int(out.shape[1])
                        size = _accumulator_bytes(domain, classes)
                        if learnt.cpu_from is not None and size is not None and size >= learnt.cpu_from:
                            if domain.accumulate_on_cpu():
                                rep.notes.append("accumulating on the CPU: remembered from an earlier out-of-memory error")
                    domain.accumulate(batch, out)
                except torch.OutOfMemoryError:
                    rep.oom_events += 1
                    x = out = None
                    if pending is not None and isinstance(pending[1], Future):
                        pending[1].cancel()
                        with contextlib.suppress(Exception):
                            pending[1].result()
                    pending = None
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if bs > 1:
                        bs //= 2
                        learnt.batch = bs
                        rep.notes.append(f"out of memory: batch size lowered to {bs}")
                    elif len(batch) > 1 and not single:
                        single = learnt.single = True
                        rep.notes.append("out of memory at batch 1: one window a call")
                    elif domain.accumulate_on_cpu():
                        size = _accumulator_bytes(domain, classes) if classes is not None else None
                        if size is not None:
                            learnt.cpu_from = size if learnt.cpu_from is None else min(learnt.cpu_from, size)
                        rep.notes.append("out of memory at batch 1: accumulating on the CPU")
                    else:
                        raise MedvitError(
                            f"out of memory on {device} with one window of {tuple(domain.window_shape)} and "
                            "accumulation already on the CPU; use a smaller window or another device"
                        ) from None
                    pending = submit(i, bs)
                    continue
                i += len(batch)
                rep.calls += 1
                bar.update(len(batch))
                threads.tick()
            result = domain.finalize()
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    rep.seconds = time.perf_counter() - t0
    rep.batch_size = bs
    if device.type == "cuda":
        rep.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(device))
    return result, rep
