"""Swin UNETR (Hatamizadeh et al., 2022): a shifted-window transformer encoder with a U-Net decoder.

MONAI's :class:`monai.networks.nets.SwinUNETR`, configured from ``model``; nothing is re-implemented.
"""

from __future__ import annotations

from typing import Any

from monai.networks.nets import SwinUNETR
from torch import nn

from medvit.core.errors import ConfigError
from medvit.nets.registry import NETS, check_bottleneck, check_roi, construct


@NETS.register("swin_unetr")
def swin_unetr(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options: Any) -> nn.Module:
    """Swin UNETR mapping ``(B, in_channels, *roi_size)`` to logits ``(B, out_channels, *roi_size)``.

    ``options`` are SwinUNETR's keyword arguments (feature_size, depths, num_heads, window_size,
    patch_size, drop_rate, use_checkpoint, use_v2, ...). The net takes any input size at
    construction but five halvings of ``patch_size`` patches mean each roi size must be a multiple of
    ``patch_size ** 5`` (32 by default), so that is checked here rather than at the first forward pass.
    With instance norm (the default) a window of exactly ``patch_size ** 5`` on every axis is refused
    too: its bottleneck is a single voxel, which instance norm cannot normalise.
    """
    patch = options.get("patch_size", 2)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1:
        raise ConfigError(f"model.options.patch_size: expected a positive integer, got {patch!r}")
    check_roi("swin_unetr", roi_size, multiple=patch**5)
    # the default norm is instance norm (MONAI's default)
    check_bottleneck("swin_unetr", roi_size, factor=patch**5, norm=options.get("norm_name", "instance"))
    return construct(
        SwinUNETR,
        "swin_unetr",
        options,
        fixed={"in_channels": in_channels, "out_channels": out_channels, "spatial_dims": 3},
        fixed_from={"in_channels": "model.in_channels", "out_channels": "model.out_channels",
                    "spatial_dims": "the volume (always 3)"},
    )
