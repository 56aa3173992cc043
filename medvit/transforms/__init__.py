"""MONAI transform chains built from the config, and the inversion of predictions.

* :func:`preprocess_transforms`: orientation, spacing, CT window or MRI z-score, foreground crop.
* :func:`train_transforms`, :func:`val_transforms`, :func:`infer_transforms`: whole chains
  (optionally starting with ``medvit.io.LoadVolumed``).
* :func:`invert_prediction`: a prediction on the preprocessed grid back onto the input grid.
* :func:`run_chain`: a chain applied with its transforms' user errors raised as themselves.
"""

from medvit.transforms.chains import (
    IMAGE_KEY,
    LABEL_KEY,
    ForegroundAbove,
    infer_transforms,
    preprocess_transforms,
    run_chain,
    train_transforms,
    val_transforms,
)
from medvit.transforms.invert import invert_prediction

__all__ = [
    "IMAGE_KEY",
    "LABEL_KEY",
    "ForegroundAbove",
    "infer_transforms",
    "invert_prediction",
    "preprocess_transforms",
    "run_chain",
    "train_transforms",
    "val_transforms",
]
