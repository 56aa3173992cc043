"""Readers and writers that keep geometry exact.

Every reader returns a MONAI ``MetaTensor``, channel-first ``(C, X, Y, Z)``, whose ``.affine``
maps voxel indices to RAS mm (nibabel's convention, float64). NIfTI goes through nibabel,
NRRD/MetaImage through SimpleITK, DICOM series through pydicom (grouping, sorting, gap checks)
and SimpleITK/GDCM (pixels, JPEG 2000 included); which suffix goes to which reader is one table,
:data:`medvit.io.formats.FORMATS`. Writers write a temporary file beside the target and rename it
(:mod:`medvit.core.files`), and refuse to overwrite a protected input.
"""

import importlib

# Names load on first use (PEP 562), so a writer alone does not pull in pydicom, SimpleITK and
# GDCM (the GPU bench machine, for one, has none of them).
_WHERE = {
    "DicomSeries": "medvit.io.dicom",
    "list_dicom_series": "medvit.io.dicom",
    "LoadVolumed": "medvit.io.loader",
    "read_image": "medvit.io.reader",
    "read_label": "medvit.io.reader",
    "write_image": "medvit.io.writers",
    "write_label_map": "medvit.io.writers",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medvit.io' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
