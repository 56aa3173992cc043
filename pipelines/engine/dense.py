"""``DenseGrid``: the volume domain of the engine, and the ``sliding_window`` entry point.

Windows are evenly spaced as in MONAI (same starts, same Gaussian importance map, fp32
sums in the same order), so with skipping and augmentation off the blended output equals
``monai.inferers.sliding_window_inference(mode="gaussian")``. What differs is memory:
windows are ordered by their start along the first spatial axis, and a slab of that
axis is finalised as soon as no later window touches it. The float accumulator therefore
spans one window's depth, not the volume; when only labels are wanted, each slab is
reduced to uint8/uint16 labels and freed, so peak memory no longer grows with
classes × volume. Class scores can instead be kept in memory or streamed to a ``.npy``
memory map on disk.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.data.utils import compute_importance_map, dense_patch_slices

from medvit.core.errors import NonFiniteOutput
from pipelines.engine.runner import Engine, EngineReport, mirrored, ring_runs
from pipelines.engine.checks import per_axis
from pipelines.engine.settings import MODES, InferenceSettings


def scan_interval(image: Sequence[int], roi: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """Window step per axis: ``int(roi * (1 - overlap))``, at least 1; the roi itself where it fills the axis."""
    return tuple(int(r) if r == s else max(1, int(r * (1 - o))) for s, r, o in zip(image, roi, overlap))


@dataclass(frozen=True)
class Window:
    index: int
    start: tuple[int, int, int]
    """First voxel of the window in the padded volume."""


def as_roi(roi_size: int | Sequence[int]) -> tuple[int, int, int]:
    """``roi_size`` (one size for all three axes, or three) as three positive ints; ValueError otherwise."""
    roi = (int(roi_size),) * 3 if isinstance(roi_size, (int, np.integer)) else tuple(int(r) for r in roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ValueError(f"roi_size must be three positive sizes, got {roi_size}")
    return roi


def plan_windows(shape: Sequence[int], roi_size: int | Sequence[int], overlap: float | Sequence[float] = 0.5, *,
                 step: int | Sequence[int] | None = None) -> list[Window]:
    """The windows over a volume of spatial ``shape``, as MONAI's ``sliding_window_inference`` places them.

    The volume is first padded to at least ``roi_size`` along each axis (as MONAI and
    :class:`DenseGrid` do); window starts are voxels of that padded volume. Windows are evenly
    spaced, ``int(roi * (1 - overlap))`` apart (at least 1; the roi where it fills the axis), the
    last flush with the end, and returned sorted by start (``index`` is their position), so that
    every voxel lies in some window. ``step`` (voxels per axis, at most the roi) replaces
    ``overlap``. A pure function of its arguments; ValueError for a bad one.
    """
    roi = as_roi(roi_size)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {tuple(shape)}")
    padded = tuple(max(int(s), r) for s, r in zip(shape, roi))
    if step is not None:
        steps = (int(step),) * 3 if isinstance(step, (int, np.integer)) else tuple(int(s) for s in step)
        if len(steps) != 3 or min(steps) < 1:
            raise ValueError(f"step must be three sizes of at least 1 voxel, got {step}")
        if any(s > r for s, r in zip(steps, roi)):
            raise ValueError(f"step {steps} is larger than the roi {roi} in an axis: voxels between "
                             "windows would get no score")
    else:
        steps = scan_interval(padded, roi, per_axis(overlap))
    slices = dense_patch_slices(padded, roi, steps, return_slice=False)
    starts = sorted(tuple(int(v) for v in s[:, 0]) for s in np.asarray(slices))
    return [Window(i, s) for i, s in enumerate(starts)]


def label_dtype(n_classes: int) -> torch.dtype:
    """The label map's dtype for ``n_classes``: uint8, or int32 past 256; ValueError past 65536."""
    if n_classes <= 256:
        return torch.uint8
    if n_classes <= 65536:
        return torch.int32  # stored as uint16 on disk; torch's uint16 lacks argmax/indexing support
    raise ValueError(f"{n_classes} classes do not fit a 16-bit label map")


class DenseGrid:
    """Evenly spaced windows over one ``(C, D, H, W)`` volume.

    Args:
        image: ``(C, D, H, W)`` input on the CPU (or the device); padded with ``pad_value``
            where it is smaller than the window, as MONAI does, and cropped back at the end.
        roi_size: window size per spatial axis (or one size for all three).
        overlap: fraction shared by neighbouring windows, in [0, 1) (per axis or one value).
        step: window step per axis in voxels, at most the roi; overrides ``overlap`` when given.
        mode: ``gaussian`` or ``constant`` blending; ``sigma_scale`` as in MONAI.
        output: ``labels`` (argmax per slab into uint8, or int32 past 256 classes),
            ``scores`` (blended predictor outputs), or ``both``.
        scores_path: with scores, a ``.npy`` file to stream them to instead of memory; written
            under a hidden temporary name beside it and renamed by :meth:`finalize`.
        skip_below: skip windows whose input has no voxel above this value (in the input's
            units); skipped-only voxels get label 0 and zero scores, and are counted.
        skip_source: ``(C', D, H, W)`` on the image's grid to test ``skip_below`` on instead of
            the image (say, HU before a clipping window, which cannot tell -500 from -1000).
        accumulate_device: where the float slab lives; default the device windows run on.
        importance: ``(roi, mode, sigma_scale, dtype, device) -> map``, the source of the blending
            weights (an :class:`~pipelines.engine.runner.Engine`'s cached ``importance_map``);
            default MONAI's, computed once per device by this grid.

    Raises ValueError (TypeError for an image that is not a tensor) for a bad argument; the
    windows come from :func:`plan_windows`.
    """

    def __init__(
        self,
        image: torch.Tensor,
        roi_size: int | Sequence[int],
        *,
        overlap: float | Sequence[float] = 0.5,
        step: int | Sequence[int] | None = None,
        mode: str = "gaussian",
        sigma_scale: float = 0.125,
        output: Literal["labels", "scores", "both"] = "labels",
        scores_path: str | Path | None = None,
        skip_below: float | None = None,
        skip_source: torch.Tensor | None = None,
        accumulate_device: torch.device | str | None = None,
        pad_value: float = 0.0,
        importance: Callable[..., torch.Tensor] | None = None,
    ):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"DenseGrid takes a (C, D, H, W) torch tensor, got {type(image).__name__}")
        if image.ndim != 4:
            raise ValueError(f"DenseGrid takes a (C, D, H, W) torch tensor, got shape {tuple(image.shape)}")
        roi = as_roi(roi_size)
        if mode not in MODES:
            raise ValueError(f"mode must be gaussian or constant, got {mode!r}")
        if output not in ("labels", "scores", "both"):
            raise ValueError(f"output must be labels, scores or both, got {output!r}")
        self.original_shape = tuple(image.shape[1:])
        # MONAI's padding: split the shortfall, the smaller half first
        self.pad = [((max(r - s, 0)) // 2, max(r - s, 0) - (max(r - s, 0)) // 2) for s, r in zip(self.original_shape, roi)]
        if skip_source is not None and (skip_source.ndim != 4 or tuple(skip_source.shape[1:]) != self.original_shape):
            raise ValueError(f"skip_source must be (C, {', '.join(map(str, self.original_shape))}) like the image, "
                             f"got {tuple(skip_source.shape)}")
        flat = [p for a, b in reversed(self.pad) for p in (a, b)]
        if skip_below is not None and skip_source is None and any(flat):
            skip_source = image  # tested apart from the image, so that its zero padding cannot count as foreground
        if any(flat):
            image = torch.nn.functional.pad(image, flat, mode="constant", value=pad_value)
            if skip_source is not None:  # padding never counts as foreground
                skip_source = torch.nn.functional.pad(skip_source, flat, mode="constant", value=-math.inf)
        self.image = image
        self.shape = tuple(image.shape[1:])
        self.window_shape = (image.shape[0], *roi)
        self.roi = roi
        self.all_windows = plan_windows(self.original_shape, roi, overlap, step=step)
        self.mode, self.sigma_scale = mode, sigma_scale
        self._importance = importance if importance is not None else self._own_importance
        self._maps: dict[tuple, torch.Tensor] = {}
        self.output, self.scores_path = output, Path(scores_path) if scores_path is not None else None
        self._scores_tmp: Path | None = None  # the memory map is written here and renamed by finalize
        if self.scores_path is not None and self.scores_path.suffix != ".npy":  # np.load reads it back; nothing else here
            raise ValueError(f"{self.scores_path}: class scores are written as a .npy file")
        if self.scores_path is not None and not self.scores_path.parent.is_dir():
            raise ValueError(f"{self.scores_path.parent}: no such folder for the class scores")
        self.acc_device = torch.device(accumulate_device) if accumulate_device is not None else None
        if skip_below is not None:
            src = self.image if skip_source is None else skip_source
            self.run = [w for w in self.all_windows if bool((self._crop(w, src) > skip_below).any())]
        else:
            self.run = list(self.all_windows)
        self.skipped = len(self.all_windows) - len(self.run)
        self._pos = {w.index: i for i, w in enumerate(self.run)}
        self._next = 0  # windows of self.run added so far
        self._lo = 0  # first depth not yet finalised (padded coordinates)
        self._acc: torch.Tensor | None = None  # (K, roi depth, H, W) ring
        self._wsum: torch.Tensor | None = None  # (roi depth, H, W) ring
        self.n_classes: int | None = None
        self.labels: torch.Tensor | None = None
        self.scores: torch.Tensor | np.ndarray | None = None

    def _own_importance(self, roi, mode, sigma_scale, dtype, device) -> torch.Tensor:
        key = (dtype, str(device))
        if key not in self._maps:
            self._maps[key] = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device=device, dtype=dtype)
        return self._maps[key]

    # ---------------------------------------------------------------- domain API
    def windows(self) -> list[Window]:
        return self.run

    def _crop(self, w: Window, source: torch.Tensor | None = None) -> torch.Tensor:
        (d, h, x), (rd, rh, rx) = w.start, self.roi
        return (self.image if source is None else source)[:, d : d + rd, h : h + rh, x : x + rx]

    def gather(self, ws: Sequence[Window]) -> torch.Tensor:
        return torch.stack([self._crop(w) for w in ws]).contiguous()

    def check(self, ws: Sequence[Window], out: torch.Tensor) -> None:
        want = (len(ws), *self.roi)
        if not isinstance(out, torch.Tensor) or out.ndim != 5 or (out.shape[0], *out.shape[2:]) != want:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the predictor returned {got} for a batch of {len(ws)} windows; expected ({len(ws)}, K, {', '.join(map(str, self.roi))})")
        if out.shape[1] < 1:
            raise ValueError(f"the predictor returned 0 channels for a batch of {len(ws)} windows; expected one per class")
        if self.n_classes is not None and out.shape[1] != self.n_classes:
            raise ValueError(f"the predictor returned {out.shape[1]} channels, earlier windows had {self.n_classes}")
        finite = torch.isfinite(out).flatten(1).all(1)
        if not bool(finite.all()):
            bad = ws[int((~finite).nonzero()[0])]
            at = tuple(max(s - p[0], 0) for s, p in zip(bad.start, self.pad))  # in the input, not its padding
            raise NonFiniteOutput(f"the predictor returned NaN or inf for the window starting at voxel {at} (size {self.roi})")

    def accumulate_on_cpu(self) -> bool:
        if self.acc_device is not None and self.acc_device.type == "cpu":
            return False
        self.acc_device = torch.device("cpu")
        if self._acc is not None:
            self._acc, self._wsum = self._acc.cpu(), self._wsum.cpu()
        return True

    def accumulator_bytes(self, n_classes: int) -> int:
        _, h, x = self.shape
        return (n_classes + 1) * self.roi[0] * h * x * 4  # the float32 ring and its weight sums

    def _setup(self, out: torch.Tensor) -> None:
        # Everything is allocated first and recorded last: an out-of-memory error part-way
        # leaves the grid as it was, so the runner's retry sets it up again.
        k = int(out.shape[1])
        dev = self.acc_device if self.acc_device is not None else out.device
        _, h, x = self.shape
        # A ring of one window's depth: depth d lives at d % roi[0]. Depths are finalised
        # before a window that starts past them is added, so the live range never exceeds it.
        cap = self.roi[0]
        acc = torch.zeros((k, cap, h, x), dtype=torch.float32, device=dev)
        wsum = torch.zeros((cap, h, x), dtype=torch.float32, device=dev)
        if self.output in ("labels", "both"):
            self.labels = torch.zeros(self.original_shape, dtype=label_dtype(k))
        if self.output in ("scores", "both"):
            shape = (k, *self.original_shape)
            self.scores = self._zero_scores(shape)
        self._acc, self._wsum, self.acc_device, self.n_classes = acc, wsum, dev, k

    def _zero_scores(self, shape: tuple[int, ...]) -> torch.Tensor | np.ndarray:
        if self.scores_path is None:
            return torch.zeros(shape, dtype=torch.float32)
        # a hidden name beside the target until finalize: a failed run leaves no partial .npy there
        self._scores_tmp = self.scores_path.with_name(f".{self.scores_path.name}.tmp-{os.getpid()}")
        return np.lib.format.open_memmap(str(self._scores_tmp), mode="w+", dtype=np.float32, shape=shape)

    def discard(self) -> None:
        """Remove the half-written scores file of a run that failed."""
        if self._scores_tmp is not None:
            self.scores = None
            self._scores_tmp.unlink(missing_ok=True)
            self._scores_tmp = None

    def _ring(self, d0: int, d1: int) -> list[tuple[slice, slice]]:
        """(ring slice, offset slice within [d0, d1)) pairs covering depths [d0, d1)."""
        return [(slice(p, p + n), slice(d - d0, d - d0 + n)) for d, p, n in ring_runs(d0, d1, self._acc.shape[1])]

    def accumulate(self, ws: Sequence[Window], out: torch.Tensor) -> None:
        if self.n_classes is None:
            self._setup(out)
        dev = self.acc_device
        imp = self._importance(self.roi, self.mode, self.sigma_scale, torch.float32, dev)
        weighted = out.to(dev, torch.float32) * imp  # allocated before any sum changes
        rd, rh, rx = self.roi
        for j, w in enumerate(ws):
            if self._pos[w.index] < self._next:
                continue  # added before an out-of-memory retry of this batch
            self._finalize_until(w.start[0])  # no later window reaches below this start
            d, h, x = w.start
            for ring, off in self._ring(d, d + rd):
                self._acc[:, ring, h : h + rh, x : x + rx] += weighted[j][:, off]
                self._wsum[ring, h : h + rh, x : x + rx] += imp[off]
            self._next += 1
        if self._next == len(self.run):
            self._finalize_until(self.shape[0])

    def _finalize_until(self, upto: int) -> None:
        """Blend, reduce and write depths [self._lo, upto), then clear their ring slots."""
        upto = min(upto, self.shape[0])
        if upto <= self._lo:
            return
        (pd, _), (ph, _), (px, _) = self.pad
        hs, xs = slice(ph, ph + self.original_shape[1]), slice(px, px + self.original_shape[2])
        # a few depths at a time keeps the temporaries small whatever the class count
        plane = self.n_classes * self._acc.shape[2] * self._acc.shape[3] * 4
        step = max(1, min(self.roi[0], (256 << 20) // max(plane, 1)))
        for c0 in range(self._lo, upto, step):
            c1 = min(c0 + step, upto)
            for ring, off in self._ring(c0, c1):
                lo_o = c0 + off.start - pd
                hi_o = lo_o + (off.stop - off.start)
                a, b = max(lo_o, 0), min(hi_o, self.original_shape[0])
                if b > a:
                    r = slice(ring.start + (a - lo_o), ring.start + (b - lo_o))
                    wsum = self._wsum[r, hs, xs]
                    covered = wsum > 0
                    part = self._acc[:, r, hs, xs] / torch.where(covered, wsum, torch.ones_like(wsum))
                    if self.labels is not None:
                        lab = part.argmax(0)
                        lab[~covered] = 0
                        self.labels[a:b] = lab.to(self.labels.dtype).cpu()
                    if self.scores is not None:
                        if isinstance(self.scores, np.ndarray):
                            self.scores[:, a:b] = part.cpu().numpy()
                        else:
                            self.scores[:, a:b] = part.cpu()
                self._acc[:, ring] = 0
                self._wsum[ring] = 0
            self._lo = c1  # per chunk: a retry after an out-of-memory error resumes here

    def finalize(self) -> DenseGrid:
        if self.n_classes is None:  # segment_volume finishes an all-skipped grid without the runner
            raise RuntimeError("finalize before any window was accumulated: no output to stitch")
        self._finalize_until(self.shape[0])  # (already done after the last window; a no-op then)
        self._publish_scores()
        return self

    def finalize_all_skipped(self, n_classes: int | None) -> DenseGrid:
        """Outputs for a grid whose windows were all skipped: background labels, zero scores.

        Zero scores need the class count, which no predictor call gave here: ``n_classes``.
        """
        if self.output in ("labels", "both"):
            self.labels = empty_result_labels(self.original_shape)
        if self.output in ("scores", "both"):
            if n_classes is None:
                raise ValueError("every window was skipped as empty, so the predictor never said how many classes "
                                 "it has: pass n_classes for the zero class scores")
            self.scores = self._zero_scores((int(n_classes), *self.original_shape))
            self._publish_scores()
        return self

    def _publish_scores(self) -> None:
        if isinstance(self.scores, np.memmap):
            self.scores.flush()
        if self._scores_tmp is not None:
            os.replace(self._scores_tmp, self.scores_path)  # the open map stays valid on the renamed file
            self._scores_tmp = None


def empty_result_labels(shape: Sequence[int]) -> torch.Tensor:
    """Labels for a volume whose windows were all skipped: background everywhere."""
    return torch.zeros(tuple(shape), dtype=torch.uint8)


INPUT_ON_DEVICE_SHARE = 0.25
"""Largest share of the GPU's free memory the whole input may take to be copied there at once."""


def fits_on_device(image: torch.Tensor, device: torch.device) -> bool:
    """Whether ``image`` takes at most :data:`INPUT_ON_DEVICE_SHARE` of ``device``'s free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return image.numel() * image.element_size() <= INPUT_ON_DEVICE_SHARE * free


def segment_volume(
    engine: Engine,
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    roi_size: int | Sequence[int],
    output: Literal["labels", "scores", "both"] = "labels",
    scores_path: str | Path | None = None,
    skip_below: float | None = None,
    skip_source: torch.Tensor | None = None,
    n_classes: int | None = None,
    input_on_device: bool | None = None,
    full_batches: bool = False,
    progress: bool = False,
) -> tuple[DenseGrid, EngineReport]:
    """Sliding-window inference over one ``(C, D, H, W)`` volume through ``engine``.

    The engine's settings give the overlap, blending mode and sigma, batch size, device,
    autocast and mirror axes (flip test-time augmentation); its cache gives the importance map.
    Returns the finished :class:`DenseGrid` (``.labels`` and/or ``.scores``, ``.skipped``)
    and the run's :class:`EngineReport`. ``skip_below``/``skip_source``: see :class:`DenseGrid`.
    ``input_on_device``: copy the whole input to the
    GPU once and crop windows there, with no copy thread (default: when it takes at most
    :data:`INPUT_ON_DEVICE_SHARE` of the GPU's free memory); otherwise each batch is cropped on
    the CPU and copied by a thread while the previous one runs. On the CPU, windows are cropped
    in turn with no thread. ``full_batches``: run the last batch at the
    full batch size too (see :meth:`~pipelines.engine.runner.Engine.run`), for a compiled predictor.
    ``n_classes``: the predictor's class count, needed only for the zero scores of a volume whose
    windows are all skipped. ``scores_path`` is written under a temporary name and renamed at the end.
    Raises TypeError/ValueError for bad arguments (a predictor's output of the wrong shape
    included), NonFiniteOutput (a MedvitError) when the predictor returns NaN or inf.
    """
    if not isinstance(engine, Engine):
        raise TypeError(f"segment_volume takes an Engine first, got {type(engine).__name__}")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"segment_volume takes a (C, D, H, W) torch tensor, got {type(image).__name__}")
    settings = engine.settings
    dev = settings.device
    if input_on_device is None:
        input_on_device = dev.type == "cuda" and image.device.type == "cpu" and fits_on_device(image, dev)
    if input_on_device and dev.type != "cpu":
        image = image.to(dev)
    grid = DenseGrid(image, roi_size, overlap=settings.overlap, mode=settings.mode, sigma_scale=settings.sigma_scale,
                     output=output, scores_path=scores_path, skip_below=skip_below, skip_source=skip_source,
                     importance=engine.importance_map)
    rep = EngineReport(windows_planned=len(grid.all_windows), windows_skipped=grid.skipped)
    rep.input_device = str(image.device)
    pred = mirrored(predictor, settings.mirror_axes) if settings.mirror_axes else predictor
    if not grid.run:
        rep.notes.append("every window was skipped as empty")
        return grid.finalize_all_skipped(n_classes), rep
    # A copy thread only where there is a copy: cropping on the GPU is a few kernel launches (a
    # thread would compete with the launching one for the GIL), and on the CPU there is nothing
    # to overlap while a thread running torch ops adds a second OpenMP thread team
    try:
        grid, rep = engine.run(grid, pred, progress=progress, report=rep,
                               prefetch=image.device.type == "cpu" and dev.type != "cpu", full_batches=full_batches)
    except BaseException:
        grid.discard()
        raise
    rep.accumulate_device = str(grid.acc_device)
    return grid, rep


def _per_case(inputs: torch.Tensor, predictor, output: str, engine: Engine | None, options: dict,
              progress: bool = False) -> list[DenseGrid]:
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 5:
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"sliding-window inference takes (B, C, D, H, W), got {got}")
    given = {k: v for k, v in options.items() if v is not None and k != "roi_size"}
    if engine is None:
        defaults = dict(sw_batch_size=4, overlap=0.5, mode="gaussian", device=inputs.device)
        o = {**defaults, **given}
        engine = Engine(InferenceSettings(overlap=o["overlap"], batch_size=o["sw_batch_size"], mode=o["mode"],
                                          device=o["device"]))
    elif given:
        raise TypeError(f"give either an engine or {', '.join(sorted(given))}, not both: the engine's settings decide")
    return [segment_volume(engine, inputs[b], predictor, roi_size=options["roi_size"], output=output,
                           progress=progress)[0] for b in range(inputs.shape[0])]


def sliding_window(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    roi_size: int | Sequence[int],
    sw_batch_size: int | None = None,
    overlap: float | None = None,
    mode: str | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    engine: Engine | None = None,
) -> torch.Tensor:
    """Blended class scores for a ``(B, C, D, H, W)`` batch, like MONAI's ``sliding_window_inference``.

    Returns ``(B, K, D, H, W)`` float32 on the CPU. Without ``engine``, a fresh one runs with
    ``sw_batch_size`` (default 4), ``overlap`` (0.5), ``mode`` (gaussian) on ``device`` (default:
    the input's device); with one, its settings decide and those options must be left out
    (TypeError otherwise).
    """
    grids = _per_case(inputs, predictor, "scores", engine, dict(roi_size=roi_size, sw_batch_size=sw_batch_size,
                                                                overlap=overlap, mode=mode, device=device), progress)
    return torch.stack([g.scores for g in grids])


def sliding_window_labels(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    roi_size: int | Sequence[int],
    sw_batch_size: int | None = None,
    overlap: float | None = None,
    mode: str | None = None,
    device: torch.device | str | None = None,
    engine: Engine | None = None,
) -> torch.Tensor:
    """Argmax labels ``(B, D, H, W)`` without ever holding the full class-score volume; the
    options as for :func:`sliding_window`."""
    grids = _per_case(inputs, predictor, "labels", engine, dict(roi_size=roi_size, sw_batch_size=sw_batch_size,
                                                                overlap=overlap, mode=mode, device=device))
    return torch.stack([g.labels.long() for g in grids])


def windows_for(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows a volume of ``shape`` needs (after padding to the roi): :func:`plan_windows`' count."""
    return len(plan_windows(shape, roi_size, overlap))
