"""3D TransUNet (``transunet3d``): size against ViT-B and the issue's estimate, shapes over odd
windows, the position embedding resized to other windows, LayerScale on the branches, deep
supervision, the encoder protocol, training, checkpoints and config-time errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medvit.checkpoint import load_checkpoint, save_checkpoint
from medvit.config import ModelConfig, load_config, parse_config
from medvit.core.errors import ConfigError
from medvit.nets import build_net
from medvit.losses.hungarian import HungarianMaskLoss
from medvit.nets.mask_transformer import MaskPrediction, semantic_scores
from medvit.nets.transunet3d import TransUNet3D, ViTBlock, token_grid
from tests.helpers import blob_batch, fit_losses, train_and_segment

TINY = {"strides": [1, 2, 2, 2], "base_features": 4, "max_features": 16, "vit_layers": 2, "vit_hidden": 16,
        "vit_heads": 2, "vit_mlp": 32, "vit_dropout": 0.0}


MASK = {"decoder": "mask_transformer", "num_queries": 5, "query_hidden": 12, "query_heads": 2, "query_ffn": 24,
        "query_layers": 2}


def tiny(roi=(16, 16, 16), in_channels=1, out_channels=3, **kw) -> TransUNet3D:
    opts = {**TINY, **kw}
    return TransUNet3D(in_channels=in_channels, out_channels=out_channels, grid=token_grid(roi, opts["strides"]),
                       **opts)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_vit_b_default_is_85m_and_the_net_about_117m():
    with torch.device("meta"):
        net = build_net(ModelConfig(name="transunet3d", out_channels=14, roi_size=(96, 96, 96)))
    vit = net.vit
    assert len(vit.blocks) == 12 and vit.norm.normalized_shape == (768,)
    assert vit.blocks[0].attn.num_heads == 12 and vit.blocks[0].mlp[0].out_features == 3072
    # ViT-B: 12 x (4 * 768^2 + 2 * 768 * 3072 + biases and norms)
    assert n_params(vit.blocks) == 85_054_464
    assert abs(n_params(net) / 117e6 - 1) < 0.01  # the estimate of the whole encoder variant
    assert net.channels == [32, 64, 128, 256, 320, 320]
    assert tuple(vit.pos.shape) == (1, 768, 3, 3, 3)  # 96 / 32 per axis


def test_shipped_btcv_config_builds_the_official_setting():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "btcv_transunet3d.yaml")
    assert cfg.model.name == "transunet3d" and cfg.model.out_channels == 14
    with torch.device("meta"):
        net = build_net(cfg.model)
    assert abs(n_params(net) / 117e6 - 1) < 0.01
    assert tuple(net.vit.pos.shape[2:]) == (5, 6, 4)  # the official 64x192x160 patch's 4x6x5, in RAS order


@pytest.mark.parametrize("roi", [(16, 16, 16), (13, 17, 9), (20, 7, 11), (5, 6, 40)])
def test_any_window_gives_its_own_size(roi):
    # odd sizes at every level: stride-2 convs give ceil(n / 2), decoder levels crop to the skips
    torch.manual_seed(0)
    net = tiny(in_channels=2, out_channels=4, deep_supervision=True)
    x = torch.randn(2, 2, *roi)
    out = net.train()(x)
    assert isinstance(out, tuple) and len(out) == 2  # full and 1/2: four stages, coarsest level without a head
    assert out[0].shape == (2, 4, *roi)
    assert out[1].shape == (2, 4, *(math.ceil(r / 2) for r in roi))
    sum(o.mean() for o in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with torch.no_grad():
        y = net.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4, *roi) and torch.isfinite(y).all()


def test_deep_supervision_levels_follow_the_stages():
    net = tiny(strides=[1, 2, 2, [1, 2, 2], 2], deep_supervision=True).train()
    out = net(torch.randn(1, 1, 16, 32, 32))
    # five stages: decoder levels at the sizes of stages 0..3, (16, 32, 32) .. (4, 4, 4); the
    # coarsest level has no head (nnU-Net weights it zero)
    assert [tuple(o.shape[2:]) for o in out] == [(16, 32, 32), (8, 16, 16), (4, 8, 8)]
    assert isinstance(net.eval()(torch.randn(1, 1, 16, 32, 32)), torch.Tensor)
    plain = tiny(deep_supervision=False)
    assert plain.aux_heads is None and isinstance(plain.train()(torch.randn(1, 1, 16, 16, 16)), torch.Tensor)


def test_position_embedding_is_resized_to_the_token_grid():
    torch.manual_seed(0)
    net = tiny(roi=(16, 16, 16)).eval()
    assert tuple(net.vit.pos.shape[2:]) == (2, 2, 2)
    assert net.vit.position((2, 2, 2)) is net.vit.pos
    resized = net.vit.position((3, 5, 4))
    assert resized.shape == (1, 16, 3, 5, 4)
    expected = torch.nn.functional.interpolate(net.vit.pos, size=(3, 5, 4), mode="trilinear", align_corners=False)
    torch.testing.assert_close(resized, expected)
    # a window of another size runs (the official embedding has a fixed token count and fails)
    with torch.no_grad():
        assert net(torch.randn(1, 1, 24, 40, 32)).shape == (1, 3, 24, 40, 32)
    # the embedding matters: changing it changes the output at another window too
    x = torch.randn(1, 1, 24, 40, 32)
    with torch.no_grad():
        before = net(x)
        net.vit.pos.mul_(-1)
        assert not torch.allclose(before, net(x))


def test_layer_scale_scales_the_branches_not_the_skip():
    torch.manual_seed(0)
    block = ViTBlock(16, 2, 32, dropout=0.0, attn_dropout=0.0, layer_scale=1e-5).eval()
    x = torch.randn(2, 3, 4, 5, 16)
    with torch.no_grad():
        # gamma = 1e-5 at the start: the block is nearly the identity (the official block scales the
        # skip instead and starts near attn(norm(x)) + mlp(...), dropping the input)
        torch.testing.assert_close(block(x), x, atol=1e-3, rtol=0)
        block.ls1.gamma.zero_()
        block.ls2.gamma.zero_()
        assert torch.equal(block(x), x)
        block.ls1.gamma.fill_(1.0)
        block.ls2.gamma.fill_(1.0)
        plain = ViTBlock(16, 2, 32, dropout=0.0, attn_dropout=0.0, layer_scale=None).eval()
        plain.load_state_dict({k: v for k, v in block.state_dict().items() if ".gamma" not in k})
        torch.testing.assert_close(block(x), plain(x))
    assert isinstance(plain.ls1, torch.nn.Identity)
    net = build_net(ModelConfig(name="transunet3d", out_channels=2, roi_size=(16, 16, 16),
                                options={**TINY, "layer_scale": 0.1}))
    assert all(b.ls1.gamma.detach().eq(torch.tensor(0.1)).all() for b in net.vit.blocks)


def test_encoder_protocol():
    net = tiny().eval()
    with torch.no_grad():
        z = net.encode(torch.randn(2, 1, 16, 20, 12))
    assert z.shape == (2, 16, 2, 3, 2)  # max_features channels, ceil(roi / 8)
    keys = list(net.state_dict())
    enc = [k for k in keys if k.startswith(TransUNet3D.encoder_prefixes)]
    assert any(k.startswith("vit.pos") for k in enc) and any(k.startswith("encoder.0.") for k in enc)
    assert not any(k.startswith(("decoder.", "ups.", "head")) for k in enc)
    # the encoder's keys are exactly what encode() uses
    used = {n for n, p in net.named_parameters() if n.startswith(TransUNet3D.encoder_prefixes)}
    assert used == {n for n, _ in net.named_parameters()} - {n for n, _ in net.named_parameters()
                                                              if n.startswith(("decoder.", "ups.", "head", "aux"))}




@pytest.mark.parametrize("deep_supervision", [False, True])
def test_loss_falls_in_a_few_steps(deep_supervision):
    torch.manual_seed(0)
    net = tiny(base_features=8, deep_supervision=deep_supervision).train()
    losses = fit_losses(net, (16, 16, 16), lr=1e-2, steps=20, deep_supervision=deep_supervision)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize(("strides", "roi", "levels"), [
    ([1, 2, 2, 2, 2], (17, 16, 20), (3, 2, 1)),  # 1/8, 1/4, 1/2 on odd sizes
    ([1, 2, 2, 2], (16, 12, 16), (2, 1)),  # four stages: the levels there are
    ([1, [1, 2, 2], 2], (9, 16, 12), (1,)),  # three stages: level 1 only
])
def test_mask_transformer_decoder(strides, roi, levels):
    torch.manual_seed(0)
    net = tiny(roi, strides=strides, **MASK)
    assert net.mask_levels == levels and net.head is None and net.aux_heads is None
    assert net.mask_decoder.in_channels == tuple(net.channels[i] for i in levels)
    x = torch.randn(2, 1, *roi)
    pred = net.train()(x)
    assert isinstance(pred, MaskPrediction)
    assert pred.class_logits.shape == (2, 5, 4) and pred.mask_logits.shape == (2, 5, *roi)
    assert len(pred.aux) == 2  # the query init and the first of two layers
    with torch.no_grad():
        scores = net.eval()(x)
        assert scores.shape == (2, 3, *roi)
        pred = net.train()(x)  # no dropout: the same prediction in both modes
        torch.testing.assert_close(scores, semantic_scores(pred))


def test_mask_transformer_loss_falls_in_a_few_steps():
    torch.manual_seed(0)
    net = tiny(base_features=8, **MASK).train()
    x, y = blob_batch(4, size=(16, 16, 16))
    loss_fn = HungarianMaskLoss(3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def _config(roi=(16, 16, 16), **options):
    return parse_config({
        "labels": {0: "background", 1: "liver", 2: "spleen"},
        "model": {"name": "transunet3d", "roi_size": list(roi), "options": {**TINY, **options}},
    })


@pytest.mark.parametrize("options", [{"deep_supervision": True, "layer_scale": 0.5}, MASK])
def test_checkpoint_round_trip_and_another_window(tmp_path, options):
    cfg = _config(**options)
    torch.manual_seed(0)
    net = build_net(cfg.model).eval()
    x = torch.linspace(-1, 1, 16**3).reshape(1, 1, 16, 16, 16).sin()
    path = save_checkpoint(net, tmp_path / "best.safetensors", config=cfg)
    loaded = load_checkpoint(path)
    assert isinstance(loaded.net, TransUNet3D) and not loaded.net.training
    with torch.no_grad():
        assert torch.equal(loaded.net(x), net(x))
        # built at a 16^3 roi, run at another window: the same weights, the embedding resized
        bigger = torch.linspace(-1, 1, 24 * 32 * 20).reshape(1, 1, 24, 32, 20).cos()
        assert torch.equal(loaded.net(bigger), net(bigger)) and loaded.net(bigger).shape == (1, 3, 24, 32, 20)
        torch.manual_seed(1)
        assert not torch.equal(build_net(cfg.model).eval()(x), net(x))


def test_net_trained_at_one_roi_segments_through_the_engine_at_another(tmp_path):
    # the sliding-window engine at a 24x32x20 window, a 16^3-built net: labels over the whole volume
    from pipelines.engine.dense import sliding_window_labels

    torch.manual_seed(0)
    net = build_net(_config().model).eval()
    image = torch.randn(1, 40, 50, 30)
    with torch.no_grad():
        labels = sliding_window_labels(image[None], lambda w: net(w), roi_size=(24, 32, 20), overlap=0.25)
    assert labels.shape == (1, 40, 50, 30)
    with torch.no_grad():
        # a window that covers the whole volume is the net's own output
        whole = sliding_window_labels(image[None], lambda w: net(w), roi_size=(40, 50, 30), overlap=0.25)
        assert torch.equal(whole[0], net(image[None]).argmax(1)[0])


def test_builder_passes_options_and_channels():
    net = build_net(ModelConfig(name="transunet3d", in_channels=2, out_channels=5, roi_size=(12, 20, 16),
                                options={**TINY, "strides": [1, [1, 2, 2], 2], "vit_heads": 4}))
    assert isinstance(net, TransUNet3D)
    assert net.encoder[0].conv1.conv.in_channels == 2 and net.head.out_channels == 5
    assert net.channels == [4, 8, 16] and tuple(net.vit.pos.shape[2:]) == (6, 5, 4)
    assert net.vit.blocks[0].attn.num_heads == 4
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 2, 12, 20, 16)).shape == (1, 5, 12, 20, 16)


@pytest.mark.parametrize(
    ("options", "roi", "expected"),
    [
        ({"vit_hidden": 18, "vit_heads": 4}, (16, 16, 16), "model.options.vit_hidden: transunet3d: vit_hidden = 18 is not divisible by vit_heads = 4"),
        ({"vit_hidden": 0}, (16, 16, 16), "model.options.vit_hidden: transunet3d needs sizes of at least 1, got 0"),
        ({"vit_layers": 0}, (16, 16, 16), "model.options.vit_layers: transunet3d needs sizes of at least 1, got 0"),
        ({"base_features": -4}, (16, 16, 16), "model.options.base_features: transunet3d needs sizes of at least 1"),
        ({"strides": [1, 0, 2]}, (16, 16, 16), "model.options.strides: transunet3d: strides needs entries of one positive integer or three"),
        ({"strides": [1, [2, 2], 2]}, (16, 16, 16), "model.options.strides: transunet3d: strides needs entries of one positive integer or three"),
        ({"strides": [1]}, (16, 16, 16), "model.options.strides: transunet3d: strides needs at least two stages"),
        ({"strides": [2, 2, 2]}, (16, 16, 16), "model.options.strides: transunet3d: strides must start with 1"),
        ({"decoder": "unet"}, (16, 16, 16), "model.options.decoder: transunet3d: decoder must be one of 'cnn', 'mask_transformer', got 'unet'"),
        ({"decoder": "mask_transformer", "num_queries": 0}, (16, 16, 16), "model.options.num_queries: transunet3d needs sizes of at least 1, got 0"),
        ({"decoder": "mask_transformer", "query_layers": 0}, (16, 16, 16), "model.options.query_layers: transunet3d needs sizes of at least 1, got 0"),
        ({"decoder": "mask_transformer", "query_hidden": 20, "query_heads": 8}, (16, 16, 16), "model.options.query_hidden: transunet3d: query_hidden = 20 must be at least 6 and divisible by query_heads = 8"),
        ({"decoder": "mask_transformer", "deep_supervision": True}, (16, 16, 16), "model.options.deep_supervision: transunet3d: deep_supervision is for the 'cnn' heads"),
        ({"vit_dropout": 1.0}, (16, 16, 16), "model.options.vit_dropout: transunet3d: vit_dropout must be in [0, 1), got 1.0"),
        ({"layer_scale": "on"}, (16, 16, 16), "model.options.layer_scale: expected float or null, got 'on'"),
        ({"grid": [2, 2, 2]}, (16, 16, 16), "model.options.grid: transunet3d sets grid from model.roi_size"),
        ({"patch_size": 4}, (16, 16, 16), "model.options.patch_size: transunet3d (TransUNet3D) takes no option 'patch_size'"),
        ({}, (8, 8, 8), "model.roi_size: transunet3d's strides leave [8, 8, 8] a one-voxel bottleneck"),
    ],
)
def test_bad_options_are_one_line_config_errors(options, roi, expected):
    with pytest.raises(ConfigError) as e:
        build_net(ModelConfig(name="transunet3d", out_channels=3, roi_size=roi, options={**TINY, **options}))
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("options", [{"deep_supervision": True}, MASK], ids=["cnn", "mask_transformer"])
def test_train_and_segment_through_the_cli(tmp_path, capsys, options):
    saved = train_and_segment(tmp_path, capsys, {"name": "transunet3d", "roi_size": [16, 16, 16],
                                                 "options": {**TINY, **options}})
    assert all(saved[k] == v for k, v in options.items())
