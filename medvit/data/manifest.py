"""Dataset manifests (``data_manifests/*.json``) and the datalists built from them.

A manifest describes a public dataset without holding any of it: the expected folder
layout, label names, typical and target spacing, and the split. Where the case list is
fixed it is given as a MONAI datalist with paths relative to the dataset's root; where it
is not (BraTS), ``layout.case_glob`` says how to find the cases in a local copy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medvit.errors import InputError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such manifest file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    for key in ("name", "labels", "layout"):
        if key not in data:
            raise InputError(path, f"a manifest needs '{key}'")
    return data


def _glob_cases(manifest: dict[str, Any], root: Path, fold: int, n_folds: int) -> tuple[list[dict], list[dict]]:
    layout = manifest["layout"]
    cases = sorted(p.name for p in root.glob(layout["case_glob"]) if p.is_dir())
    train, val = [], []
    for i, case in enumerate(cases):
        image = layout["image"]
        entry = {
            "image": [s.format(case=case) for s in image] if isinstance(image, list) else image.format(case=case),
            "label": layout["label"].format(case=case),
            "fold": i % n_folds,
        }
        (val if entry["fold"] == fold else train).append(entry)
    return train, val


def build_datalist(manifest_path: str | Path, root: str | Path, *, fold: int = 0, n_folds: int = 5, sha256: bool = False) -> dict[str, Any]:
    """A MONAI datalist with absolute paths for a local copy of a manifest's dataset.

    ``root`` is the dataset's folder, or the folder holding it under the manifest's
    ``layout.root`` name (``BraTS2021_Training_Data/``). Every file the manifest names must
    exist under it; the first missing one is named in the error together with how many are missing.
    """
    manifest = read_manifest(manifest_path)
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "no such dataset folder")
    sub = manifest["layout"].get("root")
    if sub and (root / sub).is_dir():  # ROOT may be the dataset's folder or the one holding it
        root = root / sub
    if "case_glob" in manifest["layout"]:
        train, val = _glob_cases(manifest, root, fold, n_folds)
        if not train and not val:
            raise InputError(root, f"no case folders matching '{manifest['layout']['case_glob']}'")
    else:
        train, val = manifest.get("training", []), manifest.get("validation", [])
    missing: list[str] = []

    def absolute(entry: dict) -> dict:
        out = dict(entry)
        for k in ("image", "label"):
            if k not in out:
                continue
            paths = out[k] if isinstance(out[k], list) else [out[k]]
            full = [root / p for p in paths]
            missing.extend(str(p) for p in full if not p.is_file())
            out[k] = [str(p) for p in full] if isinstance(out[k], list) else str(full[0])
        return out

    result = {
        "name": manifest["name"],
        "labels": manifest["labels"],
        "training": [absolute(e) for e in train],
        "validation": [absolute(e) for e in val],
    }
    if missing:
        raise InputError(root, f"{len(missing)} file(s) of {manifest['name']} are missing, first {missing[0]}")
    if sha256:
        files = [p for e in result["training"] + result["validation"] for k in ("image", "label") if k in e
                 for p in (e[k] if isinstance(e[k], list) else [e[k]])]
        result["sha256"] = {p: _sha256(Path(p)) for p in files}
    return result
