"""D-Former (``dformer``): size and cost against the official code, shapes over odd windows, the
attention each block runs, deep supervision, training, checkpoints and config-time errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from medvit.checkpoint import load_checkpoint
from medvit.config import ModelConfig, load_config, parse_config
from medvit.core.errors import CheckpointError, ConfigError
from medvit.nets import build_net
from medvit.nets.dformer import DFormer, DFormerBlock
from tests.helpers import assert_checkpoint_round_trip, fit_losses, train_and_segment

# measured on github kkk55596/D-Former model.py (commit 364ff5e), SegNetwork(14): all three heads
# built; FlopCounterMode with every head run
OFFICIAL_PARAMS = 50_557_248
OFFICIAL_PARAMS_WITHOUT_HEADS = 44_353_344
OFFICIAL_HALF_HEAD, OFFICIAL_QUARTER_HEAD = 1_182_720, 4_724_736
OFFICIAL_FLOPS = {(64, 128, 128): 120_841_863_168, (96, 96, 96): 107_340_917_760}

TINY = {"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4]}


def tiny(**kw) -> DFormer:
    return DFormer(in_channels=kw.pop("in_channels", 1), out_channels=kw.pop("out_channels", 3), **{**TINY, **kw})


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_equals_the_official_code():
    with torch.device("meta"):
        ds = DFormer(in_channels=1, out_channels=14, deep_supervision=True)
        plain = DFormer(in_channels=1, out_channels=14)
    assert n_params(ds) == OFFICIAL_PARAMS
    assert n_params(ds) - n_params(ds.head) - n_params(ds.aux_heads) == OFFICIAL_PARAMS_WITHOUT_HEADS
    # without deep supervision the 1/2 and 1/4 heads are not built
    assert plain.aux_heads is None
    assert n_params(plain) == OFFICIAL_PARAMS - OFFICIAL_HALF_HEAD - OFFICIAL_QUARTER_HEAD


def test_shipped_synapse_config_is_the_official_size():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "synapse_dformer.yaml")
    assert cfg.model.name == "dformer" and cfg.model.out_channels == 14
    with torch.device("meta"):
        net = build_net(cfg.model)
    assert n_params(net) == OFFICIAL_PARAMS  # 14 classes, deep supervision
    # the paper's 64x128x128 (z, y, x) crop in RAS axis order
    assert sorted(cfg.model.roi_size) == [64, 128, 128]
    assert [r // p for r, p in zip(cfg.model.roi_size, net.patch_size)] == [32, 32, 32]


@pytest.mark.parametrize("window", sorted(OFFICIAL_FLOPS))
def test_flops_within_two_percent_of_the_official_code(window):
    with torch.device("meta"):
        net = DFormer(in_channels=1, out_channels=14, deep_supervision=True)
        x = torch.zeros(1, 1, *window)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        full, half, quarter = net.train()(x)  # all three heads run, as in the official forward
    assert full.shape == (1, 14, *window)
    ratio = counter.get_total_flops() / OFFICIAL_FLOPS[window]
    assert abs(ratio - 1) < 0.02, ratio


@pytest.mark.parametrize(
    ("roi", "patch"),
    [((6, 20, 12), (2, 4, 4)),  # token grid 3x5x3: odd on every axis, depth included
     ((2, 4, 4), (2, 4, 4)),  # a single token
     ((10, 12, 14), (1, 2, 2)),
     ((3, 5, 7), (1, 1, 1))],
)
def test_any_multiple_of_the_patch_size_works(roi, patch):
    torch.manual_seed(0)
    net = tiny(in_channels=2, out_channels=4, patch_size=patch, deep_supervision=True)
    x = torch.randn(2, 2, *roi)
    full, half, quarter = net.train()(x)
    assert full.shape == (2, 4, *roi)
    assert half.shape == (2, 4, *(math.ceil(r / 2) for r in roi))
    assert quarter.shape == (2, 4, *(math.ceil(r / 4) for r in roi))
    (full.mean() + half.mean() + quarter.mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    with torch.no_grad():
        y = net.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 4, *roi) and torch.isfinite(y).all()


def test_out_channels_are_honoured():
    # the official heads always give 14 channels
    for out in (2, 14, 17):
        y = tiny(out_channels=out).eval()(torch.zeros(1, 1, 4, 8, 8))
        assert y.shape == (1, out, 4, 8, 8)


def test_deep_supervision_only_in_training():
    x = torch.randn(1, 1, 8, 16, 16)
    assert isinstance(tiny(deep_supervision=False).train()(x), torch.Tensor)
    net = tiny(deep_supervision=True)
    assert len(net.train()(x)) == 3
    with torch.no_grad():
        assert isinstance(net.eval()(x), torch.Tensor)


def test_patch_norm_switch():
    with_norm, without = tiny(), tiny(patch_norm=False)
    assert isinstance(with_norm.embed_norm, torch.nn.LayerNorm) and isinstance(without.embed_norm, torch.nn.Identity)
    assert n_params(with_norm) - n_params(without) == 2 * TINY["embed_dim"]
    assert without.eval()(torch.zeros(1, 1, 4, 8, 8)).shape == (1, 3, 4, 8, 8)


def test_input_not_a_multiple_of_the_patch_is_refused():
    with pytest.raises(ValueError, match=r"multiples of \(2, 4, 4\), got \(1, 1, 4, 8, 9\)"):
        tiny()(torch.zeros(1, 1, 4, 8, 9))


def test_blocks_alternate_local_and_global_scope():
    net = tiny(depths=[2, 2, 3, 2])
    for stage in [*net.encoder, *net.decoder]:
        assert [b.scope for b in stage.blocks] == ["local", "global", "local"][: len(stage.blocks)]
    assert [len(s.blocks) for s in net.decoder] == [2, 2, 3]  # the encoder's depths, mirrored


def _reference_attention(block: DFormerBlock, x: torch.Tensor, same_group) -> torch.Tensor:
    """The block's attention over all tokens with an explicit mask: token i attends token j iff
    ``same_group(i, j)`` (multi-index on the unpadded grid)."""
    attn = block.attn
    b, d, h, w, c = x.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, d * h * w, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    idx = torch.stack(torch.meshgrid(torch.arange(d), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 3)
    mask = same_group(idx[:, None, :], idx[None, :, :])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return attn.proj(out.transpose(1, 2).reshape(b, d, h, w, c))


def _per_axis(rule, grid, group):
    def same(i, j):
        ok = torch.ones(i.shape[0], j.shape[1], dtype=torch.bool)
        for a, (n, g) in enumerate(zip(grid, group)):
            ok &= rule(i[..., a], j[..., a], n, g)
        return ok
    return same


def _local(i, j, n, g):
    return i // g == j // g


def _dilated(i, j, n, g):
    # pad the axis to a multiple of the group; tokens `interval` apart share a group
    interval = math.ceil(n / g)
    return i % interval == j % interval


@pytest.mark.parametrize(
    ("scope", "grid", "rule"),
    [("global", (3, 9, 10), _dilated),  # padded on every axis, depth included, and masked
     ("global", (4, 16, 8), _dilated),
     ("local", (3, 9, 10), _local),
     ("local", (4, 16, 8), _local)],
)
def test_block_attention_equals_the_masked_reference(scope, grid, rule):
    torch.manual_seed(0)
    group = (2, 8, 8)
    block = DFormerBlock(12, 3, group, scope, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0).eval()
    x = torch.randn(2, *grid, 12)
    with torch.no_grad():
        ours = block.attn(x, block.pattern(grid))
        ref = _reference_attention(block, x, _per_axis(rule, grid, group))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_grid_smaller_than_the_group_runs_full_attention(scope):
    torch.manual_seed(0)
    group = (2, 8, 8)
    block = DFormerBlock(12, 3, group, scope, mlp_ratio=4.0, qkv_bias=True, drop=0.0, attn_drop=0.0, drop_path=0.0).eval()
    everything = lambda i, j: torch.ones(i.shape[0], j.shape[1], dtype=torch.bool)  # noqa: E731
    # (12, 6, 6): 6 < 8 in height and width, the 96^3 window's stage 2; (1, 16, 16): in depth only
    for grid in [(12, 6, 6), (1, 16, 16)]:
        x = torch.randn(1, *grid, 12)
        with torch.no_grad():
            ours = block.attn(x, block.pattern(grid))
            ref = _reference_attention(block, x, everything)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # the choice is made per call: a larger grid afterwards gets groups again (the official block
    # keeps the full-attention setting it switched to)
    grid = (4, 16, 16)
    x = torch.randn(1, *grid, 12)
    with torch.no_grad():
        ours = block.attn(x, block.pattern(grid))
        ref = _reference_attention(block, x, _per_axis(_local if scope == "local" else _dilated, grid, group))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)




@pytest.mark.parametrize("deep_supervision", [False, True])
def test_loss_falls_in_a_few_steps(deep_supervision):
    torch.manual_seed(0)
    net = tiny(deep_supervision=deep_supervision).train()
    losses = fit_losses(net, (8, 16, 16), lr=3e-3, steps=25, deep_supervision=deep_supervision)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def _config(roi=(8, 16, 16), **options):
    return parse_config({
        "labels": {0: "background", 1: "liver", 2: "spleen"},
        "model": {"name": "dformer", "roi_size": list(roi), "options": {**TINY, **options}},
    })


def test_checkpoint_round_trip(tmp_path):
    assert_checkpoint_round_trip(_config(deep_supervision=True), DFormer, (1, 1, 8, 16, 16), tmp_path)


def test_checkpoint_of_another_size_is_refused(tmp_path):
    torch.manual_seed(0)
    net = build_net(_config().model)
    torch.save(net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "model.pt", config=_config(embed_dim=24))
    assert "key 'patch_embed.weight' has shape (12, 1, 2, 4, 4) in the checkpoint but (24, 1, 2, 4, 4)" in str(e.value)
    assert "\n" not in str(e.value)


def test_builder_passes_options_and_channels():
    net = build_net(ModelConfig(name="dformer", in_channels=2, out_channels=5, roi_size=(4, 8, 12),
                                options={**TINY, "group_size": [1, 4, 4], "mlp_ratio": 2.0, "qkv_bias": False}))
    assert isinstance(net, DFormer)
    assert net.patch_embed.in_channels == 2 and net.head.conv.out_channels == 5
    assert net.encoder[0].blocks[0].group == (1, 4, 4)
    assert net.encoder[0].blocks[0].attn.qkv.bias is None
    assert net.encoder[0].blocks[0].mlp.fc1.out_features == 24
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 2, 4, 8, 12)).shape == (1, 5, 4, 8, 12)


@pytest.mark.parametrize(
    ("options", "roi", "expected"),
    [
        ({}, (6, 16, 18), "model.roi_size: dformer needs each size a multiple of patch_size [2, 4, 4], got [6, 16, 18]"),
        ({"patch_size": [1, 3, 3]}, (4, 8, 9), "model.roi_size: dformer needs each size a multiple of patch_size [1, 3, 3]"),
        ({"num_heads": [5, 2, 3, 4]}, (8, 16, 16), "model.options.num_heads: dformer: num_heads[0] = 5 does not divide the 12 channels of stage 0"),
        ({"embed_dim": 10}, (8, 16, 16), "model.options.num_heads: dformer: num_heads[2] = 3 does not divide the 40 channels of stage 2"),
        ({"embed_dim": 0}, (8, 16, 16), "model.options.embed_dim: dformer needs sizes of at least 1, got 0"),
        ({"depths": [1, 0, 1, 1]}, (8, 16, 16), "model.options.depths: dformer needs sizes of at least 1"),
        ({"group_size": [2, -8, 8]}, (8, 16, 16), "model.options.group_size: dformer needs sizes of at least 1"),
        ({"patch_size": [0, 4, 4]}, (8, 16, 16), "model.options.patch_size: expected three positive integers (D, H, W), got [0, 4, 4]"),
        ({"patch_size": [4, 4]}, (8, 16, 16), "model.options.patch_size: expected three positive integers (D, H, W), got [4, 4]"),
        ({"group_size": [8, 8]}, (8, 16, 16), "model.options.group_size: dformer: group_size needs three positive integers (D, H, W), got [8, 8]"),
        ({"depths": [2, 2, 2]}, (8, 16, 16), "model.options.depths: dformer: depths needs 4 positive integers (one per stage), got [2, 2, 2]"),
        ({"num_heads": [1, 2, 3, 4, 8]}, (8, 16, 16), "model.options.num_heads: dformer: num_heads needs 4 positive integers (one per stage)"),
        ({"depths": [2, "two", 2, 2]}, (8, 16, 16), "model.options.depths: expected a list of int"),
        ({"mlp_ratio": 0}, (8, 16, 16), "model.options.mlp_ratio: dformer: mlp_ratio must give at least one hidden unit, got 0"),
        ({"mlp_ratio": -1.5}, (8, 16, 16), "model.options.mlp_ratio: dformer: mlp_ratio must give at least one hidden unit"),
        ({"drop_rate": 1.5}, (8, 16, 16), "model.options.drop_rate: dformer: drop_rate must be in [0, 1), got 1.5"),
        ({"deep_supervision": "yes"}, (8, 16, 16), "model.options.deep_supervision: expected bool"),
        ({"window_size": 7}, (8, 16, 16), "model.options.window_size: dformer (DFormer) takes no option 'window_size'"),
        ({"out_channels": 4}, (8, 16, 16), "model.options.out_channels: dformer sets out_channels from model.out_channels"),
    ],
)
def test_bad_options_are_one_line_config_errors(options, roi, expected):
    with pytest.raises(ConfigError) as e:
        build_net(ModelConfig(name="dformer", out_channels=3, roi_size=roi, options={**TINY, **options}))
    assert str(e.value).startswith(expected), str(e.value)
    assert "\n" not in str(e.value)


def test_train_and_segment_through_the_cli_with_deep_supervision(tmp_path, capsys):
    options = train_and_segment(tmp_path, capsys, {
        "name": "dformer", "roi_size": [16, 16, 16],
        "options": {**TINY, "patch_size": [2, 2, 2], "group_size": [2, 4, 4], "deep_supervision": True}})
    assert options["deep_supervision"] is True
