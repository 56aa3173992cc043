"""NRRD and MetaImage reading through SimpleITK (LPS on disk, RAS out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medvit.errors import InputError
from medvit.io.common import RawVolume, itk_affine, source_info

ITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha"}


def itk_format(path: Path) -> str | None:
    """``"nrrd"`` or ``"mha"`` from the file name, else None."""
    return ITK_SUFFIXES.get(path.suffix.lower())


def sitk_to_raw(image: sitk.Image, path: Path, source: dict[str, str]) -> RawVolume:
    """A SimpleITK image as ``(C, X, Y, Z)`` plus its RAS affine; 2D images get Z = 1."""
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InputError(path, f"{dim}D images are not supported (expected 2D or 3D)")
    arr = sitk.GetArrayFromImage(image)  # (Z, Y, X) or (Z, Y, X, C): index order reversed
    if image.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    if dim == 2:
        arr = arr[None]
    # (Z, Y, X, C) -> (C, X, Y, Z)
    arr = np.ascontiguousarray(np.transpose(arr, (3, 2, 1, 0)))
    # a 2D image's third voxel axis is the unit z axis
    affine = itk_affine(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return RawVolume(arr, affine, path, source)


def read_itk(path: Path) -> RawVolume:
    """Read an NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file; vector pixels become channels."""
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable"
        raise InputError(path, f"not a readable {itk_format(path) or 'ITK'} image ({reason})") from None
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(path, "complex-valued images are not supported")
    return sitk_to_raw(image, path, source_info(itk_format(path) or "itk"))
