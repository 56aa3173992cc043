"""The net registry: each registered net builds from a config and maps (B, C_in, *roi) to (B, C_out, *roi)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNETR, BasicUNet, SwinUNETR
from torch import nn

from medvit.config import ModelConfig
from medvit.core.errors import ConfigError
from medvit.nets import NETS, build_net

TINY = {
    "unetr": ({"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}, (32, 32, 32)),
    # a 32³ window leaves Swin UNETR's bottleneck a single voxel, which instance norm refuses
    "swin_unetr": ({"feature_size": 12}, (64, 32, 32)),
    "unet": ({"features": [4, 4, 8, 16, 32, 4]}, (16, 24, 32)),
    "dformer": ({"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4]}, (6, 20, 12)),
    "transunet3d": ({"strides": [1, 2, 2], "base_features": 4, "vit_layers": 1, "vit_hidden": 8, "vit_heads": 2,
                     "vit_mlp": 16}, (9, 20, 12)),
    "cswin_unet3d": ({"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 6], "feature_size": 8,
                      "stem_stride": [2, 4, 4]}, (10, 36, 20)),
}


def test_names_lists_the_nets():
    assert NETS.names() == ["cswin_unet3d", "dformer", "swin_unetr", "transunet3d", "unet", "unetr"]


@pytest.mark.parametrize("name", sorted(TINY))
def test_build_and_forward_shape(name):
    options, roi = TINY[name]
    net = build_net(ModelConfig(name=name, in_channels=2, out_channels=3, roi_size=roi, options=options)).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 2, *roi)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, *roi)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize(("name", "cls"), [("unetr", UNETR), ("swin_unetr", SwinUNETR), ("unet", BasicUNet)])
def test_nets_are_monai_classes_configured(name, cls):
    options, roi = TINY[name]
    net = build_net(ModelConfig(name=name, out_channels=2, roi_size=roi, options=options))
    assert type(net) is cls


def test_options_reach_the_constructor():
    opts = {**TINY["unetr"][0], "proj_type": "perceptron", "dropout_rate": 0.1, "qkv_bias": True}
    net = build_net(ModelConfig(name="unetr", out_channels=2, roi_size=(32, 32, 48), options=opts))
    assert net.hidden_size == 48
    assert net.feat_size == (2, 2, 3)  # 16³ patches over the roi
    assert net.vit.blocks[0].attn.qkv.bias is not None
    # the patch embedding of a 'perceptron' projection is a linear layer over flattened 16³ patches
    assert any(isinstance(m, nn.Linear) and m.in_features == 16**3 for m in net.vit.patch_embedding.modules())


def test_unet_default_features():
    net = build_net(ModelConfig(name="unet", out_channels=4, roi_size=(16, 16, 32)))
    assert net.conv_0.conv_0.conv.out_channels == 32
    assert net.final_conv.out_channels == 4


def test_unknown_name_lists_available():
    with pytest.raises(ConfigError) as e:
        build_net(ModelConfig(name="vnet", out_channels=2))
    assert str(e.value) == "model.name: unknown net 'vnet'; available: cswin_unet3d, dformer, swin_unetr, transunet3d, unet, unetr"


@pytest.mark.parametrize(
    ("name", "options", "roi", "expected"),
    [
        ("unetr", {"feature_sz": 8}, (32, 32, 32), "model.options.feature_sz: unetr (UNETR) takes no option 'feature_sz'"),
        ("unetr", {"feature_size": "eight"}, (32, 32, 32), "model.options.feature_size: expected int, got 'eight'"),
        ("unetr", {"qkv_bias": "yes"}, (32, 32, 32), "model.options.qkv_bias: expected bool"),
        ("unetr", {"hidden_size": 50, "num_heads": 4}, (32, 32, 32), "model.options.hidden_size: unetr: hidden_size should be divisible by num_heads"),
        ("unetr", {"dropout_rate": 1.5}, (32, 32, 32), "model.options.dropout_rate: unetr: dropout_rate should be between 0 and 1"),
        ("unetr", {"proj_type": "patchy"}, (32, 32, 32), "model.options.proj_type: unetr: "),
        ("unetr", {"img_size": 64}, (32, 32, 32), "model.options.img_size: unetr sets img_size from model.roi_size"),
        ("unetr", {"out_channels": 5}, (32, 32, 32), "model.options.out_channels: unetr sets out_channels from model.out_channels; remove it"),
        ("swin_unetr", {"feature_size": 16}, (64, 32, 32), "model.options.feature_size: swin_unetr: feature_size should be divisible by 12"),
        ("swin_unetr", {"depths": [2, "two", 2, 2]}, (64, 32, 32), "model.options.depths: expected a list of int"),
        ("swin_unetr", {"img_size": [64, 32, 32]}, (64, 32, 32), "model.options.img_size: swin_unetr (SwinUNETR) takes no option 'img_size'"),
        ("swin_unetr", {"patch_size": 0}, (64, 32, 32), "model.options.patch_size: expected a positive integer"),
        ("unet", {"features": [4, 8]}, (32, 32, 32), "model.options.features: expected six channel counts"),
        ("unet", {"act": 3}, (32, 32, 32), "model.options.act: expected str or a list, got 3"),
        # zero or negative sizes were a ZeroDivisionError or "negative dimension" traceback
        ("unetr", {"hidden_size": 0}, (32, 32, 32), "model.options.hidden_size: unetr needs sizes of at least 1, got 0"),
        ("unetr", {"num_heads": 0}, (32, 32, 32), "model.options.num_heads: unetr needs sizes of at least 1, got 0"),
        ("unetr", {"feature_size": -8}, (32, 32, 32), "model.options.feature_size: unetr needs sizes of at least 1, got -8"),
        ("swin_unetr", {"depths": [2, 2, 0, 2]}, (64, 32, 32), "model.options.depths: swin_unetr needs sizes of at least 1"),
        ("unet", {"features": [0, 8, 16, 32, 64, 8]}, (32, 32, 32), "model.options.features: unet needs sizes of at least 1"),
    ],
)
def test_bad_options_name_their_key(name, options, roi, expected):
    with pytest.raises(ConfigError) as e:
        build_net(ModelConfig(name=name, out_channels=2, roi_size=roi, options=options))
    assert str(e.value).startswith(expected), str(e.value)


@pytest.mark.parametrize(("name", "options", "roi"), [
    ("swin_unetr", {"feature_size": 12, "drop_rate": 0, "dropout_path_rate": 0}, (64, 32, 32)),
    ("dformer", {**TINY["dformer"][0], "drop_rate": 0, "attn_drop_rate": 0, "drop_path_rate": 0}, (6, 20, 12)),
    ("transunet3d", {**TINY["transunet3d"][0], "vit_dropout": 0, "vit_attn_dropout": 0}, (9, 20, 12)),
    ("cswin_unet3d", {**TINY["cswin_unet3d"][0], "drop_rate": 0, "attn_drop_rate": 0, "drop_path_rate": 0},
     (10, 36, 20)),
])
def test_zero_rates_are_not_sizes(name, options, roi):
    # YAML writes 0 as an int; a float option (a rate) may be 0 where a size may not
    net = build_net(ModelConfig(name=name, out_channels=2, roi_size=roi, options=options))
    assert isinstance(net, nn.Module)


def test_mlp_dim_zero_is_monais_hidden_size():
    net = build_net(ModelConfig(name="unetr", out_channels=2, roi_size=(32, 32, 32),
                                options={"hidden_size": 96, "num_heads": 4, "mlp_dim": 0}))
    assert net.vit.blocks[0].mlp.linear1.out_features == 96


@pytest.mark.parametrize(
    ("name", "options", "roi", "expected"),
    [
        ("unetr", {}, (40, 32, 32), "model.roi_size: unetr needs each size a multiple of 16, got [40, 32, 32]"),
        ("swin_unetr", {}, (48, 64, 64), "model.roi_size: swin_unetr needs each size a multiple of 32, got [48, 64, 64]"),
        ("swin_unetr", {"patch_size": 3}, (96, 96, 96), "model.roi_size: swin_unetr needs each size a multiple of 243"),
        ("swin_unetr", {}, (32, 32, 32), "model.roi_size: swin_unetr with instance norm needs at least 64 on one axis"),
        ("unet", {}, (17, 31, 31), "model.roi_size: unet with instance norm needs at least 32 on one axis"),
        ("unet", {"norm": ["instance", {"affine": True}]}, (16, 16, 16), "model.roi_size: unet with instance norm"),
        ("unet", {}, (8, 32, 32), "model.roi_size: unet needs each size at least 16, got [8, 32, 32]"),
        ("unetr", {}, (0, 32, 32), "model.roi_size: expected three positive sizes, got [0, 32, 32]"),
    ],
)
def test_bad_roi_names_roi_size(name, options, roi, expected):
    with pytest.raises(ConfigError) as e:
        build_net(ModelConfig(name=name, out_channels=2, roi_size=roi, options=options))
    assert str(e.value).startswith(expected), str(e.value)


@pytest.mark.parametrize(
    ("name", "options", "roi"),
    [("swin_unetr", {"feature_size": 12, "norm_name": "batch"}, (32, 32, 32)),
     ("unet", {"features": [4, 4, 8, 16, 32, 4], "norm": "batch"}, (16, 16, 16))],
)
def test_one_voxel_bottleneck_allowed_without_instance_norm(name, options, roi):
    # the single-voxel bottleneck is only a problem for instance norm
    net = build_net(ModelConfig(name=name, out_channels=2, roi_size=roi, options=options)).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, *roi)).shape == (1, 2, *roi)


@pytest.mark.parametrize(("name", "options", "roi"), [("swin_unetr", {"feature_size": 12}, (32, 32, 32)),
                                                      ("unet", {}, (16, 16, 16))])
def test_one_voxel_bottleneck_really_fails_with_instance_norm(name, options, roi, monkeypatch):
    # what the roi check above spares the user: torch refuses at the first forward pass
    monkeypatch.setattr(f"medvit.nets.{name}.check_bottleneck", lambda *a, **k: None)
    net = build_net(ModelConfig(name=name, out_channels=2, roi_size=roi, options=options)).eval()
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"), torch.no_grad():
        net(torch.zeros(1, 1, *roi))


def test_out_channels_must_be_set():
    with pytest.raises(ConfigError, match="model.out_channels"):
        build_net(ModelConfig(name="unet"))


def test_register_adds_a_builder(monkeypatch):
    monkeypatch.setattr(NETS, "_builders", dict(NETS._builders))

    @NETS.register("conv1")
    def conv1(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options) -> nn.Module:
        return nn.Conv3d(in_channels, out_channels, kernel_size=1, **options)

    assert "conv1" in NETS.names()
    net = build_net(ModelConfig(name="conv1", in_channels=3, out_channels=5, roi_size=(4, 4, 4), options={"bias": False}))
    assert net.weight.shape == (5, 3, 1, 1, 1) and net.bias is None
    with pytest.raises(ValueError, match="already registered"):
        NETS.register("conv1")(lambda *a, **k: nn.Identity())
