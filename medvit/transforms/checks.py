"""``CheckCased``: refuse a training or validation case that does not fit the net, before it trains.

A label map on another grid than its image would train on misaligned voxels without any
error, and label values past the class count fail deep inside the loss with an index error
naming no file; both are checked here, on the loaded volumes, with one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ImageMetaKey

from medvit.core.errors import InputError, listed
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
    file; passes the case on unchanged, except a label that names its own labels (a DICOM SEG's
    segments, an RTSTRUCT's ROIs, numbered 1..n in their file's order): with ``label_names``
    (the config's id -> name) it is renumbered to the ids of the same names first, and a name the
    config lacks is refused.
    """

    def __init__(self, image_key: str, label_key: str, *, in_channels: int, n_classes: int, net: str = "net",
                 label_ids: set[int] | None = None, label_names: Mapping[int, str] | None = None) -> None:
        super().__init__((image_key, label_key), allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key
        self.in_channels, self.n_classes, self.net = int(in_channels), int(n_classes), net
        self.label_ids = None if label_ids is None else {int(i) for i in label_ids}
        self.label_names = None if label_names is None else {int(k): str(v) for k, v in label_names.items()}

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        image, label = data[self.image_key], data.get(self.label_key)
        src = _source(image, self.image_key)
        if image.shape[0] != self.in_channels:
            from medvit.io.reader import channel_mismatch

            raise channel_mismatch(image, self.in_channels, f"the config's {self.net}")
        if label is None:
            return data
        lsrc = _source(label, self.label_key)
        named = (getattr(label, "meta", None) or {}).get("medvit_label_names")
        if named and self.label_names is not None:
            data = dict(data)
            data[self.label_key] = label = self._renumbered(label, named, lsrc)
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
                raise InputError(lsrc, f"holds label values {listed(unnamed)} that the config's labels do not name "
                                       f"(it names {listed(sorted(self.label_ids))})")
        return data


    def _renumbered(self, label, named: Mapping[int, str], lsrc: str):
        from medvit.io.segment_codes import match_names

        matched, unmatched = match_names(named, self.label_names)
        if unmatched:
            raise InputError(lsrc, f"names label(s) {listed([repr(v) for v in unmatched.values()])} that the config's "
                                   f"labels do not ({listed([repr(v) for k, v in sorted(self.label_names.items()) if k])})")
        lut = torch.arange(max([int(label.max()), *matched]) + 1, dtype=torch.int64)
        for n, i in matched.items():
            lut[n] = i
        values = lut[torch.as_tensor(label).long()]
        meta = dict(label.meta)
        del meta["medvit_label_names"]  # now the config's ids; and cases of a batch must share meta keys to collate
        return MetaTensor(values.to(torch.uint8) if int(lut.max()) <= 255 else values, meta=meta)  # meta holds the affine


def physical_memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None


class CheckResampleSized(MapTransform):
    """Refuse a resample whose float32 output alone would take over half this machine's memory.

    A header with its spacing in the wrong unit (1000 for 1 mm) asked MONAI's ``Spacingd`` for a
    1.5 TB grid: a traceback from the allocator, or, a little smaller, a process killed for memory.
    Checked on the image just before it is resampled to ``pixdim``; passes the case on unchanged.
    """

    def __init__(self, image_key: str, pixdim, *, budget: int | None = None) -> None:
        super().__init__((image_key,))
        self.image_key, self.pixdim = image_key, np.asarray(pixdim, dtype=np.float64)
        mem = physical_memory_bytes()
        self.budget = budget if budget is not None else (mem // 2 if mem else None)

    def __call__(self, data: Mapping[Hashable, object]) -> Mapping[Hashable, object]:
        image = data[self.image_key]
        if self.budget is None or not hasattr(image, "affine"):
            return data
        spacing = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)
        shape = np.ceil(np.asarray(image.shape[1:]) * spacing / self.pixdim).astype(np.int64)
        need = int(np.prod(shape, dtype=np.float64) * image.shape[0] * 4)
        if need > self.budget:
            raise InputError(_source(image, self.image_key),
                             f"resampling its {np.round(spacing, 4).tolist()} mm voxels to {self.pixdim.tolist()} mm makes "
                             f"a {'x'.join(map(str, shape.tolist()))} grid ({need / 2**30:.1f} GiB), over half this "
                             f"machine's memory; is the header's spacing in mm?")
        return data
