"""Pictures of scenes: a bird's-eye PNG of per-point labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipelines.volume.report import label_color


def write_bev(xyz: np.ndarray, labels: np.ndarray, path: str | Path, *, names: dict[int, str] | None = None,
              max_side: int = 1600) -> Path:
    """A top-down PNG: each pixel takes the label of the highest point in it; north (+y) up.

    The resolution is chosen so the longer side of the scene spans at most ``max_side``
    pixels; a legend names the colours. Written atomically.
    """
    from medvit.core.files import atomic_path

    xyz = np.asarray(xyz, dtype=np.float64)
    labels = np.asarray(labels)
    lo, hi = xyz[:, :2].min(0), xyz[:, :2].max(0)
    res = max((hi - lo).max() / (max_side - 1), 0.05)
    w, h = (np.floor((hi - lo) / res).astype(int) + 1).tolist()
    px = np.floor((xyz[:, :2] - lo) / res).astype(np.int64)
    flat = (h - 1 - px[:, 1]) * w + px[:, 0]
    # the highest point per pixel wins: sort by height, later writes overwrite earlier ones
    order = np.argsort(xyz[:, 2], kind="stable")
    img = np.zeros((h * w, 3), np.uint8)
    ids = np.unique(labels)
    if names:
        ids = np.union1d(ids, np.array(sorted(names), dtype=ids.dtype))
    palette = np.zeros((int(ids.max()) + 1, 3), np.uint8)
    for i in ids:
        palette[int(i)] = label_color(int(i) + 1)
    img[flat[order]] = palette[labels[order].astype(np.int64)]
    im = Image.fromarray(img.reshape(h, w, 3))
    draw = ImageDraw.Draw(im)
    for row, i in enumerate(ids):
        y = 8 + 16 * row
        draw.rectangle([8, y, 20, y + 12], fill=tuple(int(c) for c in palette[int(i)]))
        draw.text((26, y), (names or {}).get(int(i), str(int(i))), fill=(255, 255, 255))
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
    return Path(path)
