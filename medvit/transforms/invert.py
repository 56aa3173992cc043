"""Undo the spatial preprocessing of a prediction: back onto the grid of the input image."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from medvit.transforms.chains import IMAGE_KEY

_PRED_KEY = "_medvit_pred"


def invert_prediction(
    pred: torch.Tensor | np.ndarray,
    data: dict,
    transform: Compose,
    *,
    image_key: str = IMAGE_KEY,
    mode: Literal["nearest", "bilinear"] = "nearest",
) -> MetaTensor:
    """Map a prediction on the preprocessed grid back onto the original input grid.

    The spatial steps that ``transform`` applied to ``data[image_key]`` (recorded in its
    ``applied_operations``) are undone on ``pred`` in reverse order, through MONAI's
    ``Invertd``: the foreground crop is padded back with zeros, the resampling to the target
    spacing is resampled back, the reorientation is turned back.

    Which ``mode`` to use:

    * ``"nearest"`` for label maps (``K = 1``, whole numbers): every resampling uses nearest
      neighbour, so the result holds only label values that were in ``pred``; the region the
      crop removed is 0 (background). An integer ``pred`` comes back in its own dtype.
    * ``"bilinear"`` for class scores (``K`` classes): each resampling uses the mode the image
      was resampled with (bilinear), giving smooth scores; take ``argmax(0)`` afterwards. Pass
      probabilities (softmax), not logits: the cropped-away region is filled with zero scores
      for every class, which argmax maps to class 0 (background) only when the scores inside
      are non-negative.

    Args:
        pred: ``(K, X', Y', Z')`` tensor, array or ``MetaTensor`` on the grid of the
            preprocessed ``data[image_key]`` (a single case, not a batch).
        data: the dictionary ``transform`` returned (its ``image_key`` entry must be the
            preprocessed ``MetaTensor`` with its ``applied_operations``).
        transform: the chain that produced ``data`` (for example :func:`infer_transforms`).
        image_key: the key whose recorded operations are undone.
        mode: ``"nearest"`` or ``"bilinear"``, see above.

    Returns:
        ``(K, X, Y, Z)`` ``MetaTensor`` on the input image's grid: its spatial shape and
        ``.affine`` are those of the image before preprocessing.

    Raises:
        ValueError: ``data[image_key]`` carries no transform record, or ``pred`` is not on its grid.
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    image = data.get(image_key)
    if not isinstance(image, MetaTensor):
        raise ValueError(
            f"data[{image_key!r}] must be the MetaTensor the chain returned (with its applied_operations), "
            f"got {type(image).__name__}"
        )
    if not image.applied_operations:
        raise ValueError(f"data[{image_key!r}] carries no record of the transforms applied to it")
    pred_t = torch.as_tensor(pred).detach() if not isinstance(pred, MetaTensor) else pred.as_tensor().detach()
    if pred_t.ndim != 4 or tuple(pred_t.shape[1:]) != tuple(image.shape[1:]):
        raise ValueError(
            f"pred must be (K, {', '.join(map(str, image.shape[1:]))}) on the preprocessed grid, "
            f"got {tuple(pred_t.shape)}"
        )
    in_dtype = pred_t.dtype
    # Invertd copies the image's record and metadata (affine included) onto the prediction.
    inverter = Invertd(
        keys=_PRED_KEY,
        transform=transform,
        orig_keys=image_key,
        nearest_interp=(mode == "nearest"),
        to_tensor=True,
    )
    out = inverter({_PRED_KEY: MetaTensor(pred_t), image_key: image})[_PRED_KEY]
    if mode == "nearest" and not in_dtype.is_floating_point and out.dtype != in_dtype:
        # Nearest neighbour only copies values, so the cast back is exact.
        out = out.round().to(in_dtype)
    return out
