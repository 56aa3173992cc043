"""Writing files safely: under a temporary name then renamed, never over an input.

Every output of medvit and pointcloud goes through :func:`atomic_path`, so a failed or
interrupted write leaves the old file (or none), never half of a new one. The checks here
raise :class:`~medvit.core.errors.InputError` naming the path: a target that cannot be
written, an output folder that is a file, a target that is one of the inputs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from medvit.core.errors import InputError

PathLike = str | os.PathLike
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT, errno.ENOTDIR}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _full_suffix(name: str) -> str:
    """``.nii.gz`` for ``a.nii.gz``, ``.csv`` for ``a.csv``: what format sniffers look at."""
    p = Path(name)
    if p.suffix.lower() in _COMPRESSED and len(p.suffixes) >= 2:
        return "".join(p.suffixes[-2:])
    return p.suffix


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success, remove it on error.

    The temporary name is hidden (leading dot) and keeps the suffix (``.nii.gz``, ``.png``...) so
    writers that pick a format from the name still do. Missing parent folders are created.

    Example::

        with atomic_path(out / "stats.csv") as tmp:
            frame.to_csv(tmp)
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a folder; expected a file name to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(path.parent, f"cannot create the output folder ({e.strerror})") from None
    ext = _full_suffix(path.name)
    tmp = path.with_name(f".{path.name[: len(path.name) - len(ext)]}.tmp-{secrets.token_hex(4)}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        if isinstance(e, OSError) and e.errno in _UNWRITABLE:  # the folder, not the data, is at fault
            raise InputError(path, f"cannot be written ({e.strerror})") from None
        raise


def check_writable(path: PathLike) -> None:
    """InputError when the file ``path`` could not be created: a probe file is made and removed in
    its folder or, where that does not exist yet, in the nearest folder above that does
    (``os.access`` says yes to root even on ``/proc``). Creates no folder."""
    path = Path(path).absolute()
    existing = next(p for p in path.parents if p.exists())
    probe = existing / f".medvit-write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise InputError(path, f"cannot be written ({existing}: {e.strerror})") from None


def check_output_folder(path: PathLike) -> Path:
    """InputError when ``path``, meant as an output folder, is an existing file; creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(path, "is a file; the output must be a folder")
    return path


def make_output_folder(path: PathLike) -> Path:
    """Create the output folder ``path`` (and its parents); InputError when it cannot be made."""
    path = check_output_folder(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(path, f"cannot create the output folder ({e.strerror})") from None
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would resolve to
        return a.resolve() == b.resolve()


def refuse_protected(path: PathLike, protect: Sequence[PathLike]) -> None:
    """InputError when ``path`` is (or resolves to) the same file as any path in ``protect``."""
    path = Path(path)
    for p in protect:
        if _same_file(path, Path(p)):
            raise InputError(path, f"refusing to overwrite the input file {p}")
