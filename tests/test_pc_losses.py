"""Lovász-softmax against the Lovász extension computed from its definition; CE+Lovász; IoU metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pointcloud.losses import CELovaszLoss, lovasz_softmax
from pointcloud.metrics import SegMetric, confusion_matrix, iou_from_confusion, miou


def _jaccard_set_loss(errors: np.ndarray, fg: np.ndarray) -> float:
    """Delta(M) = |M| / |F u M| for the set M of mispredicted points (0 for the empty set)."""
    union = np.count_nonzero(fg | errors)
    return np.count_nonzero(errors) / union if union else 0.0


def _lovasz_extension(m: np.ndarray, fg: np.ndarray) -> float:
    """The Lovász extension by its threshold form: integral over t in (0, 1] of Delta({i: m_i >= t})."""
    levels = np.unique(m)[::-1]
    total = 0.0
    for k, v in enumerate(levels):
        below = levels[k + 1] if k + 1 < len(levels) else 0.0
        total += (v - below) * _jaccard_set_loss(m >= v, fg)
    return total


def _reference(probs: np.ndarray, labels: np.ndarray, classes) -> float:
    k = probs.shape[1]
    ids = np.unique(labels) if classes == "present" else (range(k) if classes == "all" else classes)
    losses = []
    for c in ids:
        fg = labels == c
        losses.append(_lovasz_extension(np.abs(fg.astype(np.float64) - probs[:, c]), fg))
    return float(np.mean(losses))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("classes", ["present", "all", [0, 2]])
def test_lovasz_matches_extension_definition(seed, classes):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(13, 4, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 3, (13,), generator=g)  # class 3 never occurs
    probs = logits.softmax(1)
    got = lovasz_softmax(probs, labels, classes=classes)
    want = _reference(probs.numpy(), labels.numpy(), classes)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_saturated_probabilities_give_one_minus_iou():
    labels = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    probs = F.one_hot(pred, 4).double()
    # IoU by hand: class 0: 1/3, class 1: 2/3, class 2: 0; class 3 absent from both
    assert lovasz_softmax(probs, labels).item() == pytest.approx((2 / 3 + 1 / 3 + 1) / 3)
    # "all": class 3 is absent from both and costs its largest probability, 0 here
    assert lovasz_softmax(probs, labels, classes="all").item() == pytest.approx((2 / 3 + 1 / 3 + 1 + 0) / 4)
    cm = confusion_matrix(pred.numpy(), labels.numpy(), 4)
    iou = iou_from_confusion(cm)[:3]
    assert lovasz_softmax(probs, labels).item() == pytest.approx(float(np.mean(1 - iou)))
    # a class predicted but absent from the labels costs 1 in "all" mode
    probs_fp = F.one_hot(torch.tensor([0, 0, 1, 1, 3]), 4).double()
    assert lovasz_softmax(probs_fp, labels, classes=[3]).item() == pytest.approx(1.0)


def test_perfect_prediction_is_zero():
    labels = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    assert lovasz_softmax(F.one_hot(labels, 3).float(), labels).item() == 0.0
    loss = CELovaszLoss()(50.0 * F.one_hot(labels, 3).float(), labels)
    assert 0.0 <= loss.item() < 1e-6


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 1, 1, 0, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda x: lovasz_softmax(x.softmax(1), labels), (logits,))
    weighted = CELovaszLoss(ce_weight=0.5, lovasz_weight=2.0, class_weights=[1.0, 2.0, 0.5])
    assert torch.autograd.gradcheck(lambda x: weighted(x, labels), (logits,))


def test_ignore_index_entries_change_nothing():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (20,), generator=g)
    labels[::3] = 255
    keep = labels != 255
    loss_fn = CELovaszLoss(ignore_index=255)
    loss = loss_fn(logits, labels)
    loss.backward()
    ref = CELovaszLoss()(logits.detach()[keep], labels[keep])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.all(logits.grad[~keep] == 0) and torch.any(logits.grad[keep] != 0)
    changed = logits.detach().clone()
    changed[~keep] = torch.randn(int((~keep).sum()), 4, generator=g) * 10
    assert loss_fn(changed, labels).item() == pytest.approx(loss.item(), abs=1e-6)
    assert lovasz_softmax(logits.softmax(1), labels, ignore_index=255).item() == pytest.approx(
        lovasz_softmax(logits.softmax(1)[keep], labels[keep]).item(), abs=1e-6)
    all_ignored = loss_fn(logits, torch.full((20,), 255))
    assert all_ignored.item() == 0.0 and all_ignored.requires_grad


def test_weighted_ce_term_and_dense_input():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, 5, generator=g)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    w = torch.tensor([0.2, 1.0, 3.0])
    flat_logits, flat_labels = logits.movedim(1, -1).reshape(-1, 3), labels.reshape(-1)
    ce_only = CELovaszLoss(lovasz_weight=0.0, class_weights=w)(logits, labels)
    nll = -flat_logits.log_softmax(1).gather(1, flat_labels[:, None])[:, 0]
    assert ce_only.item() == pytest.approx((w[flat_labels] * nll).sum().item() / w[flat_labels].sum().item(), rel=1e-5)
    both = CELovaszLoss(ce_weight=0.5, lovasz_weight=2.0)(logits, labels)
    want = 0.5 * F.cross_entropy(flat_logits, flat_labels) + 2.0 * lovasz_softmax(flat_logits.softmax(1), flat_labels)
    assert both.item() == pytest.approx(want.item(), rel=1e-6)


def test_descent_on_lovasz_raises_iou():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (300,), generator=g)
    logits = torch.randn(300, 4, generator=g).requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.1)
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = lovasz_softmax(logits.softmax(1), labels)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    cm = confusion_matrix(logits.argmax(1), labels, 4)
    assert first > 0.7 and loss.item() < 0.05 and miou(cm) > 0.95


def test_loss_bad_inputs():
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        lovasz_softmax(logits.softmax(1), torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="one entry per point"):
        CELovaszLoss()(logits, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="classes must be"):
        CELovaszLoss(classes="some")
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        CELovaszLoss(class_weights=[1.0, 2.0])(logits, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="integer"):
        lovasz_softmax(logits, torch.zeros(4))


# ---------------------------------------------------------------- metrics


def test_confusion_matrix_by_hand_numpy_and_torch():
    pred = [0, 1, 1, 2, 2, 0]
    target = [0, 1, 2, 2, 0, 255]
    want = np.array([[1, 0, 1], [0, 1, 0], [0, 1, 1]])
    np.testing.assert_array_equal(confusion_matrix(np.array(pred), np.array(target), 3, ignore_index=255), want)
    cm_t = confusion_matrix(torch.tensor(pred, dtype=torch.int32), torch.tensor(target), 3, ignore_index=255)
    assert cm_t.dtype == np.int64
    np.testing.assert_array_equal(cm_t, want)
    np.testing.assert_allclose(iou_from_confusion(want), [1 / 2, 1 / 2, 1 / 3])


def test_confusion_matrix_matches_loop_on_random_scan():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 6, (2, 5000))
    pred = np.where(rng.random((2, 5000)) < 0.7, target, rng.integers(0, 6, (2, 5000)))
    want = np.zeros((6, 6), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        want[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(pred, target, 6), want)


def test_iou_nan_and_mean_conventions():
    # class 3 is absent from target and prediction: NaN, left out by "union" and "target", 0 in "all"
    cm = confusion_matrix(np.array([0, 1, 1, 2, 2]), np.array([0, 1, 2, 2, 0]), 4)
    iou = iou_from_confusion(cm)
    np.testing.assert_allclose(iou[:3], [1 / 2, 1 / 2, 1 / 3])
    assert np.isnan(iou[3])
    assert miou(cm) == pytest.approx(4 / 9)
    assert miou(cm, classes="target") == pytest.approx(4 / 9)
    assert miou(cm, classes="all") == pytest.approx((1 / 2 + 1 / 2 + 1 / 3) / 4)
    # class 2 predicted but absent from the target: IoU 0, counted by "union", not by "target"
    cm = confusion_matrix(np.array([0, 2, 1]), np.array([0, 0, 1]), 3)
    assert miou(cm) == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert miou(cm, classes="target") == pytest.approx((1 / 2 + 1) / 2)
    assert np.isnan(miou(np.zeros((3, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match="classes must be one of"):
        miou(cm, classes="present")


def test_ignored_class_id_like_semantickitti():
    # class 0 is "unlabelled": its target points drop out; predicting 0 at a car point is a false negative
    target = np.array([0, 1, 1, 2])
    pred = np.array([1, 1, 0, 2])
    cm = confusion_matrix(pred, target, 3, ignore_index=0)
    np.testing.assert_array_equal(cm, [[0, 0, 0], [1, 1, 0], [0, 0, 1]])
    assert miou(cm, ignore_index=0, classes="all") == pytest.approx((1 / 2 + 1) / 2)


def test_seg_metric_accumulates_scans():
    rng = np.random.default_rng(1)
    scans = [(rng.integers(0, 4, n), rng.integers(0, 4, n)) for n in (50, 80, 30)]
    metric = SegMetric(4, names=["ground", "building", "car", "pole"])
    for pred, target in scans:
        metric.update(torch.from_numpy(pred), torch.from_numpy(target))
    pred = np.concatenate([s[0] for s in scans])
    target = np.concatenate([s[1] for s in scans])
    scores = metric.compute()
    np.testing.assert_array_equal(scores.confusion, confusion_matrix(pred, target, 4))
    assert scores.miou == pytest.approx(miou(scores.confusion))
    assert scores.accuracy == pytest.approx(float(np.mean(pred == target)))
    report = scores.to_dict()
    assert set(report["iou"]) == {"ground", "building", "car", "pole"} and report["points"] == 160
    metric.reset()
    metric.update(np.array([0, 0]), np.array([0, 0]))
    report = metric.compute().to_dict()
    assert report["miou"] == 1.0 and report["iou"]["car"] is None and report["evaluated"] == ["ground"]


def test_metric_bad_inputs():
    with pytest.raises(ValueError, match=r"pred has class ids in \[0, 3\], outside \[0, 3\)"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="ignore_index=255"):
        confusion_matrix(np.array([0, 1]), np.array([0, 254]), 3, ignore_index=255)
    with pytest.raises(ValueError, match="integer class ids"):
        confusion_matrix(np.array([0.0, 1.0]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="same number of elements"):
        confusion_matrix(np.array([0, 1, 2]), np.array([0, 1]), 3)
