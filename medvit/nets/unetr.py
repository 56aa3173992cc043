"""UNETR (Hatamizadeh et al., 2022): a ViT encoder on 16³ patches with a convolutional decoder.

MONAI's :class:`monai.networks.nets.UNETR`, configured from ``model``; nothing is re-implemented.
"""

from __future__ import annotations

from typing import Any

from monai.networks.nets import UNETR
from torch import nn

from medvit.nets.registry import NETS, check_roi, construct

PATCH = 16
"""MONAI's UNETR embeds fixed 16³ patches, so the window must tile into them exactly."""


@NETS.register("unetr")
def unetr(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options: Any) -> nn.Module:
    """UNETR mapping ``(B, in_channels, *roi_size)`` to logits ``(B, out_channels, *roi_size)``.

    ``options`` are UNETR's keyword arguments (feature_size, hidden_size, mlp_dim, num_heads, proj_type,
    norm_name, conv_block, res_block, dropout_rate, qkv_bias, save_attn); each roi size must be a
    multiple of 16.
    """
    check_roi("unetr", roi_size, multiple=PATCH)
    return construct(
        UNETR,
        "unetr",
        options,
        fixed={"in_channels": in_channels, "out_channels": out_channels, "img_size": roi_size, "spatial_dims": 3},
        fixed_from={"in_channels": "model.in_channels", "out_channels": "model.out_channels",
                    "img_size": "model.roi_size", "spatial_dims": "the volume (always 3)"},
    )
