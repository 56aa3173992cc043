"""NRRD and MetaImage reading through SimpleITK (LPS on disk, RAS out)."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from medvit.core.errors import InputError
from medvit.io.common import RawVolume, itk_affine, source_info
from medvit.io.formats import by_name

log = logging.getLogger(__name__)


def _format_key(path: Path) -> str | None:
    """``"nrrd"`` or ``"mha"`` by the file name (:data:`medvit.io.formats.FORMATS`), else None."""
    fmt = by_name(path)
    return fmt.key if fmt is not None and fmt.key in ("nrrd", "mha") else None


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


@contextmanager
def _native_stderr(lines: list[str]):
    """Collect what C++ code writes to file descriptor 2 (ITK's MetaIO prints its reasons there and
    raises a vaguer one) into ``lines``, instead of letting it reach the user's terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            lines.extend(ln.strip() for ln in buf.read().decode(errors="replace").splitlines() if ln.strip())


def _mhd_data_file(path: Path) -> None:
    """A detached MetaImage header names its data file; a header copied without it is named as such."""
    try:
        head = path.read_bytes()[:65536].decode("latin-1")
    except OSError:
        return
    for line in head.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "ElementDataFile":
            name = value.strip()
            if name and name.upper() not in ("LOCAL", "LIST") and "%" not in name and not (path.parent / name).is_file():
                raise InputError(path, f"its data file {name} is missing (an .mhd header reads the file it names, beside it)")
            return


def read_itk(path: Path) -> RawVolume:
    """Read an NRRD (.nrrd/.nhdr) or MetaImage (.mha/.mhd) file; vector pixels become channels."""
    if path.suffix.lower() == ".mhd":
        _mhd_data_file(path)
    said: list[str] = []
    try:
        with _native_stderr(said):
            image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        # MetaIO's own lines say what is wrong ("data not read completely"); SimpleITK's says errno
        reason = "; ".join(said[:2]) or (str(e).strip().splitlines()[-1] if str(e).strip() else "unreadable")
        raise InputError(path, f"not a readable {_format_key(path) or 'ITK'} image ({reason})") from None
    for line in said:
        log.warning("%s: %s", path, line)
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(path, "complex-valued images are not supported")
    return sitk_to_raw(image, path, source_info(_format_key(path) or "itk"))
