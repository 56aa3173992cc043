"""The point nets' shared layers: stochastic depth, the feed-forward and per-level options."""

import subprocess
import sys

import pytest
import torch

from pointcloud.nets.layers import DropPath, feed_forward, per_level


def test_drop_path_keeps_eval_and_drops_whole_rows_in_training():
    x = torch.randn(4000, 6)
    layer = DropPath(0.25)
    assert layer.eval()(x) is x
    torch.manual_seed(0)
    y = layer.train()(x)
    dropped = (y == 0).all(1)
    kept = ~dropped
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert 0.2 < dropped.float().mean().item() < 0.3
    assert DropPath(0.0).train()(x) is x
    assert torch.equal(DropPath(1.0).train()(x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="drop_prob"):
        DropPath(1.5)


def test_feed_forward_names_its_parameters_as_checkpoints_hold_them():
    plain, with_drop = feed_forward(8, 2.0), feed_forward(8, 2.0, 0.0)
    assert list(plain.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert list(with_drop.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert plain[0].out_features == 16 and feed_forward(3, 0.1)[0].out_features == 1
    assert plain(torch.randn(5, 8)).shape == (5, 8)


def test_per_level_expands_an_int_and_names_a_bad_value():
    assert per_level(2, 3, "depths") == (2, 2, 2)
    assert per_level([0, 1, 2], 3, "depths") == (0, 1, 2)
    with pytest.raises(ValueError, match=r"heads must be an int >= 1 or 3 of them \(one per level\), got \[1, 0, 1\]"):
        per_level([1, 0, 1], 3, "heads", minimum=1)
    with pytest.raises(ValueError, match="layers must be an int >= 0 or 2 of them"):
        per_level([1, 1, 1], 2, "layers")


def test_point_nets_import_without_monai():
    code = "import sys, pointcloud.nets; print('monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
