"""Checkpoint I/O: safetensors + sidecar round trips, .pt state dicts, and the errors for files that do not fit."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import medvit
from medvit.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from medvit.config import Config, parse_config
from medvit.core.errors import CheckpointError, InputError
from medvit.core.weights import checkpoint_sidecar
from medvit.nets import build_net

TINY_UNETR = {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}
LABELS = {0: "background", 1: "liver", 2: "spleen"}


def make_config(name: str = "unetr", options: dict | None = None, roi=(32, 32, 32), **model) -> Config:
    return parse_config({
        "labels": LABELS,
        "preprocess": {"orientation": "LPS", "spacing": [1.5, 1.5, 2.0],
                       "intensity": {"modality": "ct", "window": [-57, 164]}, "crop_foreground": True},
        "model": {"name": name, "roi_size": list(roi), "options": TINY_UNETR if options is None else options, **model},
        "infer": {"overlap": 0.25, "sw_batch_size": 2, "mode": "constant"},
    })


def make_net(cfg: Config, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_net(cfg.model).eval()


def outputs(net: nn.Module, roi=(32, 32, 32)) -> torch.Tensor:
    x = torch.linspace(-1, 1, roi[0] * roi[1] * roi[2]).reshape(1, 1, *roi).sin()
    with torch.no_grad():
        return net(x)


@pytest.fixture(scope="module")
def cfg() -> Config:
    return make_config()


@pytest.fixture(scope="module")
def net(cfg) -> nn.Module:
    return make_net(cfg)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, net, cfg):
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    assert save_checkpoint(net, path, config=cfg, extra={"epoch": 7, "val_mean_dice": 0.5}) == path
    return path


def test_round_trip_gives_identical_outputs(saved, net, cfg):
    loaded = load_checkpoint(saved)
    assert isinstance(loaded, LoadedModel)
    assert not loaded.net.training
    assert loaded.config == cfg
    assert torch.equal(outputs(loaded.net), outputs(net))
    # a net with other weights gives other outputs: the equality above is not vacuous
    assert not torch.equal(outputs(make_net(cfg, seed=1)), outputs(net))
    assert loaded.meta["checkpoint"] == str(saved)
    assert loaded.meta["extra"] == {"epoch": 7, "val_mean_dice": 0.5}


def test_round_trip_with_matching_config(saved, net, cfg):
    loaded = load_checkpoint(saved, config=make_config())
    assert torch.equal(outputs(loaded.net), outputs(net))


def test_sidecar_content(saved):
    side = checkpoint_sidecar(saved)
    assert side == saved.with_name("best.json")
    meta = json.loads(side.read_text())
    assert meta["format"] == "medvit-checkpoint"
    assert meta["format_version"] == 1
    assert meta["medvit_version"] == medvit.__version__
    assert meta["net"] == {"name": "unetr", "in_channels": 1, "out_channels": 3, "roi_size": [32, 32, 32],
                           "options": TINY_UNETR}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    pre = meta["preprocess"]
    assert pre["orientation"] == "LPS" and pre["spacing"] == [1.5, 1.5, 2.0] and pre["crop_foreground"] is True
    assert pre["intensity"] == {"modality": "ct", "window": [-57.0, 164.0], "clip": True, "nonzero": True}
    assert meta["infer"] == {"overlap": 0.25, "sw_batch_size": 2, "mode": "constant"}
    assert meta["extra"] == {"epoch": 7, "val_mean_dice": 0.5}
    # nothing but the two files: the temporary names were renamed away
    assert sorted(p.name for p in saved.parent.iterdir()) == ["best.json", "best.safetensors"]


def test_weights_file_is_plain_safetensors(saved, net):
    tensors = safetensors.torch.load_file(saved)
    expected = net.state_dict()
    assert tensors.keys() == expected.keys()
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)


def test_save_handles_shared_tensors(tmp_path, cfg):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # tied, as in weight-sharing decoders

    tied = Tied()
    path = save_checkpoint(tied, tmp_path / "tied.safetensors", config=cfg)
    tensors = safetensors.torch.load_file(path)
    assert torch.equal(tensors["a.weight"], tensors["b.weight"])
    assert torch.equal(tensors["b.weight"], tied.a.weight.detach())


def test_save_refuses_other_suffix(tmp_path, net, cfg):
    with pytest.raises(CheckpointError, match=r"model\.pt: checkpoints are written as \.safetensors"):
        save_checkpoint(net, tmp_path / "model.pt", config=cfg)


def test_failed_save_keeps_the_old_checkpoint(tmp_path, net, cfg, monkeypatch):
    path = save_checkpoint(net, tmp_path / "last.safetensors", config=cfg, extra={"epoch": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", broken)  # the weights' bytes reach the disk through it
    with pytest.raises(InputError, match=r"last\.safetensors: cannot be written \(No space left on device\)"):
        save_checkpoint(net, path, config=cfg, extra={"epoch": 2})  # one line for the user, not a traceback
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module", "net+module"])
def test_pt_state_dict_loads_with_config(tmp_path, net, cfg, wrap):
    sd = net.state_dict()
    if "module" in wrap:
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"net": sd, "optimizer": {"lr": 1e-4}, "epoch": 3} if wrap.startswith("net") else (
        {wrap: sd} if wrap in ("model", "state_dict") else sd)
    path = tmp_path / "model.pt"
    torch.save(obj, path)
    loaded = load_checkpoint(path, config=cfg)
    assert loaded.config is cfg
    assert not loaded.net.training
    assert torch.equal(outputs(loaded.net), outputs(net))
    assert loaded.meta["stripped_prefix"] == ("module." if "module" in wrap else None)


def test_pt_needs_config(tmp_path, net):
    torch.save(net.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "model.pt")
    assert str(e.value) == f"{tmp_path / 'model.pt'}: a .pt state dict does not say which net it is for; pass --config"


def test_mismatched_out_channels_names_key_and_shapes(tmp_path):
    other = make_net(make_config(out_channels=14))
    path = tmp_path / "model.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, config=make_config())
    assert str(e.value) == (
        f"{path}: key 'out.conv.conv.weight' has shape (14, 8, 1, 1, 1) in the checkpoint "
        f"but (3, 8, 1, 1, 1) in unetr(in_channels=1, out_channels=3) (0 missing, 2 of another shape, 0 unexpected keys)"
    )


def test_missing_and_unexpected_keys_are_named(tmp_path, net, cfg):
    sd = dict(net.state_dict())
    del sd["encoder1.layer.conv1.conv.weight"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"key 'encoder1\.layer\.conv1\.conv\.weight' is missing from the checkpoint"):
        load_checkpoint(tmp_path / "missing.pt", config=cfg)

    sd = {**net.state_dict(), "head.weight": torch.zeros(2)}
    torch.save(sd, tmp_path / "unexpected.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "unexpected.pt", config=cfg)
    assert str(e.value) == f"{tmp_path / 'unexpected.pt'}: key 'head.weight' is not a parameter of unetr(in_channels=1, out_channels=3)"


def test_checkpoint_of_another_net_is_recognised(tmp_path, cfg):
    unet = make_net(make_config("unet", options={"features": [4, 4, 8, 16, 32, 4]}))
    torch.save(unet.state_dict(), tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"looks like a checkpoint for another net than unetr\(in_channels=1, out_channels=3\)"):
        load_checkpoint(tmp_path / "model.pt", config=cfg)


def test_safetensors_of_unetr_with_swin_config(saved):
    swin = make_config("swin_unetr", options={"feature_size": 12}, roi=(64, 32, 32))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved, config=swin)
    assert str(e.value) == f"{saved}: checkpoint is for net 'unetr' but the config asks for 'swin_unetr'"


def test_safetensors_with_other_roi_or_channels(saved):
    with pytest.raises(CheckpointError, match=r"has model\.roi_size \[32, 32, 32\] but the config asks for \[64, 64, 64\]"):
        load_checkpoint(saved, config=make_config(roi=(64, 64, 64)))
    with pytest.raises(CheckpointError, match="has model.in_channels 1 but the config asks for 2"):
        load_checkpoint(saved, config=make_config(in_channels=2))


def test_missing_sidecar_names_it(tmp_path, net, cfg):
    path = save_checkpoint(net, tmp_path / "w.safetensors", config=cfg)
    checkpoint_sidecar(path).unlink()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, config=cfg)
    assert f"its sidecar {tmp_path / 'w.json'} is missing" in str(e.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda m: "{not json", r"w\.json: not valid JSON \(line 1\)"),
        (lambda m: json.dumps({**m, "format": "other"}), r"not a medvit checkpoint sidecar"),
        (lambda m: json.dumps({**m, "format_version": 2}), r"format_version 2 is newer than this medvit reads"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "net"}), r"w\.json: missing key 'net'"),
        (lambda m: json.dumps({**m, "net": {**m["net"], "name": "vnet"}}), r"w\.json: model\.name: unknown net 'vnet'"),
        (lambda m: json.dumps({**m, "preprocess": {**m["preprocess"], "spacing": [0, 1, 1]}}), r"w\.json: key 'preprocess\.spacing'"),
    ],
)
def test_bad_sidecar(tmp_path, net, cfg, edit, expected):
    path = save_checkpoint(net, tmp_path / "w.safetensors", config=cfg)
    side = checkpoint_sidecar(path)
    side.write_text(edit(json.loads(side.read_text())))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert re.search(expected, str(e.value)), str(e.value)


def test_truncated_safetensors(tmp_path, net, cfg):
    path = save_checkpoint(net, tmp_path / "w.safetensors", config=cfg)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.safetensors: not a readable safetensors file"):
        load_checkpoint(path)


class Payload:
    """Unpickling this runs os.mkdir: exactly what weights_only exists to refuse."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pt_with_pickled_object_is_refused(tmp_path, net):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": net.state_dict(), "hook": Payload(str(marker))}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, config=make_config())
    msg = str(e.value)
    assert msg.startswith(f"{path}: refused by torch.load(weights_only=True): ")
    assert "mkdir" in msg and msg.endswith("(only tensors and plain containers are loaded, never pickled objects or code)")
    assert len(msg) < len(str(path)) + 200  # torch's advice paragraphs are left out
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"definitely not a checkpoint", "refused by torch.load"),
        (b"junk", "not a readable torch checkpoint (error: "),  # struct.error from the legacy reader
        ("truncated", "not a readable torch checkpoint"),
        ([torch.zeros(2)], "holds a list, not a state dict"),
        ({"epoch": 3, "best": 0.5}, "holds a dict with keys ['epoch', 'best'], not a state dict"),
    ],
)
def test_pt_that_is_not_a_state_dict(tmp_path, net, cfg, content, expected):
    path = tmp_path / "model.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncated":
        torch.save(net.state_dict(), path)
        path.write_bytes(path.read_bytes()[:5000])
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, config=cfg)
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value), str(e.value)


def test_missing_file_and_unknown_suffix(tmp_path, cfg):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown checkpoint type '\.ckpt'"):
        load_checkpoint(tmp_path / "w.ckpt", config=cfg)


@pytest.mark.parametrize(
    ("name", "options", "roi"),
    [("swin_unetr", {"feature_size": 12}, (64, 32, 32)), ("unet", {"features": [4, 4, 8, 16, 32, 4]}, (16, 16, 32))],
)
def test_round_trip_other_nets(tmp_path, name, options, roi):
    cfg = make_config(name, options=options, roi=roi)
    net = make_net(cfg)
    path = save_checkpoint(net, tmp_path / f"{name}.safetensors", config=cfg)
    loaded = load_checkpoint(path, config=cfg)
    assert type(loaded.net) is type(net) and loaded.config == cfg
    expected = net.state_dict()
    got = loaded.net.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(outputs(loaded.net, roi), outputs(net, roi))
