"""MONAI transform chains built from the config: preprocessing, training, validation, inference.

Every chain works on dictionaries whose ``"image"`` (and ``"label"``) entries are MONAI
``MetaTensor``s, channel-first ``(C, X, Y, Z)``, whose ``.affine`` maps voxel indices to RAS
mm (what :class:`medvit.io.LoadVolumed` produces). With ``load=True`` the chain starts with
``LoadVolumed`` and takes paths instead.

After preprocessing the image is float32 on the new grid and its ``.affine`` describes that
grid; labels are float32 holding whole numbers (MONAI's resamplers and losses work on float
labels, and one dtype whatever the spacing keeps batches collatable). The spatial steps
(orientation, spacing, foreground crop) are recorded in each ``MetaTensor``'s
``applied_operations`` so that :func:`medvit.transforms.invert_prediction` can undo them.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
    Transform,
)

from medvit.config import Config, PreprocessConfig
from medvit.core.errors import MedvitError

IMAGE_KEY = "image"
LABEL_KEY = "label"

# Our affines are RAS by convention (docs/design.md), whatever a MetaTensor's "space" says.
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


class ForegroundAbove:
    """``select_fn`` for ``CropForegroundd``: voxels above ``threshold``, or all when none is.

    MONAI crops to an empty ``(C, 0, 0, 0)`` volume when nothing is selected; an image with no
    voxel above the threshold is kept whole instead. A class rather than a lambda so chains
    pickle (DataLoader workers, CacheDataset).
    """

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mask = x > self.threshold
        return mask if bool(mask.any()) else torch.ones_like(mask)

    def __repr__(self) -> str:
        return f"ForegroundAbove({self.threshold})"


def _load(keys: tuple[str, ...], label_keys: tuple[str, ...] = (), **kwargs) -> MapTransform:
    # Imported here: the chains themselves work without the readers (load=False).
    from medvit.io import LoadVolumed

    return LoadVolumed(keys=list(keys), label_keys=list(label_keys), **kwargs)


def _check(cfg: Config) -> MapTransform:
    """Channels, label grid and label range of a loaded case, checked before preprocessing changes the grid."""
    from medvit.transforms.checks import CheckCased

    return CheckCased(IMAGE_KEY, LABEL_KEY, in_channels=cfg.model.in_channels, n_classes=int(cfg.model.out_channels),
                      net=cfg.model.name, label_ids=set(cfg.labels), label_names=dict(cfg.labels))


def preprocess_transforms(
    cfg: PreprocessConfig, *, image_key: str = IMAGE_KEY, label_key: str | None = None
) -> list[Transform]:
    """The deterministic steps shared by training, validation and inference.

    In order: reorient to ``cfg.orientation``; optionally crop both to the bounding box of
    image voxels above ``cfg.crop_threshold()`` (in the input's units: HU for CT, raw signal
    for MRI) plus ``cfg.crop_margin`` voxels (clamped to the volume; the whole volume when no
    voxel is above); resample to ``cfg.spacing`` mm (bilinear for the image, nearest for the
    label; skipped when ``None``); intensity (CT: window ``cfg.intensity.window`` mapped
    linearly to [0, 1], clipped when ``clip``; MRI: z-score per channel, over non-zero voxels
    when ``nonzero``); finally make sure the outputs are ``MetaTensor``s (image float32,
    label float32).

    Orientation, spacing and crop are invertible; the intensity steps are not (predictions
    never need them undone).

    Args:
        cfg: the ``preprocess`` section of a config.
        image_key: dictionary key of the ``(C, X, Y, Z)`` image.
        label_key: dictionary key of a ``(1, X, Y, Z)`` label map on the image's grid, if any.

    Returns:
        A list of dictionary transforms, to be wrapped in a ``Compose``.
    """
    keys = [image_key] + ([label_key] if label_key is not None else [])
    modes = ["bilinear"] + (["nearest"] if label_key is not None else [])
    out: list[Transform] = [Orientationd(keys=keys, axcodes=cfg.orientation, labels=_RAS_LABELS)]
    if cfg.crop_foreground:
        # Before resampling and normalisation: the threshold is in the input's own units
        # (HU, raw MRI signal), and resampling only the cropped box is cheaper.
        out.append(
            CropForegroundd(
                keys=keys,
                source_key=image_key,
                select_fn=ForegroundAbove(cfg.crop_threshold()),
                margin=cfg.crop_margin,
                allow_smaller=True,
            )
        )
    if cfg.spacing is not None:
        from medvit.transforms.checks import CheckResampleSized

        out.append(CheckResampleSized(image_key, cfg.spacing))  # a header in the wrong unit: one line, not an OOM
        # float32 grids: faster than MONAI's float64 default and exact enough for millimetre
        # geometry (the recorded affines stay float64).
        out.append(Spacingd(keys=keys, pixdim=tuple(cfg.spacing), mode=modes, dtype=torch.float32))
    icfg = cfg.intensity
    if icfg.modality == "ct":
        lo, hi = icfg.window
        out.append(ScaleIntensityRanged(keys=image_key, a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=icfg.clip))
    else:
        out.append(NormalizeIntensityd(keys=image_key, nonzero=icfg.nonzero, channel_wise=True))
    out.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    return out


def _rot90_axes(roi: tuple[int, int, int]) -> tuple[int, int] | None:
    """A pair of spatial axes of equal patch size (the axial plane first), so rot90 keeps the shape."""
    for a, b in ((0, 1), (0, 2), (1, 2)):
        if roi[a] == roi[b]:
            return (a, b)
    return None


def train_transforms(cfg: Config, *, load: bool = True) -> Compose:
    """The training chain: preprocessing, then random patches and augmentation.

    Input: ``{"image": path(s), "label": path}`` (or, with ``load=False``, the loaded
    ``MetaTensor``s). Output: a list of ``cfg.augment.num_samples`` dictionaries, each with a
    ``(C, *roi_size)`` image and a ``(1, *roi_size)`` label, cropped around a foreground voxel
    with probability ``pos / (pos + neg)``, else a background one.

    Volumes smaller than the patch are padded with zeros first (the bottom of the CT window,
    the MRI background). Augmentation: a flip along each spatial axis with ``flip_prob``; a
    quarter turn (k = 1..3) with ``rot90_prob`` in the first plane whose two patch sides are
    equal (none when all three differ, so patches keep ``roi_size``); an intensity shift by
    up to ``± shift_intensity`` with ``shift_prob`` and a scaling by ``1 + U(-s, s)`` with
    ``scale_prob`` (image only).

    Every transform up to and including the padding is deterministic, so
    ``pipelines.volume.train.split_random`` can cache that part.
    """
    roi = tuple(int(s) for s in cfg.model.roi_size)
    aug = cfg.augment
    keys = [IMAGE_KEY, LABEL_KEY]
    ts: list[Transform] = [_load((IMAGE_KEY, LABEL_KEY), (LABEL_KEY,))] if load else []
    ts.append(_check(cfg))
    ts += preprocess_transforms(cfg.preprocess, image_key=IMAGE_KEY, label_key=LABEL_KEY)
    ts.append(SpatialPadd(keys=keys, spatial_size=roi))
    ts.append(
        RandCropByPosNegLabeld(
            keys=keys,
            label_key=LABEL_KEY,
            spatial_size=roi,
            pos=aug.pos,
            neg=aug.neg,
            num_samples=aug.num_samples,
        )
    )
    ts += [RandFlipd(keys=keys, prob=aug.flip_prob, spatial_axis=axis) for axis in range(3)]
    axes = _rot90_axes(roi)
    if axes is not None:
        ts.append(RandRotate90d(keys=keys, prob=aug.rot90_prob, max_k=3, spatial_axes=axes))
    ts.append(RandShiftIntensityd(keys=IMAGE_KEY, offsets=aug.shift_intensity, prob=aug.shift_prob))
    ts.append(RandScaleIntensityd(keys=IMAGE_KEY, factors=aug.scale_intensity, prob=aug.scale_prob))
    ts.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    return Compose(ts)


def val_transforms(cfg: Config, *, load: bool = True) -> Compose:
    """The validation chain: image and label preprocessed alike, nothing random.

    Input: ``{"image": path(s), "label": path}`` (or loaded ``MetaTensor``s with
    ``load=False``). Output: one dictionary with the whole preprocessed ``(C, X', Y', Z')``
    image and ``(1, X', Y', Z')`` label.
    """
    ts: list[Transform] = [_load((IMAGE_KEY, LABEL_KEY), (LABEL_KEY,))] if load else []
    ts.append(_check(cfg))
    ts += preprocess_transforms(cfg.preprocess, image_key=IMAGE_KEY, label_key=LABEL_KEY)
    return Compose(ts)


def infer_transforms(
    cfg: PreprocessConfig,
    *,
    load: bool = True,
    series: str | None = None,
    nonfinite: Literal["error", "replace"] = "error",
) -> Compose:
    """The inference chain: the image alone, preprocessed.

    Input: ``{"image": path or list of paths (one per channel)}``, or with ``load=False`` a
    loaded ``MetaTensor``. ``series`` and ``nonfinite`` are passed to ``LoadVolumed`` (which
    DICOM series to read; what to do with NaN/inf voxels). Keep the chain and its output: they
    are what :func:`medvit.transforms.invert_prediction` needs.
    """
    ts: list[Transform] = [_load((IMAGE_KEY,), series=series, nonfinite=nonfinite)] if load else []
    ts += preprocess_transforms(cfg, image_key=IMAGE_KEY)
    return Compose(ts)


def user_error(e: BaseException) -> MedvitError | None:
    """The MedvitError behind ``e``: MONAI's ``apply_transform`` wraps a transform's error in a
    RuntimeError naming the transform, which would print as a traceback instead of one line."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, MedvitError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def run_chain(chain: Compose, item: dict) -> Any:
    """``chain(item)``, with a user error raised by one of its transforms re-raised as itself."""
    try:
        return chain(item)
    except Exception as e:
        found = user_error(e)
        if found is None:
            raise
        raise found from None
