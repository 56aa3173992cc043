"""``LoadVolumed``: the dictionary transform that starts every MONAI transform chain."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Literal

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import ensure_tuple

from medvit.io.dicom import Tilt
from medvit.io.reader import read_image, read_label


class LoadVolumed(MapTransform):
    """Replace paths in a data dictionary by MetaTensors read with :func:`read_image` / :func:`read_label`.

    Images become float32 ``(C, X, Y, Z)`` (a list of paths stacks channels), labels integer
    ``(1, X, Y, Z)``; both carry the RAS affine, so Orientationd, Spacingd and later Invertd
    work on them as on MONAI's own LoadImaged output. Values that already are MetaTensors
    pass through unchanged. A label that is a DICOM SEG or RTSTRUCT is read onto the series of the
    first image key (the datalist entry's ``image``; the first path of a channel list).

    Args:
        keys: keys of image paths.
        label_keys: keys of label-map paths (a key listed in both is read as a label).
        series: DICOM SeriesInstanceUID for image keys that name a folder with several series.
        nonfinite: how images treat NaN/inf voxels, see :func:`read_image`.
        tilt: how images read a gantry-tilted DICOM series (keep, resample, error), see :func:`read_image`.
        allow_missing_keys: skip keys absent from the dictionary.
    """

    def __init__(
        self,
        keys: KeysCollection,
        *,
        label_keys: KeysCollection = (),
        series: str | None = None,
        nonfinite: Literal["error", "replace"] = "error",
        tilt: Tilt = "keep",
        allow_missing_keys: bool = False,
    ) -> None:
        labels = ensure_tuple(label_keys)
        super().__init__(tuple(dict.fromkeys((*ensure_tuple(keys), *labels))), allow_missing_keys)
        self.label_keys = frozenset(labels)
        self.series = series
        self.nonfinite = nonfinite
        self.tilt = tilt

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        image_key = next((k for k in self.keys if k not in self.label_keys and k in d), None)
        source = d[image_key] if image_key is not None else None
        if isinstance(source, (list, tuple)):
            source = source[0] if source else None
        if isinstance(source, MetaTensor):
            source = None
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, MetaTensor):
                continue
            if key in self.label_keys:
                d[key] = read_label(value, source=source)
            else:
                d[key] = read_image(value, series=self.series, nonfinite=self.nonfinite, tilt=self.tilt)
        return d
