"""Training a mask-transformer net through ``train()``: the Hungarian loss in training, the
eval-mode semantic scores in validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from medvit.config import load_config
from medvit.losses import HungarianMaskLoss
from medvit.nets import NETS, build_net
from medvit.nets.mask_transformer import MaskPrediction, MaskTransformerDecoder, semantic_scores
from medvit.nets.registry import construct
from pipelines.volume.train import SegmentationLoss, train
from tests.helpers import tiny_config, write_tiny_set


class TinyMaskNet(nn.Module):
    """Convs at full, 1/2 and 1/4 resolution feeding a MaskTransformerDecoder (levels 1/4 then 1/2,
    mask features at full resolution): a MaskPrediction in training, semantic scores otherwise."""

    eval_outputs: list[tuple[int, ...]] = []  # shapes of the eval-mode outputs (a test sets a fresh list)

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.s1 = nn.Sequential(nn.Conv3d(in_channels, 8, 3, padding=1), nn.ReLU())
        self.s2 = nn.Sequential(nn.Conv3d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.s4 = nn.Sequential(nn.Conv3d(8, 8, 3, stride=2, padding=1), nn.ReLU())
        self.decoder = MaskTransformerDecoder((8, 8), 8, out_channels, num_queries=6, hidden=24, heads=4, ffn=48,
                                              num_layers=2)

    def forward(self, x: torch.Tensor):
        full = self.s1(x)
        half = self.s2(full)
        pred = self.decoder([self.s4(half), half], full)
        if self.training:
            return pred
        scores = semantic_scores(pred)
        self.eval_outputs.append(tuple(scores.shape))
        return scores


def tiny_mask(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options) -> nn.Module:
    fixed = {"in_channels": in_channels, "out_channels": out_channels}
    return construct(TinyMaskNet, "tiny_mask", options, fixed=fixed)


@pytest.fixture
def registered(monkeypatch):
    """``tiny_mask`` in the registry for this test only."""
    monkeypatch.setitem(NETS._builders, "tiny_mask", tiny_mask)  # removed again after the test


def test_segmentation_loss_sends_a_mask_prediction_to_the_hungarian_loss():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (1, 1, 4, 4, 4), generator=g).float()
    pred = MaskPrediction(torch.randn(1, 4, 4, generator=g), torch.randn(1, 4, 4, 4, 4, generator=g),
                          [(torch.randn(1, 4, 4, generator=g), torch.randn(1, 4, 4, 4, 4, generator=g))])
    assert torch.allclose(SegmentationLoss(3)(pred, label), HungarianMaskLoss(3)(pred, label))
    with pytest.raises(RuntimeError, match="num_classes"):
        SegmentationLoss()(pred, label)


def test_a_mask_transformer_net_trains_and_validates_on_semantic_scores(registered, tmp_path, monkeypatch):
    calls = []
    hungarian_forward = HungarianMaskLoss.forward

    def counting(self, pred, label):
        calls.append((self.num_classes, len(pred.aux)))
        return hungarian_forward(self, pred, label)

    monkeypatch.setattr(HungarianMaskLoss, "forward", counting)
    data = write_tiny_set(tmp_path / "data", n_train=4, n_val=1, n_test=0)
    path = tiny_config(tmp_path, data, epochs=8, lr=1e-2, warmup_epochs=0, val_every=8)
    raw = yaml.safe_load(path.read_text())
    raw["model"].update(name="tiny_mask", options={})
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    k = int(cfg.model.out_channels)
    net = build_net(cfg.model).eval()
    assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, k, 32, 32, 32)
    monkeypatch.setattr(TinyMaskNet, "eval_outputs", [])
    res = train(cfg, progress=False)
    assert calls and set(calls) == {(k, 2)}  # every batch: the Hungarian loss, with both aux predictions
    log = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert losses[-1] < 0.8 * losses[0], losses
    assert 0 <= log[-1]["val_mean_dice"] <= 1
    # validation ran the eval-mode net: K semantic scores per window
    assert TinyMaskNet.eval_outputs and {o[1:] for o in TinyMaskNet.eval_outputs} == {(k, 32, 32, 32)}
    assert res.best_epoch == 8

