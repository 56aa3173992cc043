"""Sliding-window inference over dense volumes.

For now this delegates to MONAI's ``sliding_window_inference`` with Gaussian blending;
callers depend only on :func:`sliding_window`'s signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.inferers import sliding_window_inference

from medvit.errors import MedvitError


def sliding_window(
    inputs: torch.Tensor,
    predictor: Callable[[torch.Tensor], torch.Tensor],
    *,
    roi_size: Sequence[int],
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``predictor`` over overlapping windows of ``inputs`` and blend the outputs.

    Args:
        inputs: (B, C, D, H, W) tensor; spatial axes smaller than ``roi_size`` are padded.
        predictor: maps a (b, C, *roi_size) batch to (b, K, *roi_size) logits.
        roi_size: window size per spatial axis.
        sw_batch_size: windows per predictor call.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        mode: ``gaussian`` (importance-weighted) or ``constant`` blending.
        device: where the stitched output lives; default the input's device.

    Returns:
        (B, K, D, H, W) float32 blended logits.
    """
    if not 0 <= overlap < 1:
        raise MedvitError(f"overlap must lie in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise MedvitError(f"batch size must be at least 1, got {sw_batch_size}")
    out = sliding_window_inference(
        inputs,
        roi_size=tuple(int(r) for r in roi_size),
        sw_batch_size=sw_batch_size,
        predictor=predictor,
        overlap=overlap,
        mode=mode,
        device=device,
        progress=progress,
    )
    return out.as_tensor() if hasattr(out, "as_tensor") else out
