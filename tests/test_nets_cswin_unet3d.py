"""CSwin UNet (``cswin_unet3d``): shapes over odd windows, the attention each stage runs, deep
supervision, the encoder protocol, training, checkpoints and config-time errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medvit.attention import CrossStripeAttention
from medvit.checkpoint import load_checkpoint
from medvit.config import ModelConfig, load_config, parse_config
from medvit.core.errors import CheckpointError, ConfigError
from medvit.nets import build_net
from medvit.nets.cswin_unet3d import CSwinUNet3D, FullAttentionLePE, stage_grids
from tests.helpers import assert_checkpoint_round_trip, fit_losses, train_and_segment

TINY = {"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 6], "feature_size": 8, "stem_stride": 1}


def tiny(**kw) -> CSwinUNet3D:
    return CSwinUNet3D(in_channels=kw.pop("in_channels", 1), out_channels=kw.pop("out_channels", 3), **{**TINY, **kw})


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("roi", "stride", "norm"),
    [((10, 36, 20), (2, 4, 4), "instance"),  # stage grids 5x9x5 .. 1x2x1: odd on every axis, depth included
     ((8, 36, 16), 4, "instance"),
     ((6, 20, 12), (2, 4, 4), "batch"),  # a 1x1x1 bottleneck (instance norm refuses one voxel)
     ((3, 5, 7), 1, "batch")],
)
def test_any_multiple_of_the_stem_stride_works(roi, stride, norm):
    torch.manual_seed(0)
    net = tiny(in_channels=3, out_channels=4, stem_stride=stride, norm_name=norm, deep_supervision=True)
    x = torch.randn(2, 3, *roi)
    full, half, quarter = net.train()(x)
    assert full.shape == (2, 4, *roi)
    assert half.shape == (2, 4, *(math.ceil(r / 2) for r in roi))
    assert quarter.shape == (2, 4, *(math.ceil(r / 4) for r in roi))
    (full.mean() + half.mean() + quarter.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with torch.no_grad():
        y = net.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4, *roi) and torch.isfinite(y).all()


def test_deep_supervision_only_in_training_and_heads_only_when_asked():
    x = torch.randn(1, 1, 8, 16, 16)
    plain = tiny(deep_supervision=False)
    assert plain.aux_heads is None and isinstance(plain.train()(x), torch.Tensor)
    net = tiny(deep_supervision=True)
    assert len(net.train()(x)) == 3
    with torch.no_grad():
        assert isinstance(net.eval()(x), torch.Tensor)
    assert n_params(net) > n_params(plain)


def test_input_not_a_multiple_of_the_stem_stride_is_refused():
    with pytest.raises(ValueError, match=r"multiples of \(4, 4, 4\), got \(1, 1, 8, 16, 18\)"):
        tiny(stem_stride=4)(torch.zeros(1, 1, 8, 16, 18))


def test_stages_run_stripes_of_their_width_and_the_last_full_attention():
    net = tiny(stripe_widths=[1, 3, 2, "full"], depths=[1, 2, 1, 2])
    for i, (width, depth) in enumerate(zip([1, 3, 2], [1, 2, 1])):
        assert len(net.stages[i]) == depth
        for blk in net.stages[i]:
            assert isinstance(blk.attn, CrossStripeAttention) and blk.attn.width == (width,) * 3
            assert blk.attn.lepe is not None
    assert len(net.stages[3]) == 2 and all(type(b.attn) is FullAttentionLePE for b in net.stages[3])
    # "full" may sit at any stage, and an int at the last
    other = tiny(stripe_widths=["full", 2, 2, 1])
    assert type(other.stages[0][0].attn) is FullAttentionLePE
    assert isinstance(other.stages[3][0].attn, CrossStripeAttention)


def test_stage_grids():
    assert stage_grids((96, 96, 96), 4) == [(24, 24, 24), (12, 12, 12), (6, 6, 6), (3, 3, 3)]
    assert stage_grids((10, 36, 20), (2, 4, 4)) == [(5, 9, 5), (3, 5, 3), (2, 3, 2), (1, 2, 1)]


def test_last_stage_attention_is_full_attention_plus_lepe_on_v():
    torch.manual_seed(0)
    attn = FullAttentionLePE(12, 3).eval()
    x = torch.randn(2, 3, 4, 5, 12)
    b, n, c = 2, 3 * 4 * 5, 12
    with torch.no_grad():
        ours = attn(x)
        q, k, v = attn.qkv(x).reshape(b, n, 3, 3, 4).permute(2, 0, 3, 1, 4)  # (B, heads, tokens, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        v_img = v.transpose(1, 2).reshape(b, 3, 4, 5, c).permute(0, 4, 1, 2, 3)
        pe = attn.lepe(v_img).permute(0, 2, 3, 4, 1).reshape(b, n, c)
        ref = attn.proj(out + pe).reshape(b, 3, 4, 5, c)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_encode_returns_the_bottleneck_and_reads_only_the_encoder():
    torch.manual_seed(0)
    net = tiny(in_channels=3, stem_stride=(2, 4, 4)).eval()
    x = torch.randn(2, 3, 10, 36, 20)
    z = net.encode(x)
    assert z.shape == (2, 8 * TINY["embed_dim"], 1, 2, 1)  # stage 3's grid, 8x the stem's channels
    keys = list(net.state_dict())
    enc = [k for k in keys if k.startswith(CSwinUNet3D.encoder_prefixes)]
    assert enc and len(enc) < len(keys)
    assert {k.split(".")[0] for k in enc} == set(CSwinUNet3D.encoder_prefixes)
    # every encoder weight moves the features; no decoder weight does
    z.pow(2).sum().backward()
    named = dict(net.named_parameters())
    for k, p in named.items():
        used = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert used == k.startswith(CSwinUNet3D.encoder_prefixes), k




@pytest.mark.parametrize("deep_supervision", [False, True])
def test_loss_falls_in_a_few_steps(deep_supervision):
    torch.manual_seed(0)
    net = tiny(deep_supervision=deep_supervision).train()
    losses = fit_losses(net, (8, 16, 16), lr=3e-3, steps=25, deep_supervision=deep_supervision)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def _config(roi=(8, 16, 16), **options):
    return parse_config({
        "labels": {0: "background", 1: "liver", 2: "spleen"},
        "model": {"name": "cswin_unet3d", "in_channels": 3, "roi_size": list(roi),
                  "options": {**TINY, **options}},
    })


def test_checkpoint_round_trip(tmp_path):
    assert_checkpoint_round_trip(_config(deep_supervision=True), CSwinUNet3D, (1, 3, 8, 16, 16), tmp_path)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    torch.manual_seed(0)
    net = build_net(_config().model)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "model.pt", config=_config(embed_dim=24))
    assert "key 'stem.conv.weight' has shape (12, 3, 7, 7, 7) in the checkpoint but (24, 3, 7, 7, 7)" in str(e.value)
    assert "\n" not in str(e.value)


def test_builder_passes_options_and_channels():
    net = build_net(ModelConfig(name="cswin_unet3d", in_channels=3, out_channels=5, roi_size=(8, 64, 32),
                                options={**TINY, "stem_stride": [2, 4, 4], "mlp_ratio": 2.0, "qkv_bias": False,
                                         "stripe_widths": [2, 1, 1, "full"]}))
    assert isinstance(net, CSwinUNet3D)
    assert net.stem.conv.in_channels == 3 and net.stem.conv.stride == (2, 4, 4)
    assert net.stem.conv.kernel_size == (7, 7, 7) and net.merges[0].conv.kernel_size == (3, 3, 3)
    assert net.head.conv.conv.out_channels == 5
    blk = net.stages[0][0]
    assert blk.attn.width == (2, 2, 2) and blk.attn.qkv.bias is None and blk.mlp.fc1.out_features == 24
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 3, 8, 64, 32)).shape == (1, 5, 8, 64, 32)


def test_defaults():
    with torch.device("meta"):
        net = build_net(ModelConfig(name="cswin_unet3d", in_channels=3, out_channels=2, roi_size=(96, 96, 96)))
    assert net.stem_stride == (4, 4, 4) and net.stripe_widths == [1, 2, 4, "full"]
    assert [len(s) for s in net.stages] == [2, 2, 6, 2]
    assert [s[0].attn.num_heads for s in net.stages] == [3, 6, 12, 24]
    assert [s[0].attn.dim for s in net.stages] == [48, 96, 192, 384]


def test_shipped_picai_config_builds_for_three_channels():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "picai_cswin_unet3d.yaml")
    assert cfg.model.name == "cswin_unet3d" and cfg.model.in_channels == 3 and cfg.model.out_channels == 2
    with torch.device("meta"):
        net = build_net(cfg.model)
        y = net.eval()(torch.zeros(1, 3, *cfg.model.roi_size))
    assert tuple(y.shape) == (1, 2, *cfg.model.roi_size)


@pytest.mark.parametrize(
    ("options", "roi", "expected"),
    [
        ({"stem_stride": 4}, (8, 16, 18), "model.roi_size: cswin_unet3d needs each size a multiple of stem_stride [4, 4, 4], "
                          "got [8, 16, 18]"),
        ({"stem_stride": [2, 4, 4]}, (6, 16, 18), "model.roi_size: cswin_unet3d needs each size a multiple of "
                                                  "stem_stride [2, 4, 4]"),
        ({}, (16, 16, 16), "model.roi_size: cswin_unet3d with instance norm needs a bottleneck of more than one voxel"),
        ({"num_heads": [3, 4, 3, 6]}, (32, 32, 32), "model.options.num_heads: cswin_unet3d: num_heads[1] = 4 is not a "
                                                    "multiple of 3"),
        ({"num_heads": [9, 3, 3, 3]}, (32, 32, 32), "model.options.num_heads: cswin_unet3d: num_heads[0] = 9 does not "
                                                    "divide the 12 channels of stage 0"),
        ({"embed_dim": 10}, (32, 32, 32), "model.options.num_heads: cswin_unet3d: num_heads[0] = 3 does not divide "
                                          "the 10 channels"),
        ({"stripe_widths": [1, 0, 2, "full"]}, (32, 32, 32), "model.options.stripe_widths: cswin_unet3d needs sizes "
                                                             "of at least 1"),
        ({"stripe_widths": [1, -2, 2, "full"]}, (32, 32, 32), "model.options.stripe_widths: cswin_unet3d needs sizes "
                                                              "of at least 1"),
        ({"stripe_widths": [1, 2, 2, "all"]}, (32, 32, 32), "model.options.stripe_widths: cswin_unet3d: stripe_widths "
                                                            "needs 4 entries (one per stage), each an integer >= 1 or "
                                                            "'full', got [1, 2, 2, 'all']"),
        ({"stripe_widths": [1, 2, "full"]}, (32, 32, 32), "model.options.stripe_widths: cswin_unet3d: stripe_widths "
                                                          "needs 4 entries"),
        ({"stripe_widths": [1, 2.5, 2, "full"]}, (32, 32, 32), "model.options.stripe_widths: expected a list of int "
                                                               "or str"),
        ({"depths": [2, 2, 2]}, (32, 32, 32), "model.options.depths: cswin_unet3d: depths needs 4 positive integers "
                                              "(one per stage), got [2, 2, 2]"),
        ({"num_heads": [3, 3, 3, 3, 3]}, (32, 32, 32), "model.options.num_heads: cswin_unet3d: num_heads needs 4 "
                                                       "positive integers"),
        ({"depths": [1, 0, 1, 1]}, (32, 32, 32), "model.options.depths: cswin_unet3d needs sizes of at least 1"),
        ({"embed_dim": 0}, (32, 32, 32), "model.options.embed_dim: cswin_unet3d needs sizes of at least 1, got 0"),
        ({"feature_size": 0}, (32, 32, 32), "model.options.feature_size: cswin_unet3d needs sizes of at least 1"),
        ({"stem_stride": 0}, (32, 32, 32), "model.options.stem_stride: expected one or three positive integers "
                                           "(D, H, W), got 0"),
        ({"stem_stride": [2, 2]}, (32, 32, 32), "model.options.stem_stride: expected one or three positive integers"),
        ({"mlp_ratio": 0}, (32, 32, 32), "model.options.mlp_ratio: cswin_unet3d: mlp_ratio must give at least one "
                                         "hidden unit"),
        ({"drop_path_rate": 1.0}, (32, 32, 32), "model.options.drop_path_rate: cswin_unet3d: drop_path_rate must be "
                                                "in [0, 1), got 1.0"),
        ({"deep_supervision": "yes"}, (32, 32, 32), "model.options.deep_supervision: expected bool"),
        ({"window_size": 7}, (32, 32, 32), "model.options.window_size: cswin_unet3d (CSwinUNet3D) takes no option "
                                           "'window_size'"),
        ({"in_channels": 4}, (32, 32, 32), "model.options.in_channels: cswin_unet3d sets in_channels from "
                                           "model.in_channels"),
    ],
)
def test_bad_options_are_one_line_config_errors(options, roi, expected):
    opts = {**TINY, "stem_stride": 2, **options}
    with pytest.raises(ConfigError) as e:
        build_net(ModelConfig(name="cswin_unet3d", out_channels=3, roi_size=roi, options=opts))
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_one_voxel_bottleneck_is_fine_without_instance_norm():
    net = build_net(ModelConfig(name="cswin_unet3d", out_channels=2, roi_size=(16, 32, 32),
                                options={**TINY, "stem_stride": 4, "norm_name": "batch"})).train()
    assert net(torch.zeros(2, 1, 16, 32, 32)).shape == (2, 2, 16, 32, 32)


def test_train_and_segment_through_the_cli_with_deep_supervision(tmp_path, capsys):
    options = train_and_segment(tmp_path, capsys, {
        "name": "cswin_unet3d", "roi_size": [32, 32, 32],
        "options": {**TINY, "stem_stride": 2, "deep_supervision": True}})
    assert options["deep_supervision"] is True
