"""``CheckCased``: refuse a training or validation case that does not fit the net, before it trains.

A label map on another grid than its image would train on misaligned voxels without any
error, and label values past the class count fail deep inside the loss with an index error
naming no file; both are checked here, on the loaded volumes, with one line naming the file.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey

from medvit.errors import InputError
from medvit.io.common import corner_offset_mm

LABEL_GRID_TOLERANCE = 0.05
"""How far a label map's grid may lie from its image's (at the grid's corners), as a share of
the smallest voxel side, and at least 0.01 mm: rounding in headers, not a shift that matters."""


def _source(value: object, key: Hashable) -> str:
    meta = getattr(value, "meta", None) or {}
    return str(meta.get(ImageMetaKey.FILENAME_OR_OBJ, key))


class CheckCased(MapTransform):
    """Check a loaded ``{"image", "label"}`` case against the net and against each other.

    The image must have ``in_channels`` channels; the label (when present) the image's grid
    (shape, and affine within :data:`LABEL_GRID_TOLERANCE`) and values in
    ``0 .. n_classes - 1``, all of them in ``label_ids`` when given (the config's named labels:
    an unnamed id would train as a class no output names). Raises :class:`InputError` naming the
    file; passes the case on unchanged.
    """

    def __init__(self, image_key: str, label_key: str, *, in_channels: int, n_classes: int, net: str = "net",
                 label_ids: set[int] | None = None) -> None:
        super().__init__((image_key, label_key), allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key
        self.in_channels, self.n_classes, self.net = int(in_channels), int(n_classes), net
        self.label_ids = None if label_ids is None else {int(i) for i in label_ids}

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        image, label = data[self.image_key], data.get(self.label_key)
        src = _source(image, self.image_key)
        if image.shape[0] != self.in_channels:
            raise InputError(src, f"has {image.shape[0]} channel(s) but the config's {self.net} takes {self.in_channels}")
        if label is None:
            return data
        lsrc = _source(label, self.label_key)
        if tuple(label.shape[1:]) != tuple(image.shape[1:]):
            raise InputError(lsrc, f"label grid {tuple(label.shape[1:])} differs from its image's "
                                   f"{tuple(image.shape[1:])} ({src})")
        if hasattr(label, "affine") and hasattr(image, "affine"):
            aff = np.asarray(image.affine, dtype=np.float64)
            tol = max(0.01, LABEL_GRID_TOLERANCE * float(np.linalg.norm(aff[:3, :3], axis=0).min()))
            off = corner_offset_mm(image.shape[1:], np.asarray(label.affine), aff)
            if not off <= tol:
                raise InputError(lsrc, f"lies up to {off:.4g} mm from its image's grid ({src}); label and image "
                                       "must share one grid")
        lab = torch.as_tensor(label)
        lo, hi = int(lab.min()), int(lab.max())
        if lo < 0 or hi >= self.n_classes:
            raise InputError(lsrc, f"holds label values {lo}..{hi}, but the config has {self.n_classes} classes "
                                   f"(0..{self.n_classes - 1})")
        if self.label_ids is not None and not set(range(lo, hi + 1)) <= self.label_ids:
            unnamed = sorted(set(torch.unique(lab).long().tolist()) - self.label_ids)
            if unnamed:
                raise InputError(lsrc, f"holds label values {_short(unnamed)} that the config's labels do not name "
                                       f"(it names {_short(sorted(self.label_ids))})")
        return data


def _short(ids: list[int], shown: int = 10) -> str:
    return ", ".join(map(str, ids[:shown])) + (f", ... ({len(ids)} in all)" if len(ids) > shown else "")
