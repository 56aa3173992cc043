"""A predictor for the engine that runs a volume net on torch, OpenVINO or ONNX Runtime.

:func:`compile_predictor` returns a :class:`Predictor`: a callable mapping a float32
``(B, C, *roi)`` tensor to the net's float32 ``(B, out_channels, *roi)`` logits, like the net
itself, so the engine's windows, weights and accumulation stay as they are. Only the runtime
that computes the logits changes.

A converted net has static shapes: the window and a batch of ``batch``. A call with fewer
windows (the last, short batch) is filled up to ``batch`` with copies of its last window and the
extra outputs dropped; a call with more runs in chunks of ``batch``. One compiled shape, so no
second conversion; the cost is the filler windows of one batch per volume.

Before a conversion is used the first time it is checked against torch fp32 on a fixed input
(:func:`check_input`): its largest absolute difference must be at most :data:`RTOL` times the
largest absolute logit. A conversion that fails (export, compile, first run or this check) falls
back to torch with one warning naming the runtime and why; the verdict is cached, so the next run
neither checks again nor retries. ``auto`` converts for every installed runtime, keeps those that
pass the check, times :data:`TIMED_RUNS` calls of each and of torch (after a warm-up call), and runs the fastest; the
choice and the timings are cached beside the export for the same runtime versions and thread count.

The LiDAR nets are not converted: their sparse convolutions (spconv) and voxel hashing have no
ONNX form these runtimes run, so asking for OpenVINO or ONNX Runtime on one is a
:class:`~medvit.core.errors.MedvitError` and ``auto`` keeps torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medvit.core.errors import MedvitError
from medvit.core.files import atomic_path
from medvit.runtimes import backends, cache

log = logging.getLogger(__name__)

RTOL = 1e-3
"""A conversion passes when its largest absolute difference from torch fp32 on the check input is
at most ``RTOL`` × the largest absolute logit torch gives there."""
TIMED_RUNS = 3
"""Calls timed per runtime by ``auto`` (after one untimed call); the median counts."""


class _Failed(Exception):
    """A conversion that cannot be used; ``str(self)`` says why in one line. ``lasting``: whether the
    verdict is cached (not for a full disk or memory, which the next run may not meet)."""

    def __init__(self, why: str, lasting: bool = True):
        super().__init__(why)
        self.lasting = lasting


_PASSING = (MemoryError, OSError, MedvitError)
"""Errors of the machine or the folders rather than of the conversion."""


def _why(stage: str, e: BaseException) -> str:
    """``stage failed (Type: first informative line)``, for a one-line warning."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # OpenVINO's messages open with the C++ file that threw, which says nothing to a user
    line = next((ln for ln in lines if not ln.startswith("Exception from ")), lines[0] if lines else "")
    return f"{stage} failed ({type(e).__name__}: {line[:200]})" if line else f"{stage} failed ({type(e).__name__})"


def check_input(batch: int, in_channels: int, roi: tuple[int, int, int]) -> torch.Tensor:
    """The fixed input conversions are exported with and checked on: seeded standard normal values
    (the scale of a z-scored MRI or a CT window), ``(batch, in_channels, *roi)`` float32."""
    return torch.randn((batch, in_channels, *roi), generator=torch.Generator().manual_seed(0))


def state_sha256(net: nn.Module) -> str:
    """A SHA-256 of ``net``'s state dict (names, dtypes, shapes, values): the cache key of a net
    that has no checkpoint file (fresh weights in a bench or a test)."""
    h = hashlib.sha256()
    for name, t in net.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cpu_threads() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Predictor:
    """The engine's predictor: ``(B, in_channels, *roi)`` float32 -> ``(B, out, *roi)`` float32.

    ``runtime``: what runs (``torch`` after a fallback). ``requested``: what was asked for.
    ``note``: why it fell back, or what ``auto`` measured ("" otherwise). ``seconds``: ``auto``'s
    median seconds per call of ``batch`` windows by runtime (empty otherwise). ``max_abs_diff``:
    the converted net's largest difference from torch on the check input (None on torch).
    A converted predictor takes CPU tensors only and raises ValueError for any other window shape.
    """

    def __init__(self, runtime: str, *, requested: str, net: nn.Module, roi: tuple[int, int, int], batch: int,
                 in_channels: int, session: backends.Session | None = None, note: str = "",
                 seconds: dict[str, float] | None = None, max_abs_diff: float | None = None, keep: Any = None):
        self.runtime = runtime
        self.requested = requested
        self.note = note
        self.seconds = dict(seconds or {})
        self.max_abs_diff = max_abs_diff
        self.roi, self.batch, self.in_channels = roi, batch, in_channels
        self._net = net
        self._session = session
        self._keep = keep  # a temporary folder holding the export when the cache could not be written

    def __repr__(self) -> str:
        return f"Predictor(runtime={self.runtime!r}, requested={self.requested!r}, roi={self.roi}, batch={self.batch})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._session is None:
            return self._net(x)
        if tuple(x.shape[1:]) != (self.in_channels, *self.roi):
            raise ValueError(f"the {self.runtime} predictor was compiled for (B, {self.in_channels}, "
                             f"{', '.join(map(str, self.roi))}) windows, got {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"the {self.runtime} predictor runs on the CPU; got a tensor on {x.device}")
        arr = x.detach().to(torch.float32).contiguous().numpy()
        outs = []
        for i in range(0, arr.shape[0], self.batch):
            chunk = arr[i : i + self.batch]
            n = chunk.shape[0]
            if n < self.batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch - n, axis=0)])
            outs.append(np.ascontiguousarray(self._session(np.ascontiguousarray(chunk))[:n]))
        return torch.from_numpy(outs[0] if len(outs) == 1 else np.concatenate(outs))


def compile_predictor(
    net: nn.Module,
    *,
    runtime: str,
    roi: tuple[int, int, int],
    batch: int,
    in_channels: int,
    checkpoint_sha256: str,
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> Predictor:
    """A :class:`Predictor` running ``net`` on ``runtime`` for ``(batch, in_channels, *roi)`` windows.

    ``runtime``: ``torch`` (``net`` itself, untouched), ``openvino``, ``onnxruntime`` or ``auto``.
    For the others ``net`` is put in eval mode and must be on the CPU. ``checkpoint_sha256``: the
    SHA-256 of the checkpoint the weights came from (:func:`state_sha256` for a net without one),
    the cache key with the net's class, ``in_channels``, ``roi``, ``batch`` and the versions.
    ``cache_dir``: the cache root (default :func:`~medvit.runtimes.cache.default_cache_dir`); one
    that cannot be written is warned about once and the net converted in a temporary folder.
    ``threads``: the runtime's threads (default: the CPUs this process may use); torch's own thread
    count is left to the caller.

    Raises :class:`MedvitError` for an unknown runtime, a runtime whose packages are not installed
    (naming how to install them), a LiDAR net, or a net on a GPU with OpenVINO or ONNX Runtime.
    A conversion that fails falls back to torch with one logged warning (see the module docstring).
    """
    roi = tuple(int(r) for r in roi)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi must be three positive sizes, got {roi}")
    if batch < 1 or in_channels < 1:
        raise ValueError(f"batch and in_channels must be positive, got {batch} and {in_channels}")
    threads = cpu_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be positive, got {threads}")
    if not re.fullmatch(r"[0-9a-f]{64}", checkpoint_sha256):
        raise ValueError(f"checkpoint_sha256 must be 64 lowercase hex digits, got {checkpoint_sha256!r}")
    if runtime not in (*backends.RUNTIMES, "auto"):
        raise MedvitError(f"unknown runtime {runtime!r}; choose from {', '.join(backends.RUNTIMES)} or auto")

    def on_torch(note: str = "") -> Predictor:
        return Predictor("torch", requested=runtime, net=net, roi=roi, batch=batch, in_channels=in_channels, note=note)

    if runtime == "torch":
        return on_torch()
    where = next((p.device for p in net.parameters()), torch.device("cpu"))
    if runtime in backends.CONVERTED:
        if backends.is_sparse_net(net):
            raise MedvitError(f"runtime {runtime!r}: the LiDAR nets' sparse convolutions (spconv) do not convert "
                              "to OpenVINO or ONNX Runtime; run them on torch")
        backends.require(runtime)
        if where.type != "cpu":
            raise MedvitError(f"runtime {runtime!r} runs on the CPU, but the net is on {where}")
    elif backends.is_sparse_net(net):
        return on_torch("auto: a LiDAR net (sparse convolutions) runs on torch only")
    elif where.type != "cpu":
        return on_torch(f"auto: the net is on {where}; OpenVINO and ONNX Runtime run on the CPU")

    net.eval()
    root = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    build = _Build(net, root, checkpoint_sha256, in_channels, roi, batch, threads)
    if runtime == "auto":
        return build.auto(on_torch)
    try:
        run, diff = build.converted(runtime)
    except _Failed as f:
        log.warning("runtime %s: %s; running on torch instead", runtime, f)
        return on_torch(f"{runtime}: {f}")
    return Predictor(runtime, requested=runtime, net=net, roi=roi, batch=batch, in_channels=in_channels,
                     session=run, max_abs_diff=diff, keep=build.keep)


class _Build:
    """One compile_predictor call's conversions: the export (made at most once), the torch reference
    on the check input (computed at most once), and the cache folder (warned about at most once)."""

    def __init__(self, net: nn.Module, root: Path, sha256: str, in_channels: int, roi: tuple[int, int, int],
                 batch: int, threads: int):
        self.net, self.root, self.threads = net, root, threads
        self.entry = cache.entry_dir(root, sha256, type(net).__name__, in_channels, roi, batch)
        self.stem = backends.export_stem()
        self.example = check_input(batch, in_channels, roi)
        self.keep: tempfile.TemporaryDirectory | None = None
        self._onnx: Path | None = None
        self._export_error: _Failed | None = None
        self._ref: np.ndarray | None = None
        self._writable: bool | None = None

    def writable(self) -> bool:
        """Whether the entry folder takes files; the first time it does not, one warning."""
        if self._writable is None:
            why = cache.unwritable(self.entry)
            self._writable = why is None
            if why is not None:
                log.warning("runtime cache %s cannot be written (%s); converting without it, so each run "
                            "converts again", self.root, why)
        return self._writable

    def store(self, name: str, data: dict[str, Any]) -> None:
        if self.writable():
            cache.write_json(self.entry / name, data)

    def reference(self) -> np.ndarray:
        """Torch fp32's first output on the check input."""
        if self._ref is None:
            with torch.no_grad():
                out = self.net(self.example)
            self._ref = (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()
        return self._ref

    def onnx(self) -> Path:
        """The export's path: from the cache, else exported (into the cache when it is writable)."""
        if self._onnx is not None:
            return self._onnx
        if self._export_error is not None:
            raise self._export_error
        path = self.entry / f"{self.stem}.onnx"
        if not path.is_file():
            try:
                if self.writable():
                    with atomic_path(path) as tmp:
                        backends.export_onnx(self.net, self.example, tmp)
                else:
                    self.keep = tempfile.TemporaryDirectory(prefix="medvit-runtime-")
                    path = Path(self.keep.name) / "model.onnx"
                    backends.export_onnx(self.net, self.example, path)
            except Exception as e:  # noqa: BLE001 - any exporter error means: run on torch
                self._export_error = _Failed(_why("export", e), lasting=not isinstance(e, _PASSING))
                raise self._export_error from None
        self._onnx = path
        return path

    def converted(self, runtime: str) -> tuple[backends.Session, float]:
        """A checked session of ``runtime`` and its difference from torch; _Failed says why not."""
        version = backends.version(runtime)
        stem = f"{self.stem}.{runtime}-{version}"  # this runtime version's files: verdict, compiled blobs
        name = f"{stem}.json"
        verdict = cache.read_json(self.entry / name)
        if verdict is not None and not verdict.get("ok"):
            raise _Failed(str(verdict.get("why", "failed before")))
        base = {"runtime": runtime, "version": version, "export": self.stem}
        try:
            path = self.onnx()
        except _Failed as f:
            if f.lasting:
                self.store(name, {**base, "ok": False, "why": str(f)})
            raise
        keep_compiled = runtime == "openvino" and path.parent == self.entry and self.writable()
        compiled = self.entry / f"{stem}.compiled" if keep_compiled else None
        try:
            run = backends.session(runtime, path, self.threads, compiled)
        except Exception as e:  # noqa: BLE001 - any compile error means: run on torch
            why = _why("compile", e)
            if not isinstance(e, _PASSING):
                self.store(name, {**base, "ok": False, "why": why})
            raise _Failed(why) from None
        if verdict is not None:
            return run, float(verdict.get("max_abs_diff", 0.0))
        try:
            out = run(self.example.numpy())
        except Exception as e:  # noqa: BLE001 - any run error means: run on torch
            why = _why("first run", e)
            self.store(name, {**base, "ok": False, "why": why})
            raise _Failed(why) from None
        ref = self.reference()
        peak = float(np.abs(ref).max())
        diff = float(np.abs(out - ref).max()) if out.shape == ref.shape else float("inf")
        tol = RTOL * peak
        if not diff <= tol:  # NaN fails too
            why = (f"output shape {out.shape} differs from torch's {ref.shape}" if out.shape != ref.shape
                   else f"output differs from torch by {diff:.3g} (tolerance {tol:.3g})")
            self.store(name, {**base, "ok": False, "why": why, "max_abs_diff": diff, "tolerance": tol})
            raise _Failed(why)
        self.store(name, {**base, "ok": True, "why": "", "max_abs_diff": diff, "tolerance": tol, "output_max": peak})
        return run, diff

    def auto(self, on_torch: Callable[[str], Predictor]) -> Predictor:
        """The fastest runtime that converts and passes the check, measured once and cached."""
        candidates = [r for r in backends.CONVERTED if not backends.missing_packages(r)]
        if not candidates:
            return on_torch(f"auto: neither OpenVINO nor ONNX Runtime is installed ({backends.INSTALL_HINT})")
        versions = {r: backends.version(r) for r in candidates}
        key = hashlib.sha256(json.dumps([versions, self.threads, RTOL], sort_keys=True).encode()).hexdigest()[:12]
        name = f"{self.stem}.auto-{key}.json"
        chosen = cache.read_json(self.entry / name)
        if chosen is not None and chosen.get("choice") in backends.RUNTIMES:
            choice, note, seconds = chosen["choice"], str(chosen.get("note", "")), chosen.get("seconds", {})
            if choice == "torch":
                p = on_torch(note)
                p.seconds = seconds
                return p
            try:
                run, diff = self.converted(choice)
            except _Failed as f:
                log.warning("runtime auto (%s): %s; running on torch instead", choice, f)
                return on_torch(f"auto: {choice}: {f}")
            return self._predictor(choice, run, note, seconds, diff)

        self.reference()  # also torch's untimed first call
        seconds = {"torch": _median_seconds(lambda: self.net(self.example))}
        runs: dict[str, tuple[backends.Session, float]] = {}
        failed: dict[str, str] = {}
        for r in candidates:
            try:
                runs[r] = self.converted(r)
            except _Failed as f:
                failed[r] = str(f)
                continue
            seconds[r] = _median_seconds(lambda run=runs[r][0]: run(self.example.numpy()), warm_up=True)
        choice = min(seconds, key=seconds.get)
        note = f"auto: {choice}; s per batch of {self.example.shape[0]}: " + ", ".join(
            f"{r} {s:.3g}" for r, s in sorted(seconds.items(), key=lambda kv: kv[1]))
        note += "".join(f"; {r} unusable: {why}" for r, why in failed.items())
        self.store(name, {"choice": choice, "note": note, "seconds": seconds, "failed": failed,
                          "versions": versions, "threads": self.threads})
        if choice == "torch":
            p = on_torch(note)
            p.seconds = seconds
            return p
        return self._predictor(choice, runs[choice][0], note, seconds, runs[choice][1])

    def _predictor(self, runtime: str, run: backends.Session, note: str, seconds: dict[str, float],
                   diff: float) -> Predictor:
        roi = tuple(self.example.shape[2:])
        return Predictor(runtime, requested="auto", net=self.net, roi=roi, batch=self.example.shape[0],
                         in_channels=self.example.shape[1], session=run, note=note, seconds=seconds,
                         max_abs_diff=diff, keep=self.keep)


def _median_seconds(call: Callable[[], Any], warm_up: bool = False) -> float:
    """The median seconds of :data:`TIMED_RUNS` calls, after one untimed call if ``warm_up``."""
    times = []
    with torch.no_grad():
        if warm_up:
            call()
        for _ in range(TIMED_RUNS):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
    return statistics.median(times)
