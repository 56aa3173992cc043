"""Hungarian matching loss for mask-classification predictions (Mask2Former's set loss, 3D).

Per image, the targets are the classes present in the label, each one binary mask (background,
id 0, is a class like the others). Queries are matched one-to-one to targets by
:func:`scipy.optimize.linear_sum_assignment` on

    cost[q, t] = class_weight · (−softmax(class_q)[c_t]) + mask_weight · BCE(mask_q, m_t)
                 + dice_weight · Dice(mask_q, m_t)

(BCE the mean over voxels, Dice ``1 − (2 Σpm + 1) / (Σp + Σm + 1)`` with ``p = sigmoid``; the
same weights as the loss, as Mask2Former's matcher). The loss is cross-entropy over all queries,
an unmatched query's target "no object" (class K) weighted ``no_object_weight``, times
``class_weight``; plus the matched pairs' mean BCE times ``mask_weight`` and mean Dice times
``dice_weight``. It is computed for the final prediction and for every aux one, and summed.

Masks are compared on the label's grid: mask logits on a coarser grid are upsampled by trilinear
interpolation, not the label downsampled by nearest. A structure thinner than the mask grid's
step would vanish from a downsampled label and never be asked for, and inference upsamples the
scores to the input size too, so the loss measures what the segmentation shows. (Mask2Former
samples points instead to save memory; a 3D patch of Q masks fits here.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from medvit.nets.mask_transformer import MaskPrediction

__all__ = ["HungarianMaskLoss"]


def _dice_loss(prob: Tensor, target: Tensor) -> Tensor:
    """Dice loss of each row pair: ``prob``, ``target`` ``(N, V)`` → ``(N,)``."""
    return 1 - (2 * (prob * target).sum(-1) + 1) / (prob.sum(-1) + target.sum(-1) + 1)


class HungarianMaskLoss(nn.Module):
    """Set loss of a :class:`MaskPrediction` against an integer label ``(B, 1, D', H', W')``.

    ``num_classes`` = K, label ids ``0..K-1``; a label id outside that range, or a prediction
    with another number of classes than K + 1, is a ValueError. Returns a scalar tensor.
    """

    def __init__(self, num_classes: int, *, class_weight: float = 2.0, mask_weight: float = 5.0,
                 dice_weight: float = 5.0, no_object_weight: float = 0.1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        weight = torch.ones(num_classes + 1)
        weight[-1] = no_object_weight
        self.register_buffer("ce_weight", weight, persistent=False)

    def targets(self, label: Tensor) -> tuple[Tensor, Tensor]:
        """The classes present in one label ``(1, D, H, W)`` and their binary masks ``(T, D·H·W)``."""
        flat = label.reshape(-1).long()
        classes = torch.unique(flat)
        return classes, (flat[None] == classes[:, None]).float()

    @torch.no_grad()
    def cost(self, class_logits: Tensor, mask_logits: Tensor, classes: Tensor, masks: Tensor) -> Tensor:
        """Matching cost ``(Q, T)`` of one image's queries (``(Q, K+1)``, ``(Q, V)``) against its
        targets (``(T,)`` class ids, ``(T, V)`` binary masks)."""
        x = mask_logits.float()
        prob = class_logits.float().softmax(-1)[:, classes]
        # BCE(x, y) = softplus(x) - x*y, averaged over the voxels for every pair at once
        bce = (F.softplus(x).sum(-1, keepdim=True) - x @ masks.T) / x.shape[-1]
        p = x.sigmoid()
        dice = 1 - (2 * p @ masks.T + 1) / (p.sum(-1, keepdim=True) + masks.sum(-1)[None] + 1)
        return -self.class_weight * prob + self.mask_weight * bce + self.dice_weight * dice

    def match(self, class_logits: Tensor, mask_logits: Tensor, classes: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Indices ``(queries, targets)`` of the minimum-cost one-to-one matching of one image."""
        c = self.cost(class_logits, mask_logits, classes, masks).cpu().numpy()
        rows, cols = linear_sum_assignment(np.nan_to_num(c, nan=1e9, posinf=1e9, neginf=-1e9))
        dev = class_logits.device
        return torch.as_tensor(rows, dtype=torch.long, device=dev), torch.as_tensor(cols, dtype=torch.long, device=dev)

    def _one(self, class_logits: Tensor, mask_logits: Tensor, label: Tensor) -> Tensor:
        b, q, k1 = class_logits.shape
        if k1 != self.num_classes + 1:
            raise ValueError(f"the prediction has {k1} classes, expected num_classes + 1 = {self.num_classes + 1}")
        if mask_logits.shape[2:] != label.shape[2:]:
            mask_logits = F.interpolate(mask_logits, size=label.shape[2:], mode="trilinear", align_corners=False)
        mask_logits = mask_logits.float().flatten(2)
        cls_target = torch.full((b, q), self.num_classes, dtype=torch.long, device=class_logits.device)
        pred_masks, true_masks = [], []
        for i in range(b):
            classes, masks = self.targets(label[i])
            rows, cols = self.match(class_logits[i], mask_logits[i], classes, masks)
            cls_target[i, rows] = classes[cols]
            pred_masks.append(mask_logits[i, rows])
            true_masks.append(masks[cols])
        ce = F.cross_entropy(class_logits.float().reshape(b * q, k1), cls_target.reshape(-1),
                             weight=self.ce_weight.to(class_logits.device))
        x, y = torch.cat(pred_masks), torch.cat(true_masks)
        bce = F.binary_cross_entropy_with_logits(x, y, reduction="none").mean(-1).mean()
        dice = _dice_loss(x.sigmoid(), y).mean()
        return self.class_weight * ce + self.mask_weight * bce + self.dice_weight * dice

    def forward(self, pred: MaskPrediction, label: Tensor) -> Tensor:
        if label.dim() != 5 or label.shape[1] != 1:
            raise ValueError(f"label must be (B, 1, D, H, W), got {tuple(label.shape)}")
        lab = (label.round() if label.is_floating_point() else label).long()  # loaders give float labels
        if lab.min() < 0 or lab.max() >= self.num_classes:
            raise ValueError(f"label ids must be in 0..{self.num_classes - 1}, "
                             f"got {lab.min().item()}..{lab.max().item()}")
        return sum((self._one(c, m, lab) for c, m in [*pred.aux, (pred.class_logits, pred.mask_logits)]),
                   start=torch.zeros((), device=pred.class_logits.device))
