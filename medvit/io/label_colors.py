"""One colour per label id, shared by the PNG previews and the RTSTRUCT ROIs."""

from __future__ import annotations

import colorsys


def label_color(label_id: int) -> tuple[int, int, int]:
    """A bright RGB colour per label id; hues step by the golden ratio so neighbouring ids differ."""
    h = (int(label_id) * 0.6180339887498949) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 1.0)
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))
