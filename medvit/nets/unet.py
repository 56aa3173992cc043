"""A small convolutional baseline: MONAI's :class:`monai.networks.nets.BasicUNet` in 3D."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import BasicUNet
from torch import nn

from medvit.core.errors import ConfigError
from medvit.nets.registry import NETS, check_bottleneck, check_roi, construct

MIN_SIZE = 16
"""Four 2x poolings: a smaller window would pool a side to nothing."""


@NETS.register("unet")
def unet(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options: Any) -> nn.Module:
    """BasicUNet mapping ``(B, in_channels, *roi_size)`` to logits ``(B, out_channels, *roi_size)``.

    ``options`` are BasicUNet's keyword arguments: ``features`` (six channel counts, default
    ``(32, 32, 64, 128, 256, 32)``), act, norm, bias, dropout, upsample. Each roi size must be at
    least 16, and with instance norm (the default) one at least 32 so the 16x-pooled bottleneck is more than
    one voxel; sizes need not be multiples of 16 (the decoder pads to match the encoder).
    """
    check_roi("unet", roi_size, minimum=MIN_SIZE)
    features = options.get("features")
    if isinstance(features, (list, tuple)) and len(features) != 6:
        # BasicUNet's own message does not say which argument it is about
        raise ConfigError(f"model.options.features: expected six channel counts (five encoder levels and the "
                          f"last decoder), got {list(features)}")
    # BasicUNet's default norm is instance norm
    check_bottleneck("unet", roi_size, factor=16, norm=options.get("norm", "instance"))
    return construct(
        BasicUNet,
        "unet",
        options,
        fixed={"spatial_dims": 3, "in_channels": in_channels, "out_channels": out_channels},
        fixed_from={"in_channels": "model.in_channels", "out_channels": "model.out_channels",
                    "spatial_dims": "the volume (always 3)"},
    )
