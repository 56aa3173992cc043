"""HungarianMaskLoss: matching against brute force, the loss against a plain reference, overfit."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from medvit.losses import HungarianMaskLoss
from medvit.nets.mask_transformer import MaskPrediction, MaskTransformerDecoder, semantic_scores

K = 5


def pair_cost(cls: torch.Tensor, mask: torch.Tensor, c: int, target: torch.Tensor) -> float:
    """One query (``(K+1,)``, ``(V,)``) against one target class and mask, written plainly."""
    p = mask.sigmoid()
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return float(-2 * cls.softmax(-1)[c] + 5 * F.binary_cross_entropy_with_logits(mask, target) + 5 * dice)


def brute_force(cls: torch.Tensor, masks: torch.Tensor, label: torch.Tensor) -> tuple[float, dict[int, int]]:
    """Minimum total cost and its matching {query: target class} over all one-to-one assignments."""
    classes = sorted({int(v) for v in label.flatten().tolist()})
    targets = [(label.flatten() == c).float() for c in classes]
    q, t = cls.shape[0], len(classes)
    cost = [[pair_cost(cls[i], masks[i], c, m) for c, m in zip(classes, targets)] for i in range(q)]
    best, match = float("inf"), {}
    if t <= q:  # each target to a distinct query
        for qs in itertools.permutations(range(q), t):
            total = sum(cost[qi][ti] for ti, qi in enumerate(qs))
            if total < best:
                best, match = total, {qi: classes[ti] for ti, qi in enumerate(qs)}
    else:  # each query to a distinct target
        for ts in itertools.permutations(range(t), q):
            total = sum(cost[qi][ti] for qi, ti in enumerate(ts))
            if total < best:
                best, match = total, {qi: classes[ti] for qi, ti in enumerate(ts)}
    return best, match


def random_label(g: torch.Generator, n_targets: int, shape=(4, 4, 4)) -> torch.Tensor:
    """An integer label ``shape`` with exactly ``n_targets`` of the ids 0..K-1 present."""
    classes = torch.randperm(K, generator=g)[:n_targets]
    idx = torch.randint(0, n_targets, shape, generator=g).flatten()
    idx[:n_targets] = torch.arange(n_targets)  # every chosen class has a voxel
    return classes[idx[torch.randperm(idx.numel(), generator=g)]].reshape(shape)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("q, t", [(1, 1), (3, 1), (3, 3), (4, 2), (5, 4), (5, 3), (2, 4)])
def test_matching_is_the_brute_force_minimum(seed, q, t):
    g = torch.Generator().manual_seed(seed * 100 + q * 10 + t)
    cls, masks = torch.randn(q, K + 1, generator=g) * 2, torch.randn(q, 64, generator=g) * 2
    label = random_label(g, t)
    loss = HungarianMaskLoss(K)
    classes, targets = loss.targets(label[None])
    rows, cols = loss.match(cls, masks, classes, targets)
    best, expect = brute_force(cls, masks, label)
    got = {int(r): int(classes[c]) for r, c in zip(rows, cols)}
    assert got == expect
    total = sum(pair_cost(cls[r], masks[r], c, (label.flatten() == c).float()) for r, c in got.items())
    assert total == pytest.approx(best, rel=1e-5)


def reference_loss(cls: torch.Tensor, masks: torch.Tensor, label: torch.Tensor, no_object: float) -> torch.Tensor:
    """The set loss written per pair: brute-force matching, weighted CE, mean BCE and Dice of pairs."""
    b, q = cls.shape[:2]
    ce_num, ce_den, bces, dices = 0.0, 0.0, [], []
    for i in range(b):
        _, match = brute_force(cls[i].detach(), masks[i].flatten(1).detach(), label[i, 0])
        for j in range(q):
            target = match.get(j, K)
            w = no_object if target == K else 1.0
            ce_num = ce_num + w * F.cross_entropy(cls[i, j][None], torch.tensor([target]))
            ce_den += w
            if j in match:
                m, y = masks[i, j].flatten(), (label[i, 0].flatten() == target).float()
                bces.append(F.binary_cross_entropy_with_logits(m, y))
                p = m.sigmoid()
                dices.append(1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1))
    return 2 * ce_num / ce_den + 5 * torch.stack(bces).mean() + 5 * torch.stack(dices).mean()


@pytest.mark.parametrize("no_object", [0.1, 1.0])
def test_loss_equals_the_reference_and_unmatched_queries_learn_no_object(no_object):
    g = torch.Generator().manual_seed(7)
    label = torch.stack([random_label(g, 2), random_label(g, 3)])[:, None].float()
    cls, masks = torch.randn(2, 4, K + 1, generator=g), torch.randn(2, 4, 4, 4, 4, generator=g)
    cls.requires_grad_(True)
    loss = HungarianMaskLoss(K, no_object_weight=no_object)
    value = loss(MaskPrediction(cls, masks, []), label)
    assert torch.allclose(value, reference_loss(cls, masks, label, no_object), rtol=1e-5)
    value.backward()
    _, match = brute_force(cls[0].detach(), masks[0].flatten(1), label[0, 0])
    unmatched = [j for j in range(4) if j not in match]
    assert len(unmatched) == 2
    # descending the loss raises "no object" for the unmatched queries, their target's class for the others
    assert all(cls.grad[0, j, K] < 0 for j in unmatched)
    assert all(cls.grad[0, j, c] < 0 for j, c in match.items())


def test_no_object_weight_scales_only_the_unmatched_queries():
    g = torch.Generator().manual_seed(3)
    label = random_label(g, 2)[None, None].float()
    cls, masks = torch.randn(1, 4, K + 1, generator=g), torch.randn(1, 4, 4, 4, 4, generator=g)
    _, match = brute_force(cls[0], masks[0].flatten(1), label[0, 0])
    j = next(j for j in range(4) if j not in match)
    moved = cls.clone()
    moved[0, j] += torch.randn(K + 1, generator=g)
    moved[0, j, K] -= 10.0  # the unmatched query far from "no object", but still the costlier match
    ignore = HungarianMaskLoss(K, no_object_weight=0.0)
    assert torch.allclose(ignore(MaskPrediction(cls, masks, []), label),
                          ignore(MaskPrediction(moved, masks, []), label))
    counted = HungarianMaskLoss(K, no_object_weight=0.1)
    assert counted(MaskPrediction(moved, masks, []), label) > counted(MaskPrediction(cls, masks, []), label)


def test_an_image_of_background_only_is_one_target_class_zero():
    g = torch.Generator().manual_seed(5)
    label = torch.zeros(1, 1, 4, 4, 4)
    cls, masks = torch.randn(1, 3, K + 1, generator=g), torch.randn(1, 3, 4, 4, 4, generator=g)
    loss = HungarianMaskLoss(K)
    classes, targets = loss.targets(label[0])
    assert classes.tolist() == [0] and targets.shape == (1, 64) and targets.all()
    value = loss(MaskPrediction(cls, masks, []), label)
    assert torch.isfinite(value)
    assert torch.allclose(value, reference_loss(cls, masks, label, 0.1), rtol=1e-5)


def test_aux_predictions_are_summed():
    g = torch.Generator().manual_seed(2)
    label = random_label(g, 3)[None, None]
    preds = [(torch.randn(1, 4, K + 1, generator=g), torch.randn(1, 4, 4, 4, 4, generator=g)) for _ in range(3)]
    loss = HungarianMaskLoss(K)
    each = [loss(MaskPrediction(c, m, []), label) for c, m in preds]
    assert torch.allclose(loss(MaskPrediction(*preds[-1], preds[:-1]), label), sum(each))


def test_coarse_masks_are_upsampled_to_the_label():
    g = torch.Generator().manual_seed(4)
    label = random_label(g, 2, shape=(8, 8, 8))[None, None]
    cls, coarse = torch.randn(1, 3, K + 1, generator=g), torch.randn(1, 3, 4, 4, 4, generator=g)
    fine = F.interpolate(coarse, size=(8, 8, 8), mode="trilinear", align_corners=False)
    loss = HungarianMaskLoss(K)
    assert torch.allclose(loss(MaskPrediction(cls, coarse, []), label), loss(MaskPrediction(cls, fine, []), label))


@pytest.mark.parametrize("bad, match", [(K, "label ids"), (-1, "label ids")])
def test_label_ids_out_of_range_are_refused(bad, match):
    label = torch.zeros(1, 1, 2, 2, 2)
    label[0, 0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=match):
        HungarianMaskLoss(K)(MaskPrediction(torch.zeros(1, 2, K + 1), torch.zeros(1, 2, 2, 2, 2), []), label)


def test_a_tiny_decoder_overfits_one_label():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., 2:6, 2:6, 1:4] = 1
    label[..., 4:8, 0:3, 5:8] = 3
    dec = MaskTransformerDecoder((8, 8), 8, 4, num_queries=6, hidden=24, heads=4, ffn=48, num_layers=2)
    feats = [torch.randn(1, 8, 2, 2, 2, generator=g), torch.randn(1, 8, 4, 4, 4, generator=g)]
    mask_features = torch.nn.Parameter(torch.randn(1, 8, 8, 8, 8, generator=g))
    opt = torch.optim.Adam([*dec.parameters(), mask_features], lr=1e-2)
    loss_fn = HungarianMaskLoss(4)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        value = loss_fn(dec(feats, mask_features), label)
        value.backward()
        opt.step()
        losses.append(value.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    dec.eval()
    with torch.no_grad():
        seg = semantic_scores(dec(feats, mask_features)).argmax(1)
    assert (seg == label[:, 0]).float().mean() > 0.95
