"""Dataset manifests (``data_manifests/*.json``) and the datalists built from them.

A manifest describes a public dataset without holding any of it: the expected folder
layout, label names, typical and target spacing, and the split. Where the case list is
fixed it is given as a MONAI datalist with paths relative to the dataset's root; where it
is not (BraTS), ``layout.case_glob`` says how to find the cases in a local copy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from medvit.core.errors import InputError
from medvit.io.common import sha256_file

log = logging.getLogger(__name__)
_EMPTY_SPLIT = {
    "training": "; train refuses a datalist with no training case",
    "validation": "; training would run without validation and write no best checkpoint",
}


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such manifest file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(path, f"a manifest is a JSON object, got {type(data).__name__}")
    for key in ("name", "labels", "layout"):
        if key not in data:
            raise InputError(path, f"a manifest needs '{key}'")
    _check_layout(path, data)
    return data


def _paths_ok(value: Any) -> bool:
    """A relative path, or a non-empty list of them (one per channel)."""
    items = value if isinstance(value, list) else [value]
    return bool(items) and all(isinstance(v, str) and v and not Path(v).is_absolute() for v in items)


def _check_layout(path: Path, data: dict[str, Any]) -> None:
    """The keys ``build_datalist`` reads, checked up front so that a malformed manifest is one line."""
    if not isinstance(data["labels"], dict):
        raise InputError(path, "'labels' must be an object of label id -> name")
    layout = data["layout"]
    if not isinstance(layout, dict):
        raise InputError(path, f"'layout' must be an object, got {type(layout).__name__}")
    if "case_glob" in layout:
        glob = layout["case_glob"]
        if not isinstance(glob, str) or not glob or Path(glob).is_absolute():
            raise InputError(path, f"'layout.case_glob' must be a relative folder pattern, got {glob!r}")
        for key in ("image", "label"):
            if key not in layout:
                raise InputError(path, f"'layout' with a case_glob needs '{key}' (a path template using {{case}})")
            if not _paths_ok(layout[key]):
                raise InputError(path, f"'layout.{key}' must be a relative path template or a list of them, got {layout[key]!r}")
            for t in layout[key] if isinstance(layout[key], list) else [layout[key]]:
                try:
                    t.format(case="x")
                except (KeyError, IndexError, ValueError) as e:
                    raise InputError(path, f"'layout.{key}' template {t!r} may only use {{case}} ({type(e).__name__}: {e})") from None
        return
    for split in ("training", "validation"):
        entries = data.get(split, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise InputError(path, f"'{split}' must be a list of {{\"image\": ..., \"label\": ...}} entries")
        for i, e in enumerate(entries):
            for key in ("image", "label"):
                if key in e and not _paths_ok(e[key]):
                    raise InputError(path, f"'{split}[{i}].{key}' must be a relative path or a list of them, got {e[key]!r}")


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


def build_datalist(manifest_path: str | Path, root: str | Path, *, fold: int | None = None, n_folds: int = 5,
                   sha256: bool = False) -> dict[str, Any]:
    """A MONAI datalist with absolute paths for a local copy of a manifest's dataset.

    ``root`` is the dataset's folder, or the folder holding it under the manifest's
    ``layout.root`` name (``BraTS2021_Training_Data/``). Every file the manifest names must
    exist under it; the first missing one is named in the error together with how many are missing.
    ``fold`` (default 0) picks the validation fold of a manifest split by folds (``case_glob``); a
    manifest with a fixed split refuses one.
    """
    manifest = read_manifest(manifest_path)
    if "case_glob" in manifest["layout"]:
        fold = 0 if fold is None else fold
        if not 0 <= fold < n_folds:
            raise InputError(manifest_path, f"--fold must be 0..{n_folds - 1} ({n_folds} folds), got {fold}")
    elif fold is not None:
        raise InputError(manifest_path, "has a fixed training/validation split; --fold does not apply")
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
    for split, other in (("training", "validation"), ("validation", "training")):
        if not result[split]:  # e.g. fold 4 of three cases: training would run without validation
            where = f", fold {fold}" if "case_glob" in manifest["layout"] else ""
            log.warning("%s%s: the %s split is empty (%d %s cases)%s", manifest["name"], where, split,
                        len(result[other]), other, _EMPTY_SPLIT[split])
    if sha256:
        result["sha256"] = {p: sha256_file(p) for p in datalist_files(result)}
    return result


def datalist_files(datalist: dict[str, Any]) -> list[str]:
    """Every image and label path of a datalist's training and validation entries."""
    return [p for e in datalist["training"] + datalist["validation"] for k in ("image", "label") if k in e
            for p in (e[k] if isinstance(e[k], list) else [e[k]])]
