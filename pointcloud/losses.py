"""Segmentation losses: the Lovász-softmax loss and its sum with cross-entropy.

Lovász-softmax (Berman, Rannen Triki and Blaschko, CVPR 2018) optimises the Jaccard index
(IoU) directly. For class ``c`` with ground truth ``y`` and predicted probabilities ``p``, the
per-point errors are ``m_i = |1{y_i = c} - p_ic|``. The Jaccard loss of a set ``M`` of
mispredicted points is ``Delta(M) = |M| / |F u M|`` (``F`` the points of class ``c``), which is
``1 - IoU`` when ``M`` is the set of false negatives and false positives. Its Lovász extension,
evaluated at the error vector, is

    loss_c = sum_i m_(i) * (Delta({(1), ..., (i)}) - Delta({(1), ..., (i-1)}))

with the errors sorted in decreasing order ``m_(1) >= m_(2) >= ...``: the errors weighted by the
discrete derivative of the Jaccard loss along that order. It is piecewise linear in ``m``, equals
``1 - IoU`` for saturated (0/1) probabilities, and is the tight convex extension of the Jaccard
loss, so its (sub)gradient is the vector of those discrete derivatives.

The loss is the mean of ``loss_c`` over the classes present in the batch's labels
(``classes="present"``, the default), over all classes (``"all"``: a class with no points then
costs its largest predicted probability), or over a given list of class ids.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CELovaszLoss", "lovasz_grad", "lovasz_softmax"]


def _flatten(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, K)``/``(N,)`` as given; ``(B, K, *S)``/``(B, *S)`` dense maps -> ``(B*prod(S), K)``/``(B*prod(S),)``."""
    if scores.ndim < 2:
        raise ValueError(f"scores must be (N, K) or (B, K, ...), got shape {tuple(scores.shape)}")
    if scores.ndim > 2:
        scores = scores.movedim(1, -1).reshape(-1, scores.shape[1])
        labels = labels.reshape(-1)
    if labels.shape != scores.shape[:1]:
        raise ValueError(f"labels must have one entry per point ({scores.shape[0]}), got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    return scores, labels


def _drop_ignored(scores: torch.Tensor, labels: torch.Tensor, ignore_index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if ignore_index is not None:
        keep = labels != ignore_index
        scores, labels = scores[keep], labels[keep]
    num_classes = scores.shape[1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) (or ignore_index={ignore_index}), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return scores, labels


def lovasz_grad(fg_sorted: torch.Tensor) -> torch.Tensor:
    """Discrete derivative of the Jaccard loss along sorted errors.

    Args:
        fg_sorted: ``(N, K)`` 0/1 class-membership of the points, each column ordered by
            decreasing error of that class.

    Returns:
        ``(N, K)``: row ``i`` is ``Delta(first i + 1 points) - Delta(first i points)``, where
        ``Delta(S) = 1 - |F \\ S| / |F u S|`` with ``F`` the column's positives (so the first row
        is ``Delta`` of the first point alone).
    """
    positives = fg_sorted.sum(dim=0)
    intersection = positives - fg_sorted.cumsum(dim=0)  # positives not yet counted as errors
    union = positives + (1.0 - fg_sorted).cumsum(dim=0)  # positives and the negatives counted so far
    jaccard_loss = 1.0 - intersection / union
    return torch.cat([jaccard_loss[:1], jaccard_loss[1:] - jaccard_loss[:-1]], dim=0)


def lovasz_softmax(
    probs: torch.Tensor,
    labels: torch.Tensor,
    *,
    classes: str | Sequence[int] = "present",
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Lovász-softmax loss of class probabilities (see the module docstring).

    Args:
        probs: ``(N, K)`` class probabilities (softmax outputs), or ``(B, K, *S)`` dense maps.
        labels: ``(N,)`` (or ``(B, *S)``) integer class ids in ``[0, K)`` or ``ignore_index``.
        classes: ``"present"`` (mean over classes occurring in the non-ignored labels),
            ``"all"`` (every class) or a sequence of class ids.
        ignore_index: label value whose points are left out entirely.

    Returns:
        A scalar tensor; 0 (still attached to the graph) when every point is ignored.
    """
    probs, labels = _flatten(probs, labels)
    probs, labels = _drop_ignored(probs, labels, ignore_index)
    num_classes = probs.shape[1]
    if labels.numel() == 0:
        return probs.sum() * 0.0
    fg = F.one_hot(labels, num_classes).to(probs.dtype)
    errors = (fg - probs).abs()
    # one sort for all classes: each column independently by decreasing error
    errors_sorted, order = torch.sort(errors, dim=0, descending=True)
    per_class = (errors_sorted * lovasz_grad(fg.gather(0, order))).sum(dim=0)
    if classes == "present":
        return per_class[fg.sum(dim=0) > 0].mean()
    if classes == "all":
        return per_class.mean()
    if isinstance(classes, str):
        raise ValueError(f"classes must be 'present', 'all' or a sequence of class ids, got {classes!r}")
    ids = torch.as_tensor(list(classes), dtype=torch.long, device=probs.device)
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= num_classes:
        raise ValueError(f"classes must be a non-empty sequence of ids in [0, {num_classes}), got {list(classes)}")
    return per_class[ids].mean()


class CELovaszLoss(nn.Module):
    """``ce_weight * cross_entropy + lovasz_weight * lovasz_softmax`` on logits.

    Args:
        ce_weight: weight of the cross-entropy term.
        lovasz_weight: weight of the Lovász-softmax term.
        ignore_index: label value left out of both terms.
        class_weights: optional ``(K,)`` per-class weights of the cross-entropy term (as
            ``torch.nn.functional.cross_entropy``'s ``weight``: a weighted mean over points); the
            Lovász term averages classes with equal weight.
        classes: which classes the Lovász term averages (see :func:`lovasz_softmax`).

    Forward takes ``logits`` ``(N, K)`` (or ``(B, K, *S)``) and ``labels`` ``(N,)`` (or
    ``(B, *S)``) and returns a scalar. The softmax and both terms are computed in float32 at
    least, so the loss is safe under autocast.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        lovasz_weight: float = 1.0,
        ignore_index: int | None = None,
        class_weights: Sequence[float] | torch.Tensor | None = None,
        classes: str | Sequence[int] = "present",
    ) -> None:
        super().__init__()
        if ce_weight < 0 or lovasz_weight < 0 or ce_weight + lovasz_weight == 0:
            raise ValueError(f"ce_weight and lovasz_weight must be >= 0, not both 0; got {ce_weight}, {lovasz_weight}")
        if isinstance(classes, str) and classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present', 'all' or a sequence of class ids, got {classes!r}")
        self.ce_weight = float(ce_weight)
        self.lovasz_weight = float(lovasz_weight)
        self.ignore_index = ignore_index
        self.classes = classes
        weights = None
        if class_weights is not None:
            weights = torch.as_tensor(class_weights, dtype=torch.float32).reshape(-1)
            if (weights < 0).any():
                raise ValueError(f"class_weights must be >= 0, got {weights.tolist()}")
        # not persistent: the weights are configuration, not learnt state
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits, labels = _flatten(logits, labels)
        if self.class_weights is not None and self.class_weights.numel() != logits.shape[1]:
            raise ValueError(f"class_weights has {self.class_weights.numel()} entries for {logits.shape[1]} classes")
        logits, labels = _drop_ignored(logits, labels, self.ignore_index)
        if labels.numel() == 0:
            return logits.sum() * 0.0
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits.to(dtype)
        loss = logits.new_zeros(())
        if self.ce_weight:
            weight = None if self.class_weights is None else self.class_weights.to(dtype)
            loss = loss + self.ce_weight * F.cross_entropy(logits, labels, weight=weight)
        if self.lovasz_weight:
            loss = loss + self.lovasz_weight * lovasz_softmax(logits.softmax(dim=1), labels, classes=self.classes)
        return loss
