"""MONAI datalists: ``{"training": [{"image": ..., "label": ...}], "validation": [...]}``."""

from __future__ import annotations

import json
from pathlib import Path

from medvit.core.errors import InputError


def read_datalist(path: str | Path, key: str = "training", *, base_dir: str | Path | None = None, required: bool = True,
                  need_label: bool = False, one_image: bool = False) -> list[dict]:
    """The entries under ``key`` with paths made absolute against ``base_dir`` (default: the file's folder).

    An entry's "image" may be one path or a list (one channel per file), its "label" one path. Every file named
    must exist, so a typo fails before training starts, not hours into it. A ``required``
    list must hold at least one entry; with ``need_label`` every entry must name a label; with
    ``one_image`` (LiDAR scans) an image list is refused.
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
    if required and not entries:
        if "layout" in data:  # one of data_manifests/ whose split is not listed (BraTS): it names no files
            raise InputError(path, f"is a dataset manifest with no '{key}' files listed, not a datalist; build one with "
                                   "'medvit datalist MANIFEST DATASET_FOLDER -o datalist.json' and give that")
        raise InputError(path, f"the '{key}' list is empty")
    base = Path(base_dir) if base_dir is not None else path.parent

    def resolve(p: str) -> str:
        if not isinstance(p, str) or not p:
            raise InputError(path, f"'{key}' holds {p!r} where a file path (a string) belongs")
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
        if need_label and "label" not in e:
            raise InputError(path, f"'{key}' entry {i} ({e['image']}) has no 'label'; training and validation need one")
        if isinstance(e.get("label"), list):
            raise InputError(path, f"'{key}' entry {i}: 'label' is a list; a label map is one file")
        if one_image and isinstance(e["image"], list):
            raise InputError(path, f"'{key}' entry {i}: 'image' is a list; a scan is one file")
        if e["image"] == []:
            raise InputError(path, f"'{key}' entry {i}: 'image' is an empty list; give one file per channel")
        item = dict(e)
        for k in ("image", "label"):
            if k in item:
                item[k] = [resolve(p) for p in item[k]] if isinstance(item[k], list) else resolve(item[k])
        out.append(item)
    return out
