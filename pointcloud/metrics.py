"""Semantic segmentation metrics over points (or voxels): confusion matrix, per-class IoU, mIoU.

Conventions:

- The confusion matrix is ``(K, K)`` int64 with rows = target class, columns = predicted class.
  Points whose *target* is ``ignore_index`` are left out; a prediction of the ignored class
  at a labelled point still counts (as a false negative of the true class), as in the
  SemanticKITTI evaluation.
- ``IoU_c = TP / (TP + FP + FN)``; NaN for a class absent from both target and prediction
  (0 / 0), so a caller can tell "not evaluated" from "all wrong".
- The mean IoU averages a chosen set of classes, never the ignored one:

  ``"union"`` (default): classes present in the target or the prediction. A class predicted
  but absent from the target has IoU 0 and counts; a class absent from both does not.
  ``"target"``: classes present in the target only.
  ``"all"``: every class; absent-from-both classes count as IoU 0. This is what the
  SemanticKITTI API (``np_ioueval.py``: ``tp / (tp + fp + fn + 1e-15)`` averaged over all
  non-ignored classes) computes; over a whole validation split, where every class occurs,
  it equals ``"union"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["SegMetric", "SegScores", "confusion_matrix", "iou_from_confusion", "miou"]

_MODES = ("union", "target", "all")


def confusion_matrix(pred: Any, target: Any, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """``(K, K)`` int64 counts, rows = target, columns = prediction, from one ``bincount``.

    Args:
        pred: predicted class ids, numpy array or torch tensor of any shape.
        target: reference class ids, same number of elements.
        num_classes: ``K``; every prediction and non-ignored target must be in ``[0, K)``.
        ignore_index: target value whose points are left out.

    Torch tensors are counted on their own device; only the ``(K, K)`` result is copied back.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    on_torch = isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor)
    if on_torch:
        pred, target = torch.as_tensor(pred).reshape(-1), torch.as_tensor(target).reshape(-1)
        target = target.to(pred.device)
        integer = [not (v.dtype.is_floating_point or v.dtype.is_complex or v.dtype == torch.bool) for v in (pred, target)]
    else:
        pred, target = np.asarray(pred).reshape(-1), np.asarray(target).reshape(-1)
        integer = [np.issubdtype(v.dtype, np.integer) for v in (pred, target)]
    for name, values, ok in (("pred", pred, integer[0]), ("target", target, integer[1])):
        if not ok:
            raise ValueError(f"{name} must hold integer class ids, got {values.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same number of elements, got {pred.shape[0]} and {target.shape[0]}")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    for name, values in (("pred", pred), ("target", target)):
        if values.shape[0] and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            extra = f" (ignore_index={ignore_index})" if name == "target" else ""
            raise ValueError(f"{name} has class ids in [{int(values.min())}, {int(values.max())}], "
                             f"outside [0, {num_classes}){extra}")
    size = num_classes * num_classes
    if on_torch:
        flat = target.to(torch.int64) * num_classes + pred.to(torch.int64)
        counts = torch.bincount(flat, minlength=size).cpu().numpy()
    else:
        counts = np.bincount(target.astype(np.int64) * num_classes + pred.astype(np.int64), minlength=size)
    return counts.astype(np.int64).reshape(num_classes, num_classes)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """``(K,)`` float64 ``TP / (TP + FP + FN)`` per class; NaN for classes absent from target and prediction."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be (K, K), got shape {cm.shape}")
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def _selected(cm: np.ndarray, classes: str, ignore_index: int | None) -> np.ndarray:
    if classes not in _MODES:
        raise ValueError(f"classes must be one of {_MODES}, got {classes!r}")
    in_target = cm.sum(axis=1) > 0
    chosen = {"union": in_target | (cm.sum(axis=0) > 0), "target": in_target, "all": np.ones(len(cm), bool)}[classes]
    if ignore_index is not None and 0 <= ignore_index < len(cm):
        chosen = chosen.copy()
        chosen[ignore_index] = False
    return chosen


def miou(cm: np.ndarray, *, classes: str = "union", ignore_index: int | None = None) -> float:
    """Mean IoU of the confusion matrix ``cm`` (rows = target) over ``classes`` (see the module docstring).

    ``ignore_index`` (when it is a class id of ``cm``) is never averaged. NaN when no class is selected.
    """
    iou = iou_from_confusion(cm)
    chosen = _selected(np.asarray(cm), classes, ignore_index)
    if not chosen.any():
        return float("nan")
    return float(np.nan_to_num(iou[chosen], nan=0.0).mean())


@dataclass
class SegScores:
    """The result of :meth:`SegMetric.compute`.

    ``iou`` is ``(K,)`` (NaN: absent from target and prediction), ``evaluated`` the ``(K,)`` bool
    mask of the classes averaged into ``miou``, ``accuracy`` the fraction of non-ignored points
    labelled correctly, ``confusion`` the ``(K, K)`` counts (rows = target).
    """

    miou: float
    iou: np.ndarray
    evaluated: np.ndarray
    accuracy: float
    confusion: np.ndarray
    names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready: per-class IoU by name (``None`` for NaN), mIoU, accuracy, point counts."""
        def num(x: float) -> float | None:
            return None if np.isnan(x) else float(x)

        return {
            "miou": num(self.miou),
            "accuracy": num(self.accuracy),
            "iou": {name: num(v) for name, v in zip(self.names, self.iou)},
            "evaluated": [name for name, e in zip(self.names, self.evaluated) if e],
            "points": int(self.confusion.sum()),
        }


class SegMetric:
    """Accumulates a confusion matrix scan by scan; :meth:`compute` gives IoUs over everything seen.

    Args:
        num_classes: ``K``.
        ignore_index: target value left out (and, when it is a class id, never averaged).
        classes: which classes the mean IoU averages: ``"union"``, ``"target"`` or ``"all"``.
        names: ``K`` class names for :meth:`SegScores.to_dict` (default ``"0"``, ``"1"``, ...).
    """

    def __init__(self, num_classes: int, *, ignore_index: int | None = None, classes: str = "union",
                 names: list[str] | None = None) -> None:
        if classes not in _MODES:
            raise ValueError(f"classes must be one of {_MODES}, got {classes!r}")
        if names is not None and len(names) != num_classes:
            raise ValueError(f"names has {len(names)} entries for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.classes = classes
        self.names = list(names) if names is not None else [str(i) for i in range(num_classes)]
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.confusion[:] = 0

    def update(self, pred: Any, target: Any) -> np.ndarray:
        """Add one scan's (or batch's) predictions; returns that scan's own confusion matrix."""
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.confusion += cm
        return cm

    def compute(self) -> SegScores:
        cm = self.confusion.copy()
        total = cm.sum()
        return SegScores(
            miou=miou(cm, classes=self.classes, ignore_index=self.ignore_index),
            iou=iou_from_confusion(cm),
            evaluated=_selected(cm, self.classes, self.ignore_index),
            accuracy=float(np.trace(cm) / total) if total else float("nan"),
            confusion=cm,
            names=list(self.names),
        )
