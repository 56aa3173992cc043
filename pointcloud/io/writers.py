"""Per-point label writers: SemanticKITTI ``.label`` and ``.npy`` (LAS classification is in ``las.py``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medvit.core.errors import InputError
from medvit.core.files import atomic_path, refuse_protected


def write_labels(labels, path: str | os.PathLike, *, instance=None, protect: Sequence[str | os.PathLike] = ()) -> Path:
    """Write per-point labels ``(N,)`` atomically; the format follows the suffix.

    ``.label``: SemanticKITTI uint32, ``semantic | instance << 16`` (both must lie in 0..65535).
    ``.npy``: the semantic ids as the smallest unsigned dtype that holds them (uint8/uint16/uint32),
    or, with ``instance``, an ``(N, 2)`` int64 array ``[semantic, instance]``.
    Refuses (InputError) to overwrite any path in ``protect``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".label", ".npy"):
        raise InputError(path, "label output must be named .label (SemanticKITTI) or .npy")
    refuse_protected(path, protect)
    semantic = _check_ids(labels, "labels")
    inst = None if instance is None else _check_ids(instance, "instance")
    if inst is not None and inst.shape != semantic.shape:
        raise ValueError(f"instance has {inst.shape[0]} entries, labels {semantic.shape[0]}")
    if suffix == ".label":
        for name, values in (("labels", semantic), ("instance", inst)):
            if values is not None and values.size and values.max() > 0xFFFF:
                raise ValueError(f"{name} must lie in 0..65535 for a .label file, got max {values.max()}")
        packed = semantic.astype(np.uint32)
        if inst is not None:
            packed |= inst.astype(np.uint32) << 16
        with atomic_path(path) as tmp:
            packed.astype("<u4").tofile(tmp)
        return path
    if inst is not None:
        array = np.stack([semantic, inst], axis=1).astype(np.int64)
    else:
        top = int(semantic.max()) if semantic.size else 0
        array = semantic.astype(np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)  # a file object: np.save on a name would add ".npy"
    return path


def _check_ids(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an (N,) integer array, got {array.dtype} {array.shape}")
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint32).max):
        raise ValueError(f"{name} must be non-negative and fit uint32, got {array.min()}..{array.max()}")
    return array.astype(np.int64, copy=False)
