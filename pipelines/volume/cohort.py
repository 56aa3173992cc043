"""A cohort for ``medvit batch``: its cases, their ids, the ``done`` records and the cohort table.

A case is one image (or one image per channel) and an id. The id names everything written for
the case (``OUT/<id>/<id>_seg.nii.gz``...), so it comes from the datalist (``case_id`` or ``id``)
or is a short hash of the source path(s), never a folder or file name, which may carry a patient
attribute. ``cases.csv`` maps ids back to sources for the user who ran the batch.

A case is finished when ``OUT/<id>/done.json`` exists and agrees: the checkpoint's SHA-256, the
options and the source paths (as a hash) are those of this run, and every output it lists has its recorded SHA-256
(:func:`finished`). Anything else in ``OUT/<id>`` is redone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from medvit.core.errors import InputError
from medvit.core.files import atomic_path
from medvit.io.common import sha256_file

DONE = "done.json"
CASES = "cases.csv"
TABLE_CSV, TABLE_PARQUET = "cohort.csv", "cohort.parquet"
TABLE_COLUMNS = ("case_id", "status", "label_id", "label_name", "voxels", "volume_mm3", "mean_intensity", "message")
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_IMAGE_FORMATS = ("nifti", "nrrd", "mha")


@dataclass(frozen=True)
class Case:
    case_id: str
    paths: tuple[str, ...]
    """Absolute source path(s): one image, or one file per channel."""


def hashed_id(paths: list[str] | tuple[str, ...]) -> str:
    """``c`` and the first 10 hex digits of the SHA-256 of the resolved source path(s)."""
    text = "\n".join(str(Path(p).resolve()) for p in paths)
    return "c" + hashlib.sha256(text.encode()).hexdigest()[:10]


def sources_digest(case: Case) -> str:
    """SHA-256 of a case's source paths: the done record tells a changed source without naming it."""
    return hashlib.sha256("\n".join(case.paths).encode()).hexdigest()


def _entry_id(where: Path, i: int, entry: dict) -> str | None:
    raw = entry.get("case_id", entry.get("id"))
    if raw is None:
        return None
    text = str(raw)
    if isinstance(raw, bool) or not _ID.fullmatch(text):
        raise InputError(where, f"entry {i}: case id {text!r} must be 1-64 letters, digits, '_', '-' or '.' "
                                "(not starting with '.' or '-'): it names the case's output folder")
    return text


def _from_entries(where: Path, entries: list[dict]) -> list[Case]:
    cases = []
    for i, e in enumerate(entries):
        paths = tuple(e["image"]) if isinstance(e["image"], list) else (e["image"],)
        paths = tuple(str(Path(p).resolve()) for p in paths)
        cases.append(Case(_entry_id(where, i, e) or hashed_id(paths), paths))
    return cases


def _from_folder(folder: Path) -> list[Case]:
    """Each NIfTI/NRRD/MHA file of ``folder`` and each of its subfolders (a DICOM series) is a case."""
    from medvit.io.reader import source_format

    cases, loose = [], []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            cases.append(Case(hashed_id([str(p)]), (str(p.resolve()),)))
            continue
        try:
            fmt = source_format(p)
        except InputError:
            continue  # not an image (a README, a CSV): not a case
        if fmt in _IMAGE_FORMATS:
            cases.append(Case(hashed_id([str(p)]), (str(p.resolve()),)))
        else:
            loose.append(p)
    if loose:
        raise InputError(folder, f"holds DICOM files itself ({len(loose)}); a folder of cases holds one subfolder per "
                                 "DICOM series")
    return cases


def list_cases(source: str | Path, *, root: str | Path | None = None, split: str | None = None) -> list[Case]:
    """The cases of ``source``: a MONAI datalist (its ``split`` list, default ``test``), a dataset
    manifest of ``data_manifests/`` with the dataset's folder ``root`` (its training and validation
    cases, or the ``split`` named), or a folder of cases (:func:`_from_folder`). InputError for no
    case, an id that cannot name a folder, or two cases of one id."""
    from medvit.data.datalist import read_datalist
    from medvit.data.manifest import build_datalist

    source = Path(source)
    if not source.exists():
        raise InputError(source, "no such datalist, manifest or folder of cases")
    if source.is_dir():
        if root is not None or split is not None:
            raise InputError(source, "is a folder of cases; --root and --split apply to a manifest or datalist")
        cases = _from_folder(source)
    else:
        try:
            manifest = "layout" in json.loads(source.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(source, f"not valid JSON ({e}); INPUT is a datalist, a manifest or a folder") from None
        if manifest:
            if root is None:
                raise InputError(source, "is a dataset manifest; give the dataset's folder with --root")
            dl = build_datalist(source, root)
            if split not in (None, "training", "validation"):
                raise InputError(source, f"--split {split}: a manifest's splits are training and validation")
            entries = dl["training"] + dl["validation"] if split is None else dl[split]
        else:
            if root is not None:
                raise InputError(source, "--root is for a manifest; a datalist's relative paths start at its folder")
            entries = read_datalist(source, split or "test")
        cases = _from_entries(source, entries)
    if not cases:
        raise InputError(source, "holds no case (NIfTI, NRRD or MHA files, or DICOM series folders)")
    seen: dict[str, Case] = {}
    for c in cases:
        if c.case_id in seen:
            raise InputError(source, f"two cases have the id {c.case_id!r} ({', '.join(seen[c.case_id].paths)} and "
                                     f"{', '.join(c.paths)})")
        seen[c.case_id] = c
    return cases


def write_cases(cases: list[Case], path: Path) -> None:
    """``cases.csv``: case id, source path(s) (``;`` between channels)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "source"])
    w.writerows([c.case_id, ";".join(c.paths)] for c in cases)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(buf.getvalue())


def output_hashes(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` but the done record."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != DONE}


def finished(folder: Path, expect: dict) -> dict | None:
    """The done record of ``folder`` when it agrees with this run (``expect``: its checkpoint SHA-256,
    options and sources, compared key by key) and every output it lists has its recorded SHA-256;
    else None (the case is redone)."""
    try:
        record = json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in expect.items()):
        return None
    outputs = record.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return None
    for rel, sha in outputs.items():
        p = folder / rel
        if not p.is_file() or sha256_file(p) != sha:
            return None
    return record


def remove_stale(out: Path) -> int:
    """Remove the temporary case folders (``.<id>.tmp-*``) a killed run left; returns how many."""
    stale = [p for p in out.glob(".*.tmp-*") if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def table_rows(case_id: str, record: dict | None, error: str | None = None) -> list[dict]:
    """The cohort table's rows for a case: one per label of its done record, or one error row."""
    if error is not None or record is None:
        return [dict.fromkeys(TABLE_COLUMNS) | {"case_id": case_id, "status": "error", "message": error}]
    return [dict.fromkeys(TABLE_COLUMNS) | {"case_id": case_id, "status": "ok", "label_id": r["id"],
                                            "label_name": r["name"], "voxels": r["voxels"],
                                            "volume_mm3": r["volume_mm3"], "mean_intensity": r["mean_intensity"]}
            for r in record["labels"]]


def write_table(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """``cohort.csv`` (empty cell for none) and ``cohort.parquet`` (typed columns, nulls), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n")
    w.writeheader()
    w.writerows({k: ("" if r[k] is None else r[k]) for k in TABLE_COLUMNS} for r in rows)
    with atomic_path(out / TABLE_CSV) as tmp:
        Path(tmp).write_text(buf.getvalue())
    schema = pa.schema([("case_id", pa.string()), ("status", pa.string()), ("label_id", pa.int32()),
                        ("label_name", pa.string()), ("voxels", pa.int64()), ("volume_mm3", pa.float64()),
                        ("mean_intensity", pa.float64()), ("message", pa.string())])
    with atomic_path(out / TABLE_PARQUET) as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    return out / TABLE_CSV, out / TABLE_PARQUET
