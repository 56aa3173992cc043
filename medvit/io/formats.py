"""The volume formats medvit reads: one table from file-name suffixes to each format's reader.

:data:`FORMATS` is the one source of the accepted suffixes: :func:`medvit.io.reader.source_format`
matches names against it, the readers are called through it, output names drop its suffixes
(:func:`strip_suffix`) and messages list it (:data:`SUPPORTED`). The module imports only the
standard library; a reader's module (nibabel, SimpleITK, pydicom) loads when it is first used.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FORMATS", "SUPPORTED", "VolumeFormat", "by_key", "by_name", "strip_suffix"]


@dataclass(frozen=True)
class VolumeFormat:
    """One readable format.

    ``key`` is what :func:`medvit.io.reader.source_format` answers and ``meta["medvit_source"]``
    records; ``suffixes`` (lower case, matched at the end of a file's name, case-insensitively);
    ``reader`` names the function ``module:function`` that reads a path into a
    :class:`medvit.io.common.RawVolume`; ``options`` are the keyword arguments of
    :func:`medvit.io.reader.read_image`/``read_label`` that reader takes; ``described`` replaces
    the suffix list in messages.
    """

    key: str
    title: str
    suffixes: tuple[str, ...]
    reader: str
    options: tuple[str, ...] = ()
    described: str = ""

    def read(self, path: Path, **options):
        """``path`` read by this format's reader, given those of ``options`` it takes."""
        module, _, name = self.reader.partition(":")
        fn: Callable = getattr(importlib.import_module(module), name)
        return fn(path, **{k: v for k, v in options.items() if k in self.options})

    def said(self) -> str:
        """``NIfTI (.nii, .nii.gz)``: the format as messages list it."""
        return f"{self.title} ({self.described or ', '.join(self.suffixes)})"


FORMATS: tuple[VolumeFormat, ...] = (
    VolumeFormat("nifti", "NIfTI", (".nii", ".nii.gz"), "medvit.io.nifti:read_nifti", ("labels",)),
    VolumeFormat("nrrd", "NRRD", (".nrrd", ".nhdr"), "medvit.io.itk_formats:read_itk"),
    VolumeFormat("mha", "MetaImage", (".mha", ".mhd"), "medvit.io.itk_formats:read_itk"),
    VolumeFormat("dicom", "DICOM", (".dcm", ".dicom", ".ima"), "medvit.io.dicom:read_dicom", ("series", "tilt"),
                 described="a folder holding a series, or one .dcm file"),
)
"""Every volume format, in the order messages list them. A folder, and a file without a listed
suffix whose header starts with DICOM's magic, are read as ``dicom`` too."""

SUPPORTED = ", ".join(f.said() for f in FORMATS)


def by_key(key: str) -> VolumeFormat:
    """The format of ``key`` (ValueError for another key)."""
    for f in FORMATS:
        if f.key == key:
            return f
    raise ValueError(f"no volume format {key!r}; formats: {', '.join(f.key for f in FORMATS)}")


def by_name(path: str | os.PathLike) -> VolumeFormat | None:
    """The format whose suffix ends ``path``'s name (case-insensitively), else None. The file
    need not exist."""
    name = Path(path).name.lower()
    return next((f for f in FORMATS if name.endswith(f.suffixes)), None)


def strip_suffix(name: str) -> str:
    """``name`` without the format suffix that ends it (``case.nii.gz`` -> ``case``); other names
    unchanged."""
    low = name.lower()
    for f in FORMATS:
        for s in sorted(f.suffixes, key=len, reverse=True):
            if low.endswith(s):
                return name[: -len(s)]
    return name
