"""Segment volumes: read → preprocess → engine → invert → write (``medvit segment``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from medvit.checkpoint import LoadedModel
from medvit.errors import InputError, MedvitError, about
from medvit.io import LoadVolumed, check_output_folder, write_label_map
from medvit.io.reader import channel_mismatch, source_format
from medvit.io.writers import check_writable
from medvit.transforms import infer_transforms, invert_prediction, run_chain
from pipelines.engine import EngineReport, segment_volume

if TYPE_CHECKING:
    from monai.transforms import Compose

log = logging.getLogger(__name__)

THIN_FRACTION = 0.25
"""An axis of the net's input shorter than this fraction of the window is warned about."""

PROB_RESAMPLE_BUDGET = 2 << 30
"""Bytes of float32 class scores on the input grid up to which scores, not labels, are resampled."""


@dataclass
class CaseResult:
    input: list[str]
    labels_path: Path
    resampled: str
    engine: EngineReport | None = None
    stats_paths: list[Path] = field(default_factory=list)
    preview_path: Path | None = None


def case_name(path: str | Path) -> str:
    """Output stem for an input: the file name without image extensions, or the folder name."""
    p = Path(path)
    name = p.name or p.resolve().name  # "." or "..": the folder's own name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


@dataclass
class Prepared:
    """A loaded case after the checkpoint's preprocessing, with the engine's empty-window test."""

    chain: Compose
    data: dict
    """What ``chain`` returned (its image's ``applied_operations`` invert the prediction)."""
    image: torch.Tensor
    """``(C, D, H, W)`` the net's input."""
    skip_below: float | None
    skip_source: torch.Tensor | None


def preprocess_case(pre, loaded: dict, skip_below_hu: float | None = None) -> Prepared:
    """Run the ``preprocess`` chain on a loaded case, with ``--skip-below-hu`` as the engine's test.

    Inside the checkpoint's CT window the preprocessed image itself tells HU apart, so the
    threshold is mapped to its [0, 1] units. A clipping window cannot: -500 HU and air both read
    0 below a -175 HU floor. Then the chain runs without the clip (its last step that changes
    values) and the net's input is that output clamped to [0, 1], the values the clip gives; the
    unclamped output (HU mapped linearly, on the same grid) is what the test reads.
    """
    threshold, unclip = None, False
    if skip_below_hu is not None:
        icfg = pre.intensity
        if icfg.modality != "ct":
            raise MedvitError("--skip-below-hu needs a CT checkpoint (its HU window); this one is for MRI")
        lo, hi = icfg.window
        threshold = (skip_below_hu - lo) / (hi - lo)
        unclip = icfg.clip and not lo <= skip_below_hu < hi
        if unclip:
            pre = pre.model_copy(update={"intensity": icfg.model_copy(update={"clip": False})})
    chain = infer_transforms(pre, load=False)
    data = run_chain(chain, dict(loaded))  # a check's user error stays one line
    image = data["image"].as_tensor()
    if unclip:
        return Prepared(chain, data, image.clamp(0.0, 1.0), threshold, image)
    return Prepared(chain, data, image, threshold, None)


def check_net_extent(shape, roi, where: str, orientation: str = "RAS") -> None:
    """Warn when the net's input ``shape`` (X, Y, Z, after preprocessing) is shorter than
    :data:`THIN_FRACTION` of the window ``roi`` along an axis: the engine pads it to the window,
    so a 3D net given a slice or two runs on mostly padding. An axis of no voxels cannot be
    run at all: InputError naming ``where``."""
    names = [f"{i} ({orientation[i]})" for i in range(3)]
    empty = [names[i] for i, n in enumerate(shape) if n < 1]
    if empty:
        raise InputError(where, f"after preprocessing has no voxel along axis {', '.join(empty)}; the net cannot run")
    thin = [(names[i], int(n), int(r)) for i, (n, r) in enumerate(zip(shape, roi)) if n < THIN_FRACTION * r]
    if thin:
        said = "; ".join(f"{n} voxel{'s' if n != 1 else ''} along axis {a} for a window of {r}" for a, n, r in thin)
        log.warning("%s: the net sees %s (under %g of its window, padded to it): a 3D net given a slice or two "
                    "sees mostly padding and its labels may be poor", where, said, THIN_FRACTION)


def _is_2d_nifti(paths: list[str]) -> bool:
    if len(paths) != 1 or source_format(Path(paths[0])) != "nifti":
        return False
    import nibabel as nib

    return len(nib.load(paths[0]).shape) == 2  # the header alone


def _choose_resample(resample: str, n_classes: int, in_grid_voxels: int) -> str:
    if resample == "auto":
        return "probs" if n_classes * in_grid_voxels * 4 <= PROB_RESAMPLE_BUDGET else "labels"
    return resample


def segment_case(
    paths: list[str],
    model: LoadedModel,
    out_dir: Path,
    *,
    name: str | None = None,
    device: str | torch.device = "cpu",
    overlap: float | None = None,
    batch_size: int | None = None,
    series: str | None = None,
    nonfinite: Literal["error", "replace"] = "error",
    stats: bool = False,
    preview: bool = False,
    resample: Literal["auto", "probs", "labels"] = "auto",
    progress: bool = False,
    protect: list[str] | None = None,
    skip_below_hu: float | None = None,
    tta: bool = False,
    tilt: Literal["resample", "keep", "error"] = "resample",
) -> CaseResult:
    """Segment one case (one path, or one path per channel) and write its label map.

    The label map is ``OUT_DIR/NAME_seg.nii.gz`` in the input's geometry; with ``stats``,
    ``NAME_stats.csv`` and ``NAME_stats.json``; with ``preview``, ``NAME_preview.png``.
    A gantry-tilted DICOM series is, by ``tilt``, resampled onto an orthogonal grid that every
    output is then on, segmented on its sheared grid, or refused (see :func:`medvit.io.read_image`).
    """
    cfg = model.config
    name = name or case_name(paths[0])
    key_in = paths if len(paths) > 1 else paths[0]
    loaded = LoadVolumed(keys="image", series=series, nonfinite=nonfinite, tilt=tilt)({"image": key_in})
    original = loaded["image"]
    if original.shape[0] != cfg.model.in_channels:
        raise channel_mismatch(original, cfg.model.in_channels, f"the checkpoint's {cfg.model.name}")
    affine = np.asarray(original.affine, dtype=np.float64)
    codes = tuple(int(c) for c in original.meta.get("medvit_xform_codes", (1, 1)))  # an sform code 2 stays 2
    keep = original.clone() if (stats or preview) else None
    prep = preprocess_case(cfg.preprocess, loaded, skip_below_hu)
    check_net_extent(prep.image.shape[1:], cfg.model.roi_size, ", ".join(paths), cfg.preprocess.orientation)
    dev = torch.device(device)
    how = _choose_resample(resample, int(cfg.model.out_channels), int(np.prod(original.shape[1:])))
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if dev.type == "cuda" else None
    # an engine error (say NaN from the net) names the case and the checkpoint
    with about(", ".join(paths), f"; window positions are on the preprocessed grid; checkpoint {model.meta.get('checkpoint')}"):
        grid, report = segment_volume(
            prep.image,
            model.net,
            roi_size=cfg.model.roi_size,
            # On the CPU one window at a time: measured as fast as 4 and a quarter of the activations
            batch_size=batch_size or (1 if dev.type == "cpu" else cfg.infer.sw_batch_size),
            overlap=cfg.infer.overlap if overlap is None else overlap,
            mode=cfg.infer.mode,
            output="scores" if how == "probs" else "labels",
            skip_below=prep.skip_below,
            skip_source=prep.skip_source,
            mirror_axes=(0, 1, 2) if tta else (),
            device=dev,
            amp_dtype=amp,
            progress=progress,
            n_classes=int(cfg.model.out_channels),
        )
    if report.windows_run == 0:
        # every window was skipped as empty: background everywhere, on the input grid
        labels = torch.zeros(original.shape[1:], dtype=torch.int32)
    elif how == "probs":
        # class scores back to the input grid (bilinear), then argmax there: smoother borders
        scores = torch.softmax(grid.scores, 0)
        labels = torch.as_tensor(invert_prediction(scores, prep.data, prep.chain, mode="bilinear")).argmax(0)
    else:
        inv = invert_prediction(grid.labels[None].to(torch.int32), prep.data, prep.chain, mode="nearest")
        labels = torch.as_tensor(inv)[0]
    labels = labels.cpu().numpy().astype(np.int32)

    result = CaseResult(input=list(paths), labels_path=out_dir / f"{name}_seg.nii.gz", resampled=how, engine=report)
    # a 2D NIfTI was read as X x Y x 1; its label map is written back in the input's own shape
    write_label_map(labels[:, :, 0] if _is_2d_nifti(paths) else labels, affine, result.labels_path,
                    protect=list(paths) + list(protect or []), codes=codes)
    if stats or preview:
        from pipelines.report import label_stats, write_preview, write_stats

        image0 = keep.as_tensor()[0].numpy()
        if stats:
            rows = label_stats(labels, image0, affine, names=cfg.labels)
            result.stats_paths = [out_dir / f"{name}_stats.csv", out_dir / f"{name}_stats.json"]
            write_stats(rows, *result.stats_paths)
        if preview:
            result.preview_path = out_dir / f"{name}_preview.png"
            window = tuple(cfg.preprocess.intensity.window) if cfg.preprocess.intensity.modality == "ct" else None
            write_preview(image0, labels, affine, result.preview_path, window=window)
    return result


def segment_inputs(
    cases: list[list[str]],
    model: LoadedModel,
    out_dir: str | Path,
    **kwargs,
) -> list[CaseResult]:
    """Segment each case in turn (one path, or one path per channel); see :func:`segment_case`.

    Checked before any case runs: every path exists, the output folder is not a file and can be
    written, no two cases write the same output name, and no output would replace an input.
    """
    out_dir = check_output_folder(out_dir)
    every = [p for case in cases for p in case]
    resolved = {Path(p).resolve(): p for p in every}
    names: dict[str, str] = {}
    outputs = ["_seg.nii.gz"] + (["_stats.csv", "_stats.json"] if kwargs.get("stats") else []) + \
        (["_preview.png"] if kwargs.get("preview") else [])
    for case in cases:
        shown = ",".join(case)
        if not case or any(not p for p in case):
            raise InputError(shown, "has an empty path (a stray comma?); write one case as a,b with a path on each side")
        formats = [source_format(Path(p)) for p in case]  # missing or unsupported: refused before any case runs
        if kwargs.get("series") is not None and "dicom" not in formats:
            raise InputError(shown, f"--series {kwargs['series']} picks a DICOM series, but this input is not DICOM")
        n = case_name(case[0])
        if n in names:
            raise InputError(shown, f"would write the same output name '{n}' as {names[n]}; segment them into separate folders")
        names[n] = shown
        for suffix in outputs:
            target = (out_dir / f"{n}{suffix}").resolve()
            if target in resolved:
                raise InputError(resolved[target], f"is an input and would be overwritten by the output of {shown}; "
                                                   "choose another output folder")
    if names:  # a read-only folder, before the first case runs rather than after its inference
        check_writable(out_dir / f"{next(iter(names))}{outputs[0]}")
    return [segment_case(case, model, out_dir, protect=every, **kwargs) for case in cases]
