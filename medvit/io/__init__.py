"""Readers and writers that keep geometry exact.

Every reader returns a MONAI ``MetaTensor``, channel-first ``(C, X, Y, Z)``, whose ``.affine``
maps voxel indices to RAS mm (nibabel's convention, float64). NIfTI goes through nibabel,
NRRD/MetaImage through SimpleITK, DICOM series through pydicom (grouping, sorting, gap checks)
and SimpleITK/GDCM (pixels, JPEG 2000 included). Writers write a temporary file beside the
target and rename it, and refuse to overwrite a protected input.
"""

from medvit.io.dicom import DicomSeries, list_dicom_series
from medvit.io.loader import LoadVolumed
from medvit.io.reader import read_image, read_label
from medvit.io.writers import atomic_path, write_image, write_label_map

__all__ = [
    "DicomSeries",
    "LoadVolumed",
    "atomic_path",
    "list_dicom_series",
    "read_image",
    "read_label",
    "write_image",
    "write_label_map",
]
