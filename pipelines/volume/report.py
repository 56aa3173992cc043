"""Per-case reports for a segmentation: label statistics (CSV/JSON) and a PNG preview.

``label_stats`` counts voxels, volume and mean intensity per label in one vectorised pass
(``np.bincount`` over slabs, so a 512x512x300 volume needs no full-size int64 copy).
``write_preview`` draws three orthogonal slices through the labels' centroid, overlaid in
colour, in radiological convention (patient right on the viewer's left; anterior up in the
axial view; superior up in coronal and sagittal, anterior on the left in sagittal), each
resampled with Pillow to square physical pixels, lettered at its edges, above a legend of
the labels shown.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvit.io.label_colors import label_color

__all__ = ["label_stats", "write_stats", "write_preview", "label_color", "percentile_window", "STATS_COLUMNS", "HU_WINDOW"]

STATS_COLUMNS = ("id", "name", "voxels", "volume_mm3", "mean_intensity")
HU_WINDOW = (-160.0, 240.0)
"""Soft-tissue CT window used for previews when the image looks like Hounsfield units."""
OVERLAY_ALPHA = 0.45
_SLAB_VOXELS = 1 << 23  # voxels per bincount pass: bounds the int64/float64 temporaries to ~64 MB
_PANEL_MIN, _PANEL_MAX, _GAP = 256, 768, 8  # longest panel side (px) and the gap between panels


def _as_array(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[0] == 1:  # a channel-first map (1, X, Y, Z)
        a = a[0]
    return a


def _as_labels(labels: Any) -> np.ndarray:
    a = _as_array(labels)
    if a.ndim != 3:
        raise ValueError(f"labels must be a 3D map (X, Y, Z), got shape {a.shape}")
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        r = np.rint(a)
        if not np.array_equal(r, a):
            raise ValueError("labels hold non-integer values")
        a = r.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError("labels hold negative values")
    return a


def _voxel_volume(affine: Any) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def label_stats(
    labels: np.ndarray,
    image: np.ndarray | None,
    affine: np.ndarray,
    *,
    names: Mapping[int, str] | None = None,
) -> list[dict]:
    """Voxel count, volume and mean image intensity per label.

    Args:
        labels: integer label map ``(X, Y, Z)`` (a leading channel of 1 is dropped).
        image: intensities on the same grid ``(X, Y, Z)``, or None.
        affine: voxel -> world matrix (4x4, mm); the voxel volume is ``|det(affine[:3, :3])|``.
        names: optional id -> name; listed ids absent from the map get a row with 0 voxels.

    Returns:
        One dict per label id > 0, ascending: ``id``, ``name`` (None when unnamed), ``voxels``,
        ``volume_mm3`` and ``mean_intensity`` (None without an image, for an empty label, or
        where the image is not finite under the label).
    """
    lab = _as_labels(labels)
    img = None if image is None else _as_array(image)
    if img is not None and img.shape != lab.shape:
        raise ValueError(f"image shape {img.shape} differs from labels shape {lab.shape}")
    n = int(lab.max()) + 1 if lab.size else 1
    counts = np.zeros(n, dtype=np.int64)
    sums = np.zeros(n, dtype=np.float64)
    # Slabs along the last axis keep bincount's int64 (and float64 weight) copies small.
    step = max(1, _SLAB_VOXELS // max(1, lab.shape[0] * lab.shape[1]))
    for z in range(0, lab.shape[2], step):
        flat = lab[:, :, z : z + step].ravel()
        counts += np.bincount(flat, minlength=n)
        if img is not None:
            sums += np.bincount(flat, weights=img[:, :, z : z + step].ravel().astype(np.float64), minlength=n)

    names = {int(k): str(v) for k, v in (names or {}).items()}
    vv = _voxel_volume(affine)
    ids = sorted(({int(i) for i in np.flatnonzero(counts)} | set(names)) - {0})
    rows = []
    for i in ids:
        c = int(counts[i]) if i < n else 0
        mean = None
        if img is not None and c:
            m = sums[i] / c
            mean = float(m) if np.isfinite(m) else None
        rows.append({"id": i, "name": names.get(i), "voxels": c, "volume_mm3": c * vv, "mean_intensity": mean})
    return rows


def _atomic_write_text(text: str, path: Path) -> None:
    from medvit.core.files import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_stats(rows: list[dict], csv_path: str | Path, json_path: str | Path) -> tuple[Path, Path]:
    """Write :func:`label_stats` rows as CSV (empty cell for None) and as a JSON list; atomic."""
    csv_path, json_path = Path(csv_path), Path(json_path)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(STATS_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in STATS_COLUMNS})
    _atomic_write_text(buf.getvalue(), csv_path)
    _atomic_write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n", json_path)
    return csv_path, json_path


def _to_ras(a: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    from nibabel.orientations import apply_orientation

    return apply_orientation(a, ornt)


def _finite_sample(image: np.ndarray) -> np.ndarray:
    step = max(1, image.size // 1_000_000)  # percentiles of a strided sample: same answer, far faster
    sample = np.asarray(image).ravel()[::step]
    return sample[np.isfinite(sample)]


def percentile_window(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> tuple[float, float]:
    """The display window ``(lo, hi)`` at the image's own ``low``/``high`` percentiles (an MR's, whose
    values have no fixed unit); ``(0, 1)`` for an image with no finite voxel, ``(v, v + 1)`` for a flat one."""
    sample = _finite_sample(image)
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [low, high])
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def _display_window(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not hi > lo:
            raise ValueError(f"window must rise, got {window}")
        return lo, hi
    sample = _finite_sample(image)
    if sample.size and sample.min() <= -500:  # air (about -1000) only occurs in Hounsfield units
        return HU_WINDOW
    return percentile_window(image)


# The letters at the left, right, top and bottom edge of each radiological view.
_EDGE_LETTERS = {"axial": "RLAP", "coronal": "RLSI", "sagittal": "APSI"}
_FONT_PX, _LETTER_PX, _SWATCH_PX, _PAD = 14, 16, 12, 6


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def _draw_letters(draw, box: tuple[int, int, int, int], letters: str) -> None:
    """R/L, A/P or S/I at the middle of a panel's edges, white on a black outline."""
    left, top, w, h = box
    font = _font(_LETTER_PX)
    spots = [(left + 3, top + h / 2, "lm"), (left + w - 3, top + h / 2, "rm"),
             (left + w / 2, top + 2, "mt"), (left + w / 2, top + h - 2, "mb")]
    for (x, y, anchor), letter in zip(spots, letters):
        draw.text((x, y), letter, fill=(255, 255, 255), font=font, anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))


def _legend_entries(ids, names: Mapping[int, str] | None) -> list[tuple[tuple[int, int, int], str]]:
    names = {int(k): str(v) for k, v in (names or {}).items()}
    return [(label_color(i), f"{i} {names[i]}" if i in names else str(i)) for i in sorted(int(v) for v in ids)]


def _with_legend(canvas: np.ndarray, entries: list[tuple[tuple[int, int, int], str]]):
    """``canvas`` (H, W, 3) with a legend below it: a colour swatch and "id name" per entry, in as
    many columns as fit the width; returns a Pillow image."""
    from PIL import Image, ImageDraw

    if not entries:
        return Image.fromarray(canvas)
    font = _font(_FONT_PX)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(int(measure.textlength(text, font=font)) for _, text in entries)
    col_w = _SWATCH_PX + _PAD + text_w + 3 * _PAD
    row_h = _FONT_PX + _PAD
    width = max(canvas.shape[1], col_w + _PAD)
    cols = max(1, (width - _PAD) // col_w)
    rows = -(-len(entries) // cols)
    out = Image.new("RGB", (width, canvas.shape[0] + _PAD + rows * row_h + _PAD), (0, 0, 0))
    out.paste(Image.fromarray(canvas), (0, 0))
    draw = ImageDraw.Draw(out)
    for n, (colour, text) in enumerate(entries):  # down each column, then across
        x = _PAD + (n // rows) * col_w
        y = canvas.shape[0] + _PAD + (n % rows) * row_h
        draw.rectangle([x, y + 1, x + _SWATCH_PX - 1, y + _SWATCH_PX], fill=colour)
        draw.text((x + _SWATCH_PX + _PAD, y + _SWATCH_PX / 2 + 1), text, fill=(255, 255, 255), font=font, anchor="lm")
    return out


def _radiological(s: np.ndarray) -> np.ndarray:
    """A 2D RAS slice (first axis -> columns, second -> rows) as an image: rows = second axis
    descending (anterior or superior up), columns = first axis descending (R, or A, on the left)."""
    return s.T[::-1, ::-1]


def write_preview(
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    path: str | Path,
    *,
    window: tuple[float, float] | None = None,
    names: Mapping[int, str] | None = None,
) -> dict[str, tuple[int, int, int, int]]:
    """Write a PNG of axial, coronal and sagittal slices through the labels' centroid.

    Args:
        image: intensities ``(X, Y, Z)``; windowed to ``window``, or to [-160, 240] when it
            looks like HU, else to its 1st-99th percentiles (:func:`percentile_window`).
        labels: integer label map ``(X, Y, Z)`` on the same grid, overlaid in colour
            (:func:`label_color`) with alpha 0.45; 0 is left clear.
        affine: voxel -> world (RAS mm); gives the orientation and each slice's aspect ratio.
        path: the PNG, written through a temporary name and a rename.
        names: id -> name for the legend.

    Each view has its orientation letters at its edges (axial R, L, A, P; coronal R, L, S, I;
    sagittal A, P, S, I, left, right, top, bottom), and below the views a legend lists the labels
    they show, each with its colour and name.

    Returns:
        The panels' boxes in the PNG, ``{"axial"|"coronal"|"sagittal": (left, top, width, height)}``.
    """
    from nibabel.orientations import io_orientation
    from PIL import Image, ImageDraw

    img = _as_array(image).astype(np.float32, copy=False)
    lab = _as_labels(labels)
    if img.ndim != 3 or img.shape != lab.shape:
        raise ValueError(f"image {img.shape} and labels {lab.shape} must be 3D maps of the same shape")
    aff = np.asarray(affine, dtype=np.float64)
    # Flip/permute the arrays (views) so that axes run R, A, S: display rules then need no cases.
    ornt = io_orientation(aff)
    img, lab = _to_ras(img, ornt), _to_ras(lab, ornt)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.linalg.norm(aff[:3, :3], axis=0)

    fg = lab > 0
    if fg.any():
        centre = []
        for ax in range(3):
            prof = fg.sum(axis=tuple(a for a in range(3) if a != ax), dtype=np.int64)
            centre.append(int(round(float(np.dot(prof, np.arange(prof.size)) / prof.sum()))))
    else:
        centre = [s // 2 for s in lab.shape]
    i, j, k = centre

    # (name, 2D image slice, 2D label slice, mm per column, mm per row) before display flips.
    panels = [
        ("axial", img[:, :, k], lab[:, :, k], spacing[0], spacing[1]),
        ("coronal", img[:, j, :], lab[:, j, :], spacing[0], spacing[2]),
        ("sagittal", img[i, :, :], lab[i, :, :], spacing[1], spacing[2]),
    ]
    extents = [(p[1].shape[0] * p[3], p[1].shape[1] * p[4]) for p in panels]  # (width, height) in mm
    mm_per_px = float(spacing.min())
    longest = max(max(e) for e in extents) / mm_per_px
    mm_per_px *= longest / min(max(longest, _PANEL_MIN), _PANEL_MAX)  # keep previews legible and bounded

    lo, hi = _display_window(img, window)
    tiles, boxes, x, shown = [], {}, 0, set()
    for (name, im2, lab2, _, _), (w_mm, h_mm) in zip(panels, extents):
        size = (max(1, round(w_mm / mm_per_px)), max(1, round(h_mm / mm_per_px)))
        grey = np.clip((np.nan_to_num(_radiological(im2), nan=lo) - lo) / (hi - lo), 0, 1)
        grey = Image.fromarray(np.ascontiguousarray(grey * 255 + 0.5).astype(np.uint8))  # mode L
        grey = np.asarray(grey.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        ids = Image.fromarray(np.ascontiguousarray(_radiological(lab2)).astype(np.int32))  # mode I
        ids = np.asarray(ids.resize(size, Image.Resampling.NEAREST))
        rgb = np.repeat(grey[..., None], 3, axis=2)
        for lid in np.unique(ids):
            if lid == 0:
                continue
            shown.add(int(lid))
            m = ids == lid
            rgb[m] = (1 - OVERLAY_ALPHA) * rgb[m] + OVERLAY_ALPHA * np.asarray(label_color(int(lid)), np.float32)
        tiles.append(np.clip(rgb + 0.5, 0, 255).astype(np.uint8))
        boxes[name] = (x, 0, size[0], size[1])
        x += size[0] + _GAP

    canvas = np.zeros((max(t.shape[0] for t in tiles), x - _GAP, 3), dtype=np.uint8)
    for t, (l, top, w, h) in zip(tiles, boxes.values()):
        canvas[top : top + h, l : l + w] = t
    picture = _with_legend(canvas, _legend_entries(shown, names))
    draw = ImageDraw.Draw(picture)
    for name, box in boxes.items():
        _draw_letters(draw, box, _EDGE_LETTERS[name])
    buf = io.BytesIO()
    picture.save(buf, format="PNG")

    from medvit.core.files import atomic_path

    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(buf.getvalue())
    return boxes
