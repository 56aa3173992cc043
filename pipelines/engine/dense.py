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

from medvit.core.errors import MedvitError, NonFiniteOutput
from pipelines.engine.runner import EngineReport, check_batch_size, mirrored, ring_runs, run_windows

_IMPORTANCE: dict[tuple, torch.Tensor] = {}


def importance_map(roi: tuple[int, ...], mode: str, sigma_scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """MONAI's importance map for ``roi``, cached per (roi, mode, sigma, dtype, device)."""
    key = (tuple(roi), mode, float(sigma_scale), dtype, str(device))
    if key not in _IMPORTANCE:
        _IMPORTANCE[key] = compute_importance_map(roi, mode=mode, sigma_scale=sigma_scale, device=device, dtype=dtype)
    return _IMPORTANCE[key]


def scan_interval(image: Sequence[int], roi: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """Window step per axis: ``int(roi * (1 - overlap))``, at least 1; the roi itself where it fills the axis."""
    return tuple(int(r) if r == s else max(1, int(r * (1 - o))) for s, r, o in zip(image, roi, overlap))


@dataclass(frozen=True)
class Window:
    index: int
    start: tuple[int, int, int]
    """First voxel of the window in the padded volume."""


def label_dtype(n_classes: int) -> torch.dtype:
    if n_classes <= 256:
        return torch.uint8
    if n_classes <= 65536:
        return torch.int32  # stored as uint16 on disk; torch's uint16 lacks argmax/indexing support
    raise MedvitError(f"{n_classes} classes do not fit a 16-bit label map")


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
    ):
        if not isinstance(image, torch.Tensor) or image.ndim != 4:
            got = f"shape {tuple(image.shape)}" if isinstance(image, torch.Tensor) else type(image).__name__
            raise MedvitError(f"DenseGrid takes a (C, D, H, W) torch tensor, got {got}")
        roi = (int(roi_size),) * 3 if isinstance(roi_size, (int, np.integer)) else tuple(int(r) for r in roi_size)
        if len(roi) != 3 or min(roi) < 1:
            raise MedvitError(f"roi_size must be three positive sizes, got {roi_size}")
        ov = tuple(float(o) for o in (overlap if isinstance(overlap, Sequence) else (overlap,) * 3))
        if len(ov) == 1:
            ov *= 3
        if len(ov) != 3:  # zip would silently plan windows on fewer axes and leave voxels unscored
            raise MedvitError(f"overlap must be one value or one per spatial axis (3), got {overlap}")
        if any(not 0 <= o < 1 for o in ov):
            raise MedvitError(f"overlap must lie in [0, 1), got {overlap}")
        if mode not in ("gaussian", "constant"):
            raise MedvitError(f"mode must be gaussian or constant, got {mode!r}")
        if output not in ("labels", "scores", "both"):
            raise MedvitError(f"output must be labels, scores or both, got {output!r}")
        self.original_shape = tuple(image.shape[1:])
        # MONAI's padding: split the shortfall, the smaller half first
        self.pad = [((max(r - s, 0)) // 2, max(r - s, 0) - (max(r - s, 0)) // 2) for s, r in zip(self.original_shape, roi)]
        if skip_source is not None and (skip_source.ndim != 4 or tuple(skip_source.shape[1:]) != self.original_shape):
            raise MedvitError(f"skip_source must be (C, {', '.join(map(str, self.original_shape))}) like the image, "
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
        if step is not None:
            self.step = (int(step),) * 3 if isinstance(step, (int, np.integer)) else tuple(int(s) for s in step)
            if len(self.step) != 3 or min(self.step) < 1:
                raise MedvitError(f"step must be three sizes of at least 1 voxel, got {step}")
            if any(s > r for s, r in zip(self.step, roi)):
                raise MedvitError(f"step {self.step} is larger than the roi {roi} in an axis: voxels between "
                                  "windows would get no score")
        else:
            self.step = scan_interval(self.shape, roi, ov)
        slices = dense_patch_slices(self.shape, roi, self.step, return_slice=False)
        starts = sorted(tuple(int(v) for v in s[:, 0]) for s in np.asarray(slices))
        self.mode, self.sigma_scale = mode, sigma_scale
        self.output, self.scores_path = output, Path(scores_path) if scores_path is not None else None
        self._scores_tmp: Path | None = None  # the memory map is written here and renamed by finalize
        if self.scores_path is not None and self.scores_path.suffix != ".npy":  # np.load reads it back; nothing else here
            raise MedvitError(f"{self.scores_path}: class scores are written as a .npy file")
        if self.scores_path is not None and not self.scores_path.parent.is_dir():
            raise MedvitError(f"{self.scores_path.parent}: no such folder for the class scores")
        self.acc_device = torch.device(accumulate_device) if accumulate_device is not None else None
        self.all_windows = [Window(i, s) for i, s in enumerate(starts)]
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
            raise MedvitError(f"the predictor returned {got} for a batch of {len(ws)} windows; expected ({len(ws)}, K, {', '.join(map(str, self.roi))})")
        if out.shape[1] < 1:
            raise MedvitError(f"the predictor returned 0 channels for a batch of {len(ws)} windows; expected one per class")
        if self.n_classes is not None and out.shape[1] != self.n_classes:
            raise MedvitError(f"the predictor returned {out.shape[1]} channels, earlier windows had {self.n_classes}")
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
        imp = importance_map(self.roi, self.mode, self.sigma_scale, torch.float32, dev)
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
        if self.n_classes is None:
            raise MedvitError("no window was run: every window was skipped as empty, so there is no output to stitch")
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
                raise MedvitError("every window was skipped as empty, so the predictor never said how many classes "
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
    image: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    roi_size: int | Sequence[int],
    batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    output: Literal["labels", "scores", "both"] = "labels",
    scores_path: str | Path | None = None,
    skip_below: float | None = None,
    skip_source: torch.Tensor | None = None,
    mirror_axes: Sequence[int] = (),
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
    input_on_device: bool | None = None,
    full_batches: bool = False,
    n_classes: int | None = None,
) -> tuple[DenseGrid, EngineReport]:
    """Sliding-window inference over one ``(C, D, H, W)`` volume through the engine.

    Returns the finished :class:`DenseGrid` (``.labels`` and/or ``.scores``, ``.skipped``)
    and the run's :class:`EngineReport`. ``mirror_axes`` turns on flip test-time
    augmentation over those spatial axes. ``input_on_device``: copy the whole input to the
    GPU once and crop windows there, with no copy thread (default: when it takes at most
    :data:`INPUT_ON_DEVICE_SHARE` of the GPU's free memory); otherwise each batch is cropped on
    the CPU and copied by a thread while the previous one runs. On the CPU, windows are cropped
    in turn with no thread. ``full_batches``: run the last batch at the
    full batch size too (see :func:`~pipelines.engine.runner.run_windows`), for a compiled predictor.
    ``n_classes``: the predictor's class count, needed only for the zero scores of a volume whose
    windows are all skipped. ``scores_path`` is written under a temporary name and renamed at the end.
    """
    if not isinstance(image, torch.Tensor):
        raise MedvitError(f"segment_volume takes a (C, D, H, W) torch tensor, got {type(image).__name__}")
    check_batch_size(batch_size)  # here too: a volume whose windows are all skipped never reaches the runner
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if input_on_device is None:
        input_on_device = dev.type == "cuda" and image.device.type == "cpu" and fits_on_device(image, dev)
    if input_on_device and dev.type != "cpu":
        image = image.to(dev)
    grid = DenseGrid(image, roi_size, overlap=overlap, mode=mode, output=output, scores_path=scores_path,
                     skip_below=skip_below, skip_source=skip_source)
    rep = EngineReport(windows_planned=len(grid.all_windows), windows_skipped=grid.skipped)
    rep.input_device = str(image.device)
    pred = mirrored(predictor, mirror_axes) if mirror_axes else predictor  # (checks the axes even if none runs)
    if not grid.run:
        rep.notes.append("every window was skipped as empty")
        return grid.finalize_all_skipped(n_classes), rep
    # A copy thread only where there is a copy: cropping on the GPU is a few kernel launches (a
    # thread would compete with the launching one for the GIL), and on the CPU there is nothing
    # to overlap while a thread running torch ops adds a second OpenMP thread team (UNETR on the
    # 2-core CPU: 20.1 / 19.7 s with the thread, 19.9 / 18.8 s without)
    try:
        grid, rep = run_windows(grid, pred, batch_size=batch_size, device=dev, amp_dtype=amp_dtype,
                                progress=progress, report=rep, prefetch=image.device.type == "cpu" and dev.type != "cpu",
                                full_batches=full_batches)
    except BaseException:
        grid.discard()
        raise
    rep.accumulate_device = str(grid.acc_device)
    return grid, rep


def _per_case(inputs: torch.Tensor, predictor, output: str, **kwargs) -> list[DenseGrid]:
    if inputs.ndim != 5:
        raise MedvitError(f"sliding-window inference takes (B, C, D, H, W), got shape {tuple(inputs.shape)}")
    return [segment_volume(inputs[b], predictor, output=output, **kwargs)[0] for b in range(inputs.shape[0])]


def sliding_window(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Blended class scores for a ``(B, C, D, H, W)`` batch, like MONAI's ``sliding_window_inference``.

    Returns ``(B, K, D, H, W)`` float32 on the CPU. Windows run on ``device`` (default: the
    input's device).
    """
    grids = _per_case(inputs, predictor, "scores", roi_size=roi_size, batch_size=sw_batch_size, overlap=overlap,
                      mode=mode, device=device or inputs.device, progress=progress)
    return torch.stack([g.scores for g in grids])


def sliding_window_labels(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Argmax labels ``(B, D, H, W)`` without ever holding the full class-score volume."""
    grids = _per_case(inputs, predictor, "labels", roi_size=roi_size, batch_size=sw_batch_size, overlap=overlap,
                      mode=mode, device=device or inputs.device)
    return torch.stack([g.labels.long() for g in grids])


def windows_for(shape: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many windows a volume of ``shape`` needs (after padding to the roi)."""
    padded = [max(s, r) for s, r in zip(shape, roi_size)]
    step = scan_interval(padded, roi_size, (overlap,) * 3)
    return math.prod(math.ceil((s - r) / t) + 1 if s > r else 1 for s, r, t in zip(padded, roi_size, step))
