"""Per-label evaluation of a predicted label map against a reference on the same grid.

Dice, 95th-percentile Hausdorff distance (mm) and surface Dice at a tolerance (mm), all
computed by MONAI's metric functions. Each label is evaluated on its own: a binary
``(1, 1, *box)`` mask cropped to the union of the label's bounding boxes in the two maps,
so memory follows the size of one organ rather than ``labels x volume``.

A result is a JSON-ready dict::

    {"prediction": str | None, "reference": str | None, "spacing": [sx, sy, sz],
     "tolerance_mm": float, "mean_dice": float | None, "n_reference_labels": int,
     "labels": {key: {"id", "name", "status", "dice", "hd95_mm", "surface_dice",
                      "voxels_prediction", "voxels_reference"}}}

A map one voxel thick along one axis (a 2D file, or one slice of a volume) is scored in the
plane of the other two: surfaces are in-plane outlines and distances in-plane, as MONAI's
metrics give on the 2D arrays. In 3D every voxel of such a slab is surface, which scored a
shrunken square's surface Dice 0.61 against 0 in 2D.

``labels`` is keyed by the label's name (its id as a string when it has none) and
ordered by id. ``status`` is one of ``STATUS_OK``, ``STATUS_MISSING_PRED``,
``STATUS_MISSING_REF`` or ``STATUS_ABSENT``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from medvit.core.errors import InputError, MedvitError, listed
from medvit.io.common import corner_offset_mm, tilt_degrees

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_MISSING_PRED = "missing in prediction"
STATUS_MISSING_REF = "missing in reference"
STATUS_ABSENT = "absent in both"

GRID_TOLERANCE_MM = 1e-3

__all__ = [
    "evaluate_labels",
    "evaluate_files",
    "format_table",
    "write_json",
    "read_label_names",
    "STATUS_OK",
    "STATUS_MISSING_PRED",
    "STATUS_MISSING_REF",
    "STATUS_ABSENT",
]


def _as_label_array(a: Any, what: str) -> np.ndarray:
    """A 3D non-negative integer array from an array, tensor or ``(1, X, Y, Z)`` map."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"{what} must be a 3D label map (X, Y, Z), got shape {a.shape}")
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        r = np.rint(a)
        if not np.array_equal(r, a):
            raise ValueError(f"{what} holds non-integer values; expected a label map")
        a = r.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError(f"{what} holds negative values; expected label ids >= 0")
    return a


def _objects(a: np.ndarray) -> dict[int, tuple[slice, ...]]:
    """Bounding box of every non-zero label in one pass (scipy's find_objects)."""
    if not a.size:
        return {}
    if int(a.max()) <= 4 * a.size:
        return {i + 1: b for i, b in enumerate(ndimage.find_objects(a)) if b is not None}
    # find_objects keeps a slot per id up to the largest (2e9 ids: out of memory): renumber first
    ids, dense = np.unique(a, return_inverse=True)
    dense = dense.reshape(a.shape)
    if ids[0] != 0:  # no background voxel: keep 0 free, find_objects skips it
        ids, dense = np.r_[0, ids], dense + 1
    return {int(ids[i + 1]): b for i, b in enumerate(ndimage.find_objects(dense)) if b is not None}


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Union of two boxes grown by one voxel (clamped), so surfaces inside stay surfaces."""
    boxes = [x for x in (a, b) if x is not None]
    return tuple(
        slice(max(min(bx[d].start for bx in boxes) - 1, 0), min(max(bx[d].stop for bx in boxes) + 1, shape[d]))
        for d in range(len(shape))
    )


def _label_key(name: str | None, lid: int, taken: set[str]) -> str:
    key = name if name else str(lid)
    if key in taken:  # two ids sharing a name: keep both rows apart
        key = f"{key} ({lid})"
    taken.add(key)
    return key


def evaluate_labels(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    labels: Mapping[int, str] | None = None,
    tolerance_mm: float = 1.0,
) -> dict:
    """Dice, HD95 (mm) and surface Dice per label of ``pred`` against the reference ``gt``.

    Args:
        pred: predicted label map, integer ``(X, Y, Z)`` (or ``(1, X, Y, Z)``).
        gt: reference label map of the same shape.
        spacing: voxel size in mm along X, Y, Z.
        labels: optional id -> name; listed ids are reported even when absent from both
            maps (0, the background, is never evaluated).
        tolerance_mm: surface Dice tolerance in mm.

    Returns:
        The result dict described in the module docstring (``prediction``/``reference`` None).
        Labels in one map only get Dice 0, surface Dice 0 and HD95 None; labels in neither get
        None for all three. ``mean_dice`` averages Dice over the labels in the reference.
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    pred = _as_label_array(pred, "prediction")
    gt = _as_label_array(gt, "reference")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {gt.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {spacing}")
    if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise MedvitError(f"--tolerance (the surface Dice tolerance) must be a finite distance of at least 0 mm, got {tolerance_mm}")
    tolerance_mm = float(tolerance_mm) + 0.0  # -0.0 becomes 0.0 (the table printed "sDice@-0.0mm")
    names = {int(k): str(v) for k, v in (labels or {}).items()}
    flat = [i for i, n in enumerate(pred.shape) if n == 1]
    metric_spacing = spacing
    if len(flat) == 1:  # one voxel thick: score in its plane (see the module docstring)
        pred, gt = pred.squeeze(flat[0]), gt.squeeze(flat[0])
        metric_spacing = tuple(s for i, s in enumerate(spacing) if i != flat[0])

    box_p, box_g = _objects(pred), _objects(gt)
    ids = sorted((set(box_p) | set(box_g) | set(names)) - {0})

    rows: dict[str, dict] = {}
    taken: set[str] = set()
    dices_ref: list[float] = []
    for lid in ids:
        name = names.get(lid)
        row: dict[str, Any] = {"id": lid, "name": name, "dice": None, "hd95_mm": None, "surface_dice": None,
                               "voxels_prediction": 0, "voxels_reference": 0}
        in_p, in_g = lid in box_p, lid in box_g
        if in_p or in_g:
            box = _union_box(box_p.get(lid), box_g.get(lid), pred.shape)
            mp = pred[box] == lid
            mg = gt[box] == lid
            row["voxels_prediction"] = int(np.count_nonzero(mp))
            row["voxels_reference"] = int(np.count_nonzero(mg))
        if in_p and in_g:
            # (batch, channel, *box) binary masks; include_background=True keeps the one channel.
            yp = torch.from_numpy(mp)[None, None].float()
            yg = torch.from_numpy(mg)[None, None].float()
            row["status"] = STATUS_OK
            row["dice"] = float(compute_dice(yp, yg, include_background=True)[0, 0])
            with warnings.catch_warnings():
                # MONAI's metrics call their own deprecated argument; not the user's concern.
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
                row["hd95_mm"] = float(
                    compute_hausdorff_distance(yp, yg, include_background=True, percentile=95, spacing=metric_spacing)[0, 0]
                )
                row["surface_dice"] = float(
                    compute_surface_dice(yp, yg, [float(tolerance_mm)], include_background=True, spacing=metric_spacing)[0, 0]
                )
        elif in_p or in_g:
            # One side empty: no overlap and no surface agreement; a distance to nothing is undefined.
            row["status"] = STATUS_MISSING_REF if in_p else STATUS_MISSING_PRED
            row["dice"] = 0.0
            row["surface_dice"] = 0.0
        else:
            row["status"] = STATUS_ABSENT
        if in_g:
            dices_ref.append(row["dice"])
        rows[_label_key(name, lid, taken)] = row

    return {
        "prediction": None,
        "reference": None,
        "spacing": list(spacing),
        "tolerance_mm": float(tolerance_mm),
        "mean_dice": float(np.mean(dices_ref)) if dices_ref else None,
        "n_reference_labels": len(dices_ref),
        "labels": rows,
    }


def _grid_difference(a_shape, a_affine: np.ndarray, b_shape, b_affine: np.ndarray) -> str | None:
    """How two voxel grids differ (None when they match): shape, or the largest corner offset in mm."""
    if tuple(a_shape) != tuple(b_shape):
        fmt = lambda s: "x".join(str(int(n)) for n in s)  # noqa: E731
        return f"shape {fmt(a_shape)} vs {fmt(b_shape)}"
    off = corner_offset_mm(a_shape, a_affine, b_affine)
    if not off <= GRID_TOLERANCE_MM:  # NaN too
        return f"affine differs by up to {off:.4g} mm at the grid corners"
    return None


def _reoriented(arr: np.ndarray, affine: np.ndarray, like: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``arr`` with its axes permuted and flipped to the closest match of ``like``'s axis
    directions, and the affine that places the result where ``arr`` was (nibabel's orientations)."""
    import nibabel as nib
    from nibabel import orientations as ornt

    t = ornt.ornt_transform(nib.io_orientation(affine), nib.io_orientation(like))
    return ornt.apply_orientation(arr, t), affine @ ornt.inv_ornt_aff(t, arr.shape)


def _renumber_by_name(ref: np.ndarray, ref_names: Mapping[int, str], labels: dict[int, str], where) -> np.ndarray:
    """``ref`` with each named label moved to the id ``labels`` gives the same name; a name
    ``labels`` lacks gets the next free id, added to ``labels`` (updated in place) and warned about."""
    from medvit.io.segment_codes import match_names

    matched, unmatched = match_names(ref_names, labels)
    lut = np.arange(max([int(ref.max()) if ref.size else 0, *ref_names]) + 1, dtype=np.int64)
    for n, i in matched.items():
        lut[n] = i
    had_names, new = bool(labels), max([0, *labels]) + 1
    unknown = []
    for n, name in sorted(unmatched.items()):
        lut[n], labels[new] = new, name
        unknown.append(f"{name!r} (now {new})")
        new += 1
    if unknown and had_names:
        log.warning("%s: reference label(s) %s match no label name of the prediction; scored as labels of their own",
                    where, ", ".join(unknown))
    return lut[ref]


def evaluate_files(
    pred_path: str | Path,
    gt_path: str | Path,
    *,
    labels: Mapping[int, str] | None = None,
    tolerance_mm: float = 1.0,
    image: str | Path | None = None,
) -> dict:
    """Evaluate a predicted label map file against a reference file on the same grid.

    Both are read with :func:`medvit.io.read_label`, a DICOM SEG or RTSTRUCT onto ``image``, the
    DICOM series it was drawn on (without it, such a file is an InputError). A reference that
    names its labels (SEG segment labels, RTSTRUCT ROI names) is renumbered to the label ids of
    the same name (case, separators and word order of left/right aside) in ``labels``, else in
    the prediction's names; a reference label no id is named after keeps a new id of its own
    and is warned about. Their shapes must be equal and their
    affines must place the grid within 1e-3 mm of each other, else :class:`InputError`
    naming the prediction. A reference holding the same grid in another axis order or
    direction (flipped along an axis, say) is reoriented to the prediction's first. Spacing
    is the affine's column norms; a sheared grid (a gantry-tilted series kept as it is) is
    scored so with a warning that its distances are approximate. See :func:`evaluate_labels`.
    """
    from medvit.io import read_label

    pred_m = read_label(pred_path, source=image)  # (1, X, Y, Z): read_label refuses several channels
    gt_m = read_label(gt_path, source=image)
    pred_names = pred_m.meta.get("medvit_label_names")
    if labels is None and pred_names:
        labels = dict(pred_names)
    pred_aff = np.asarray(pred_m.affine, dtype=np.float64)
    gt_aff = np.asarray(gt_m.affine, dtype=np.float64)
    pred = pred_m.as_tensor()[0].numpy()
    gt = gt_m.as_tensor()[0].numpy()
    gt_names = gt_m.meta.get("medvit_label_names")
    if gt_names:
        labels = dict(labels or {})
        gt = _renumber_by_name(gt, gt_names, labels, gt_path)
    diff = _grid_difference(pred.shape, pred_aff, gt.shape, gt_aff)
    if diff is not None:
        # The same voxels stored in another axis order or direction (a reference written by
        # another tool, e.g. flipped along j) is the same grid: reorient it to the prediction's.
        gt_r, gt_aff_r = _reoriented(gt, gt_aff, pred_aff)
        if _grid_difference(pred.shape, pred_aff, gt_r.shape, gt_aff_r) is not None:
            raise InputError(pred_path, f"grid differs from the reference {gt_path}: {diff}")
        gt, gt_aff = gt_r, gt_aff_r
    spacing = tuple(float(s) for s in np.linalg.norm(gt_aff[:3, :3], axis=0))
    angle = tilt_degrees(gt_aff)
    if angle > 1e-3:  # per-axis spacing cannot describe a sheared grid (a gantry-tilted series kept as it is)
        log.warning("%s: the grid is sheared (its slice axis %.1f° off the normal); HD95 and surface Dice use the "
                    "voxel steps %s mm as spacing and are approximate", gt_path, angle, [round(x, 4) for x in spacing])

    for p, a in ((pred_path, pred), (gt_path, gt)):
        if a.size and a.min() < 0:
            raise InputError(p, f"label map holds negative values (minimum {a.min()})")
    result = evaluate_labels(pred, gt, spacing, labels=labels, tolerance_mm=tolerance_mm)
    result["prediction"] = str(pred_path)
    result["reference"] = str(gt_path)
    return result


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(result: dict) -> str:
    """A fixed-width text table of a result: label id, name, Dice, HD95 mm, surface Dice, status."""
    tol = result.get("tolerance_mm")
    head = ["id", "name", "Dice", "HD95 mm", f"sDice@{_fmt(tol, 1)}mm" if tol is not None else "sDice", "status"]
    body = [
        [str(r["id"]), _fmt(r["name"]), _fmt(r["dice"]), _fmt(r["hd95_mm"], 2), _fmt(r["surface_dice"]), r["status"]]
        for r in sorted(result["labels"].values(), key=lambda r: r["id"])
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    right = {0, 2, 3, 4}  # numbers align right

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths]), *map(line, body)]
    n = result.get("n_reference_labels", 0)
    out.append(f"mean Dice over {n} reference labels: {_fmt(result.get('mean_dice'))}")
    return "\n".join(out)


def write_json(result: dict, path: str | Path, protect: tuple[str | Path, ...] = ()) -> Path:
    """Write a result as JSON through a temporary file and a rename; returns the path. Refuses to
    overwrite a path in ``protect`` (the label maps evaluated)."""
    from medvit.core.files import atomic_path, refuse_protected

    path = Path(path)
    refuse_protected(path, protect)
    text = json.dumps(result, indent=1, allow_nan=False)  # None, never NaN, for undefined metrics
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text + "\n")
    return path


def _id_names(obj: Any) -> dict[int, str] | None:
    """``obj`` as id -> name when it is a non-empty mapping of integer keys to strings."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, str) for v in obj.values()):
        return None
    try:
        ids = [int(k) for k in obj]
    except ValueError:
        return None
    if len(set(ids)) < len(ids) or min(ids) < 0:  # "1" and "01" would name one label twice
        return None
    return dict(zip(ids, obj.values()))


def read_label_names(path: str | Path) -> dict[int, str]:
    """Label id -> name from a JSON file: ``{id: name}``, or a mapping holding it under ``labels``
    (a checkpoint's ``.json`` sidecar, at the top level or under ``config``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read: {e}") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"not valid JSON (line {e.lineno})") from None
    candidates = [data]
    if isinstance(data, dict):
        candidates.append(data.get("labels"))
        if isinstance(data.get("config"), dict):
            candidates.append(data["config"].get("labels"))
    for c in candidates:
        names = _id_names(c)
        if names is not None:
            return names
    maps = [k for k, v in data.items() if _id_names(v) is not None] if isinstance(data, dict) else []
    if maps:  # TotalSegmentator's class map: {"total": {...}, "total_mr": {...}}
        raise InputError(path, f"holds several label maps ({listed(maps)}); save the one that fits the prediction "
                               "as its own {id: name} file")
    raise InputError(path, "expected a JSON object of label id -> name (distinct ids of at least 0), "
                           "or one with a 'labels' entry")
