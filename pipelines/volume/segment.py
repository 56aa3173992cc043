"""Segment volumes: read → preprocess → engine → invert → write (``medvit segment``)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

import medvit
from medvit.checkpoint import LoadedModel
from medvit.core.errors import InputError, MedvitError, about
from medvit.core.files import atomic_path, check_output_folder, check_writable
from medvit.core.weights import checkpoint_sidecar
from medvit.io import LoadVolumed, list_dicom_series, write_label_map
from medvit.io.dicom import DicomSeries, select_series
from medvit.io.formats import strip_suffix
from medvit.io.common import sha256_file
from medvit.io.reader import channel_mismatch, source_format
from medvit.transforms import infer_transforms, invert_prediction, run_chain
from pipelines.engine import Engine, EngineReport, InferenceSettings, segment_volume

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
    dicom_seg_path: Path | None = None
    dicom_seg: dict | None = None
    """What the DICOM SEG holds: segment number -> label id and name, and the labels left out."""
    rtstruct_path: Path | None = None
    rtstruct_rois: list[int] = field(default_factory=list)
    """Label ids written as RTSTRUCT ROIs (the labels present)."""
    warnings: list[str] = field(default_factory=list)
    sidecar_path: Path | None = None
    runtime: dict = field(default_factory=dict)
    """What ran the net: ``requested`` (``--runtime``), ``ran`` (torch after a fallback) and ``note``
    (why it fell back, or what ``auto`` measured)."""


def case_name(path: str | Path) -> str:
    """Output stem for an input: the file name without image extensions, or the folder name."""
    p = Path(path)
    return strip_suffix(p.name or p.resolve().name)  # "." or "..": the folder's own name


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


CT_DARKEST_HU = -50.0
"""A CT's 0.5th percentile lies below this: air (-1000 HU), lung or fat (-100 HU) fill more than
0.5 % of any CT that is in Hounsfield units (an MR, a PET or raw stored values start at about 0)."""
CT_MIN_SPREAD = 100.0
"""A CT's 0.5th to 99.5th percentiles span more than this many HU (a z-scored image spans about 10)."""
MR_CT_AIR_HU = -500.0
"""An MR checkpoint is given a CT when more than ``MR_CT_AIR_FRACTION`` of its voxels lie at or
below this: air in HU; MR magnitudes are not negative and z-scores stay within about ±10."""
MR_CT_AIR_FRACTION = 0.005
_EXPECTED_TAG = {"ct": "CT", "mri": "MR"}
_NO_MODALITY = ("", "OT")  # no tag, or DICOM's "other": the intensities decide


def _checkpoint_is_for(model: LoadedModel) -> str:
    icfg = model.config.preprocess.intensity
    what = f"CT (window {icfg.window[0]:g}..{icfg.window[1]:g} HU)" if icfg.modality == "ct" else "MRI (z-scored)"
    return f"the checkpoint {model.meta.get('checkpoint')} is for {what}"


def modality_tag_mismatch(modality: str, model: LoadedModel) -> str | None:
    """Why a DICOM series of ``modality`` does not fit the checkpoint (``"MR"`` through a CT
    checkpoint, say), or None; a blank or ``OT`` tag is left to :func:`intensity_mismatch`."""
    tag = (modality or "").strip().upper()
    expected = _EXPECTED_TAG[model.config.preprocess.intensity.modality]
    if tag in _NO_MODALITY or tag == expected:
        return None
    return f"DICOM Modality is {tag}, but {_checkpoint_is_for(model)}"


def _sample(values: torch.Tensor, n: int = 1_000_000) -> np.ndarray:
    """Up to ``n`` finite values of a tensor, drawn with a fixed seed (percentiles of 1M agree with
    the full volume's to well under a HU, and cost a fraction of sorting 100M voxels)."""
    flat = values.reshape(-1).numpy()
    if flat.size > n:
        flat = flat[np.random.default_rng(0).integers(0, flat.size, n)]
    return flat[np.isfinite(flat)]


def intensity_mismatch(channel: torch.Tensor, model: LoadedModel) -> str | None:
    """Why a channel's intensities cannot be what the checkpoint's modality expects, or None.

    A CT checkpoint wants Hounsfield units: the 0.5th percentile below ``CT_DARKEST_HU`` and the
    0.5th-99.5th percentiles at least ``CT_MIN_SPREAD`` apart. An MR checkpoint refuses a CT: more
    than ``MR_CT_AIR_FRACTION`` of the voxels at or below ``MR_CT_AIR_HU``. Percentiles, not the
    minimum and maximum, so a few stray voxels change nothing.
    """
    values = _sample(channel)
    if values.size == 0:
        return None
    if model.config.preprocess.intensity.modality == "ct":
        lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
        if hi - lo < CT_MIN_SPREAD:
            why = "too narrow for Hounsfield units (z-scored or normalised?)"
        elif lo > CT_DARKEST_HU:
            why = f"nothing as dark as air or fat (below {CT_DARKEST_HU:g}): not Hounsfield units (MR, PET, raw stored values?)"
        else:
            return None
        return f"intensities span {lo:.4g}..{hi:.4g} (0.5-99.5th percentiles), {why}; but {_checkpoint_is_for(model)}"
    dark = float(np.mean(values <= MR_CT_AIR_HU))
    if dark <= MR_CT_AIR_FRACTION:
        return None
    return (f"{100 * dark:.1f} % of the voxels lie at or below {MR_CT_AIR_HU:g} (air in Hounsfield units): a CT?; "
            f"but {_checkpoint_is_for(model)}")


def check_modality(image: torch.Tensor, paths: list[str], model: LoadedModel, *, strict: bool = False) -> str | None:
    """Warn (or, ``strict``, raise InputError) when a loaded case cannot be of the checkpoint's modality.

    ``image`` is the reader's ``(C, X, Y, Z)`` MetaTensor: its DICOM Modality tag is compared with
    the checkpoint's modality first (:func:`modality_tag_mismatch`), then each channel's intensities
    (:func:`intensity_mismatch`). Returns the message warned, or None.
    """
    source = dict(getattr(image, "meta", {}).get("medvit_source", {}))
    problems = []
    why = modality_tag_mismatch(str(source.get("modality", "")), model)
    if why is not None:
        problems.append((paths[0], why))
    else:
        values = image.as_tensor() if hasattr(image, "as_tensor") else image
        for c in range(values.shape[0]):
            why = intensity_mismatch(values[c], model)
            if why is not None:
                problems.append((paths[c] if len(paths) == values.shape[0] else paths[0], why))
                break
    if not problems:
        return None
    where, why = problems[0]
    if strict:
        raise InputError(where, f"{why}; refused by --strict")
    message = f"{where}: {why}; its labels are likely meaningless (--strict refuses such input)"
    log.warning(message)
    return message


def checkpoint_record(model: LoadedModel) -> dict:
    """What an output's sidecar says of the checkpoint: its path and SHA-256 (and its JSON
    sidecar's, for ours), the net's name, the medvit version that wrote it. A model built in code
    rather than loaded from a file has no SHA-256 (None)."""
    path = Path(str(model.meta.get("checkpoint", "(in memory)"))).resolve()
    record = {"path": str(path), "sha256": sha256_file(path) if path.is_file() else None, "net": model.config.model.name}
    sidecar = checkpoint_sidecar(path)
    if path.suffix == ".safetensors" and sidecar.is_file():
        record.update(sidecar=str(sidecar), sidecar_sha256=sha256_file(sidecar),
                      medvit_version=model.meta.get("medvit_version"))
    return record


def nifti_description(checkpoint: dict) -> str:
    """The label map's NIfTI ``descrip`` (80 bytes at most): ``medvit VERSION NET SHA256[:12]``
    (``unsaved`` for a model that was not loaded from a file)."""
    sha = checkpoint["sha256"][:12] if checkpoint["sha256"] else "unsaved"
    return f"medvit {medvit.__version__} {checkpoint['net']} {sha}"[:80]


def _write_sidecar(path: Path, result: CaseResult, original, model: LoadedModel, checkpoint: dict,
                   options: dict) -> None:
    """``NAME_seg.json`` beside a label map, written last: where the labels came from."""
    source = dict(original.meta.get("medvit_source", {}))
    if source.get("format") != "dicom":
        source = {"format": source.get("format", "")}  # the DICOM keys are blank for other formats
    doc = {
        "medvit_version": medvit.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label_map": result.labels_path.name,
        "source": {"paths": [str(Path(p).resolve()) for p in result.input], **source},
        "checkpoint": checkpoint,
        "labels": {str(k): v for k, v in model.config.labels.items()},
        "options": options,
        "resampled": result.resampled,
        "outputs": [p.name for p in (*result.stats_paths, result.preview_path, result.dicom_seg_path,
                                     result.rtstruct_path) if p],
        "warnings": result.warnings,
    }
    if result.dicom_seg is not None:
        doc["dicom_seg"] = result.dicom_seg
    if result.runtime:
        doc["runtime"] = result.runtime
    if result.rtstruct_path is not None:  # empty labels get no ROI: listed here
        doc["rtstruct"] = {"file": result.rtstruct_path.name, "rois": result.rtstruct_rois,
                           "empty_labels": [i for i in sorted(model.config.labels) if i and i not in result.rtstruct_rois]}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1) + "\n")


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


def volume_settings(cfg, *, device: str | torch.device = "cpu", overlap: float | None = None,
                    batch_size: int | None = None, skip_below_hu: float | None = None,
                    tta: bool = False, runtime: str | None = None) -> InferenceSettings:
    """The settings ``medvit segment`` runs a volume checkpoint's config ``cfg`` with: its ``infer``
    section under the command's overrides (None: the config's), autocast on CUDA, and on the CPU one
    window a call unless ``batch_size`` says otherwise; ``runtime`` is ``--runtime`` (None: torch).
    A bad override raises MedvitError naming its option (see :meth:`InferenceSettings.from_sources`)."""
    dev = torch.device(device)
    if batch_size is None and dev.type == "cpu":
        batch_size = 1  # on the CPU larger batches are no faster and hold more activations
    return InferenceSettings.from_sources(cfg.infer, device=dev, overlap=overlap, batch_size=batch_size,
                                          skip_below_hu=skip_below_hu, tta=tta, runtime=runtime)


def runtime_key(model: LoadedModel, checkpoint: dict) -> str:
    """The SHA-256 a converted net is cached under: of the checkpoint file's SHA-256 (of the weights,
    :func:`medvit.runtimes.state_sha256`, for a model not loaded from a file) and the net's config,
    since options such as the head count change the computation but not the weights."""
    import hashlib

    from medvit.runtimes import state_sha256

    weights = checkpoint.get("sha256") or state_sha256(model.net)
    net = json.dumps(model.config.model.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(f"{weights}\n{net}".encode()).hexdigest()


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
    engine: Engine | None = None,
    series: str | None = None,
    nonfinite: Literal["error", "replace"] = "error",
    stats: bool = False,
    preview: bool = False,
    resample: Literal["auto", "probs", "labels"] = "auto",
    progress: bool = False,
    protect: list[str] | None = None,
    strict: bool = False,
    checkpoint: dict | None = None,
    record: dict | None = None,
    tilt: Literal["resample", "keep", "error"] = "resample",
    dicom_seg: bool = False,
    seg_type: Literal["binary", "labelmap"] = "binary",
    rtstruct: bool = False,
) -> CaseResult:
    """Segment one case (one path, or one path per channel) and write its label map.

    ``engine`` runs the net with its settings (overlap, batch size, device, ``skip_below_hu``,
    mirror axes for test-time augmentation, runtime: the net itself on torch, else
    :meth:`Engine.predictor`'s conversion); default a fresh one with :func:`volume_settings` on
    the CPU. Pass the same engine for every case of a run so that what out-of-memory errors
    taught it, and a converted net, carry over.

    The label map is ``OUT_DIR/NAME_seg.nii.gz`` in the input's geometry; with ``stats``,
    ``NAME_stats.csv`` and ``NAME_stats.json``; with ``preview``, ``NAME_preview.png``; with
    ``rtstruct`` (a DICOM series input), ``NAME_rtstruct.dcm``, one ROI per label present
    (:func:`medvit.io.rtstruct.write_rtstruct`).
    An input that cannot be of the checkpoint's modality (:func:`check_modality`) is warned
    about, or with ``strict`` refused (InputError) before the net runs.

    Every label map records its provenance: the NIfTI ``descrip`` (:func:`nifti_description`),
    and ``NAME_seg.json``, written last, holding the source path(s) (and DICOM series), the
    checkpoint (``checkpoint``, else :func:`checkpoint_record`), the medvit version, the options
    (these keyword arguments and the engine's settings, the defaults they resolved to, and
    ``record``), the runtime asked for and the one that ran (``runtime``) and the date.
    A gantry-tilted DICOM series is, by ``tilt``, resampled onto an orthogonal grid that every
    output is then on, segmented on its sheared grid, or refused (see :func:`medvit.io.read_image`).

    With ``dicom_seg`` (a DICOM series input) the labels are also written as ``NAME_seg.dcm``, a
    DICOM SEG of ``seg_type`` on the source slices (:func:`medvit.io.dicom_seg.write_dicom_seg`),
    right after the NIfTI; its segments and the labels left out go into the sidecar.
    """
    cfg = model.config
    engine = engine if engine is not None else Engine(volume_settings(cfg))
    settings = engine.settings
    skip_below_hu = settings.skip_below_hu
    name = name or case_name(paths[0])
    key_in = paths if len(paths) > 1 else paths[0]
    loaded = LoadVolumed(keys="image", series=series, nonfinite=nonfinite, tilt=tilt)({"image": key_in})
    original = loaded["image"]
    if original.shape[0] != cfg.model.in_channels:
        raise channel_mismatch(original, cfg.model.in_channels, f"the checkpoint's {cfg.model.name}")
    warning = check_modality(original, list(paths), model, strict=strict)
    affine = np.asarray(original.affine, dtype=np.float64)
    codes = tuple(int(c) for c in original.meta.get("medvit_xform_codes", (1, 1)))  # an sform code 2 stays 2
    keep = original.clone() if (stats or preview) else None
    prep = preprocess_case(cfg.preprocess, loaded, skip_below_hu)
    check_net_extent(prep.image.shape[1:], cfg.model.roi_size, ", ".join(paths), cfg.preprocess.orientation)
    how = _choose_resample(resample, int(cfg.model.out_channels), int(np.prod(original.shape[1:])))
    checkpoint = checkpoint or checkpoint_record(model)
    # torch, or the net converted once per run (cached in the engine) for OpenVINO/ONNX Runtime
    predictor = engine.predictor(model.net, roi=cfg.model.roi_size, in_channels=int(cfg.model.in_channels),
                                 checkpoint_sha256=runtime_key(model, checkpoint)) \
        if settings.runtime != "torch" else model.net
    # an engine error (say NaN from the net) names the case and the checkpoint
    with about(", ".join(paths), f"; window positions are on the preprocessed grid; checkpoint {model.meta.get('checkpoint')}"):
        grid, report = segment_volume(
            engine,
            prep.image,
            predictor,
            roi_size=cfg.model.roi_size,
            output="scores" if how == "probs" else "labels",
            skip_below=prep.skip_below,
            skip_source=prep.skip_source,
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

    result = CaseResult(input=list(paths), labels_path=out_dir / f"{name}_seg.nii.gz", resampled=how, engine=report,
                        warnings=[warning] if warning else [],
                        runtime={"requested": settings.runtime, "ran": getattr(predictor, "runtime", "torch"),
                                 "note": getattr(predictor, "note", "")})
    # a 2D NIfTI was read as X x Y x 1; its label map is written back in the input's own shape
    write_label_map(labels[:, :, 0] if _is_2d_nifti(paths) else labels, affine, result.labels_path,
                    protect=list(paths) + list(protect or []), codes=codes, descrip=nifti_description(checkpoint))
    if dicom_seg:
        _write_seg(result, labels, affine, paths, out_dir / f"{name}_seg.dcm", model, checkpoint, seg_type, series,
                   list(paths) + list(protect or []))
    if stats or preview:
        from pipelines.volume.report import label_stats, percentile_window, write_preview, write_stats

        image0 = keep.as_tensor()[0].numpy()
        if stats:
            rows = label_stats(labels, image0, affine, names=cfg.labels)
            result.stats_paths = [out_dir / f"{name}_stats.csv", out_dir / f"{name}_stats.json"]
            write_stats(rows, *result.stats_paths)
        if preview:
            result.preview_path = out_dir / f"{name}_preview.png"
            # an MR has no fixed unit: its own 1st-99th percentiles, never a HU window
            window = tuple(cfg.preprocess.intensity.window) if cfg.preprocess.intensity.modality == "ct" \
                else percentile_window(image0)
            write_preview(image0, labels, affine, result.preview_path, window=window, names=cfg.labels)
    if rtstruct:
        result.rtstruct_path = out_dir / f"{name}_rtstruct.dcm"
        result.rtstruct_rois = write_case_rtstruct(labels, affine, Path(paths[0]), series, result.rtstruct_path, model,
                                                   checkpoint, protect=list(paths) + list(protect or []))
    options = dict(device=str(settings.device), overlap=settings.overlap, batch_size=settings.batch_size, series=series,
                   nonfinite=nonfinite, resample=resample, skip_below_hu=skip_below_hu, tta=bool(settings.mirror_axes),
                   runtime=settings.runtime,
                   stats=stats, preview=preview,
                   strict=strict, dicom_seg=dicom_seg, seg_type=seg_type if dicom_seg else None, rtstruct=rtstruct,
                   **(record or {}))
    result.sidecar_path = out_dir / f"{name}_seg.json"
    _write_sidecar(result.sidecar_path, result, original, model, checkpoint, options)
    return result


def _write_seg(result: CaseResult, labels: np.ndarray, affine: np.ndarray, paths: list[str], target: Path,
               model: LoadedModel, checkpoint: dict, seg_type: str, series: str | None, protect: list[str]) -> None:
    """``NAME_seg.dcm`` for :func:`segment_case`; a label map of background only gets none (a SEG
    needs a segment), with a warning."""
    from medvit.io.dicom_seg import write_dicom_seg
    from medvit.io.label_colors import label_color

    if not labels.any():
        message = f"{', '.join(paths)}: no voxel was labelled; no DICOM SEG written (it needs at least one segment)"
        log.warning(message)
        result.warnings.append(message)
        return
    written = write_dicom_seg(labels, affine, paths[0], target, names=dict(model.config.labels),
                              algorithm={"name": model.config.model.name, "version": medvit.__version__,
                                         "sha256": checkpoint.get("sha256")},
                              seg_type=seg_type, series=series, protect=protect,
                              colors={int(k): label_color(int(k)) for k in model.config.labels})
    result.dicom_seg_path = target
    result.dicom_seg = {"file": target.name, "seg_type": seg_type,
                        "segments": {str(n): {"label": v, "name": name} for n, (v, name) in written.segments.items()},
                        "left_out": {str(k): v for k, v in written.empty.items()}}
    if written.empty:
        result.warnings.append(f"{target.name}: label(s) {', '.join(f'{k} ({v})' for k, v in written.empty.items())} "
                               "hold no voxel and are left out of the DICOM SEG")


def _check_seg_source(where: Path, s: DicomSeries, tilt: str) -> None:
    """Before any case runs: a DICOM SEG needs an image series whose slices the label map lies on
    (no gaps, and no gantry tilt unless ``--tilt keep`` leaves the labels on the tilted slices)."""
    from medvit.io.common import tilt_degrees
    from medvit.io.dicom import series_affine

    if s.not_image is not None:
        raise InputError(where, f"series {s.uid} {s.not_image}")
    angle = tilt_degrees(series_affine(s, where))
    if angle > 1e-6 and tilt != "keep":
        raise InputError(where, f"series {s.uid} is gantry-tilted ({angle:.1f}°): --dicom-seg needs the labels on its "
                                "own slices; add --tilt keep")
def write_case_rtstruct(labels: np.ndarray, affine: np.ndarray, source: Path, series: str | None, out: Path,
                        model: LoadedModel, checkpoint: dict, *, protect: list[str]) -> list[int]:
    """``labels`` (on the DICOM series ``source``/``series``' grid) as an RTSTRUCT ``out``: ROI names
    from the checkpoint's labels, the series described as research use, each ROI's generation
    description the NIfTI's provenance line. Returns the label ids written."""
    from medvit.io.rtstruct import write_rtstruct

    s = select_series(source, list_dicom_series(source), series)
    return write_rtstruct(labels, affine, s, out, names=model.config.labels,
                          description=f"medvit {model.config.model.name} labels, research use only",
                          algorithm=nifti_description(checkpoint), protect=protect)


def series_tag(s: DicomSeries, images: list[DicomSeries]) -> str:
    """A short tag for DICOM series ``s`` among the image series ``images`` of its folder:
    ``series<SeriesNumber>`` when that number is its own, else ``uid`` and the UID's last 8 letters
    and digits, else the whole UID (dots as dashes)."""
    if s.series_number is not None and sum(x.series_number == s.series_number for x in images) == 1:
        return f"series{s.series_number}"

    def tail(uid: str) -> str:
        return "".join(ch for ch in uid if ch.isalnum())[-8:]

    if sum(tail(x.uid) == tail(s.uid) for x in images) == 1:
        return f"uid{tail(s.uid)}"
    return "uid" + "".join(ch if ch.isalnum() else "-" for ch in s.uid)


def check_case(case: list[str], model: LoadedModel, **kwargs) -> str:
    """The checks of one case (one path, or one per channel) that need no inference, and its output
    name (see :func:`segment_inputs`): every path exists and can be read as an image, ``series``
    only for DICOM, ``dicom_seg``/``rtstruct`` only on a DICOM series they can be written on, and
    with ``strict`` a DICOM Modality tag that fits the checkpoint. ``kwargs`` are
    :func:`segment_case`'s. Raises InputError."""
    shown = ",".join(case)
    if not case or any(not p for p in case):
        raise InputError(shown, "has an empty path (a stray comma?); write one case as a,b with a path on each side")
    formats = [source_format(Path(p)) for p in case]  # missing or unsupported: refused before any case runs
    if kwargs.get("series") is not None and "dicom" not in formats:
        raise InputError(shown, f"--series {kwargs['series']} picks a DICOM series, but this input is not DICOM")
    n = case_name(case[0])
    if kwargs.get("dicom_seg") and formats[0] != "dicom":
        raise InputError(shown, f"--dicom-seg writes a DICOM SEG on the slices of a DICOM series, but this input "
                                f"is {formats[0].upper() if formats[0] != 'nifti' else 'NIfTI'}")
    if kwargs.get("rtstruct") and formats[0] != "dicom":
        raise InputError(shown, "--rtstruct writes contours on the DICOM series segmented, but this input is not DICOM")
    if formats[0] == "dicom":
        found = list_dicom_series(Path(case[0]))
        s = select_series(Path(case[0]), found, kwargs.get("series"))
        images = [x for x in found if x.not_image is None]
        if len(images) > 1:
            n = f"{n}_{series_tag(s, images)}"
        if kwargs.get("dicom_seg"):
            _check_seg_source(Path(case[0]), s, kwargs.get("tilt", "resample"))
        if kwargs.get("rtstruct"):  # a series rt-utils cannot place contours on: refused before any case runs
            from medvit.io.rtstruct import check_rtstruct_source

            check_rtstruct_source(s, case[0])
        why = modality_tag_mismatch(s.modality, model) if kwargs.get("strict") else None
        if why is not None:  # refused before any case runs, not after the first
            raise InputError(case[0], f"{why}; refused by --strict")
    return n


def segment_inputs(
    cases: list[list[str]],
    model: LoadedModel,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    record: dict | None = None,
    **kwargs,
) -> list[CaseResult]:
    """Segment each case in turn (one path, or one path per channel); see :func:`segment_case`.

    A case whose first input is a DICOM folder holding several image series is named after the
    folder and the series read (``NAME_series3``, or ``NAME_uid<8 UID digits>`` without a
    SeriesNumber of its own, :func:`series_tag`), so runs over its series do not share outputs.

    Checked before any case runs: every path exists, the output folder is not a file and can be
    written, no two cases write the same output name, no output would replace an input, no
    output exists already unless ``overwrite``, and with ``strict`` no DICOM series' Modality tag
    disagrees with the checkpoint. ``record`` (options the caller was given, such as a config
    path) goes into each sidecar's ``options`` beside the keyword arguments.
    """
    out_dir = check_output_folder(out_dir)
    every = [p for case in cases for p in case]
    resolved = {Path(p).resolve(): p for p in every}
    names: dict[str, tuple[str, list[str]]] = {}  # output name -> (the case as shown, its paths)
    outputs = ["_seg.nii.gz", "_seg.json"] + (["_stats.csv", "_stats.json"] if kwargs.get("stats") else []) + \
        (["_preview.png"] if kwargs.get("preview") else []) + (["_seg.dcm"] if kwargs.get("dicom_seg") else []) + \
        (["_rtstruct.dcm"] if kwargs.get("rtstruct") else [])
    for case in cases:
        shown = ",".join(case)
        n = check_case(case, model, **kwargs)
        if n in names:
            raise InputError(shown, f"would write the same output name '{n}' as {names[n][0]}; segment them into separate folders")
        names[n] = (shown, case)
        for suffix in outputs:
            target = (out_dir / f"{n}{suffix}").resolve()
            if target in resolved:
                raise InputError(resolved[target], f"is an input and would be overwritten by the output of {shown}; "
                                                   "choose another output folder")
        for suffix in outputs:
            if not overwrite and (out_dir / f"{n}{suffix}").exists():
                raise InputError(out_dir / f"{n}{suffix}", "exists (an earlier run's output?); pass --overwrite to replace it")
    if names:  # a read-only folder, before the first case runs rather than after its inference
        check_writable(out_dir / f"{next(iter(names))}{outputs[0]}")
    digest = checkpoint_record(model)
    record = {**(record or {}), "overwrite": overwrite}
    if kwargs.get("engine") is None:  # one engine for every case: what out-of-memory taught carries over
        kwargs["engine"] = Engine(volume_settings(model.config))
    return [segment_case(case, model, out_dir, name=n, protect=every, checkpoint=digest, record=record, **kwargs)
            for n, (_, case) in names.items()]
