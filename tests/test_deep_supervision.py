"""Training with deep supervision: a net returning (full, half, quarter) logits in training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from monai.losses import DeepSupervisionLoss, DiceCELoss
from torch import nn

from medvit.config import ModelConfig, load_config
from medvit.core.errors import ConfigError
from medvit.nets import NETS, build_net
from medvit.nets.registry import construct
from pipelines.volume.train import SegmentationLoss, train
from tests.helpers import tiny_config, write_tiny_set


class TinyDeepNet(nn.Module):
    """One conv layer and a 1x1x1 head per scale; (full, half, quarter) in training with
    ``deep_supervision``, the full-resolution logits otherwise (as D-Former's contract)."""

    def __init__(self, in_channels: int, out_channels: int, deep_supervision: bool = False):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.body = nn.Sequential(nn.Conv3d(in_channels, 8, 3, padding=1), nn.ReLU())
        self.heads = nn.ModuleList(nn.Conv3d(8, out_channels, 1) for _ in range(3 if deep_supervision else 1))

    def forward(self, x: torch.Tensor):
        f = self.body(x)
        full = self.heads[0](f)
        if not (self.training and self.deep_supervision):
            return full
        return full, self.heads[1](nn.functional.avg_pool3d(f, 2)), self.heads[2](nn.functional.avg_pool3d(f, 4))


def tiny_deep(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options) -> nn.Module:
    return construct(TinyDeepNet, "tiny_deep", options, fixed={"in_channels": in_channels, "out_channels": out_channels})


@pytest.fixture
def registered(monkeypatch):
    """``tiny_deep`` in the registry for this test only."""
    monkeypatch.setitem(NETS._builders, "tiny_deep", tiny_deep)  # removed again after the test


def test_loss_is_the_weighted_sum_of_dicece_at_each_scale():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=g).float()
    full, half, quarter = (torch.randn(2, 3, s, s, s, generator=g) for s in (16, 8, 4))
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
    # nearest-exact keeps the voxel at the centre of each 2x2x2 (4x4x4) block: index 2i+1 (4i+2)
    expect = (dice_ce(full, label) + 0.5 * dice_ce(half, label[:, :, 1::2, 1::2, 1::2])
              + 0.25 * dice_ce(quarter, label[:, :, 2::4, 2::4, 2::4]))
    loss = SegmentationLoss()
    assert torch.allclose(loss((full, half, quarter), label), expect, rtol=1e-6)
    assert torch.allclose(loss([full, half, quarter], label), expect, rtol=1e-6)
    assert torch.allclose(loss(full, label), dice_ce(full, label))  # one output: plain DiceCE
    assert DeepSupervisionLoss(dice_ce).get_weights(3) == [1.0, 0.5, 0.25]


@pytest.mark.parametrize("order", [(8, 16, 4), (16, 4, 8)])
def test_outputs_out_of_order_are_a_bug_not_a_silent_weighting(order):
    label = torch.zeros(1, 1, 16, 16, 16)
    outs = tuple(torch.zeros(1, 2, s, s, s) for s in order)
    with pytest.raises(RuntimeError, match="full-resolution output first|fine to coarse"):
        SegmentationLoss()(outs, label)


@pytest.mark.parametrize("name, roi", [("unetr", 32), ("swin_unetr", 64), ("unet", 32)])
def test_nets_without_deep_supervision_refuse_the_option(name, roi):
    cfg = ModelConfig(name=name, in_channels=1, out_channels=2, roi_size=(roi,) * 3, options={"deep_supervision": True})
    with pytest.raises(ConfigError, match=r"^model\.options\.deep_supervision: .*takes no option 'deep_supervision'") as e:
        build_net(cfg)
    assert "\n" not in str(e.value)


def test_a_deep_supervision_net_trains_and_validates_on_full_resolution(registered, tmp_path, monkeypatch):
    levels = []
    ds_forward = DeepSupervisionLoss.forward

    def counting(self, input, target):
        levels.append(len(input))
        return ds_forward(self, input, target)

    monkeypatch.setattr(DeepSupervisionLoss, "forward", counting)
    data = write_tiny_set(tmp_path / "data", n_train=4, n_val=1, n_test=0)
    path = tiny_config(tmp_path, data, epochs=8, lr=2e-2, warmup_epochs=0, val_every=8)
    raw = yaml.safe_load(path.read_text())
    raw["model"].update(name="tiny_deep", options={"deep_supervision": True})
    path.write_text(yaml.safe_dump(raw))
    cfg = load_config(path)
    net = build_net(cfg.model)
    net.train()
    assert len(net(torch.zeros(1, 1, 32, 32, 32))) == 3
    res = train(cfg, progress=False)
    assert levels and set(levels) == {3}  # every training batch went through the weighted loss
    log = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log]
    assert losses[-1] < 0.8 * losses[0], losses
    assert 0 <= log[-1]["val_mean_dice"] <= 1  # validation ran the eval-mode net through the engine
    assert res.best_epoch == 8
