"""MONAI datalists: ``{"training": [{"image": ..., "label": ...}], "validation": [...]}``."""

from __future__ import annotations

import json
from pathlib import Path

from medvit.errors import InputError


def read_datalist(path: str | Path, key: str = "training", *, base_dir: str | Path | None = None, required: bool = True) -> list[dict]:
    """The entries under ``key`` with paths made absolute against ``base_dir`` (default: the file's folder).

    An entry's "image" may be one path or a list (one channel per file). Every file named
    must exist, so a typo fails before training starts, not hours into it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such datalist file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(path, "a datalist must be a JSON object with a 'training' list")
    entries = data.get(key)
    if entries is None:
        if required:
            raise InputError(path, f"no '{key}' list in the datalist")
        return []
    if not isinstance(entries, list):
        raise InputError(path, f"'{key}' must be a list of {{\"image\": ..., \"label\": ...}} entries")
    base = Path(base_dir) if base_dir is not None else path.parent

    def resolve(p: str) -> str:
        full = Path(p) if Path(p).is_absolute() else base / p
        if not full.exists():
            raise InputError(path, f"'{key}' names a file that does not exist: {full}")
        return str(full)

    out = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"image": e}
        if not isinstance(e, dict) or "image" not in e:
            raise InputError(path, f"'{key}' entry {i} has no 'image'")
        item = dict(e)
        for k in ("image", "label"):
            if k in item:
                item[k] = [resolve(p) for p in item[k]] if isinstance(item[k], list) else resolve(item[k])
        out.append(item)
    return out
