"""Small phantom sets and tiny configs shared by the pipeline tests."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import yaml

from medvit.data.phantom import LABELS, make_phantom


def require_tool(name: str) -> str:
    """The path of command-line tool ``name``; skips the test when it is missing, except under CI
    (``CI`` set), where a missing validator is a broken install and fails the test."""
    import pytest

    # console scripts of the test's own environment (dcmqi's) come first, then PATH
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (scripts/setup.sh installs it)")
        pytest.skip(f"{name} is not installed")
    return path


TINY_UNETR = {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}


def write_tiny_set(folder: Path, *, n_train: int = 4, n_val: int = 1, n_test: int = 1, seed: int = 0) -> Path:
    """Coarse phantoms (about 40 voxels a side) as NIfTI plus a datalist; returns the datalist."""
    from medvit.io import write_image, write_label_map

    rng = np.random.default_rng(seed)
    lists: dict[str, list] = {}
    for split, n in (("training", n_train), ("validation", n_val), ("test", n_test)):
        lists[split] = []
        for i in range(n):
            p = make_phantom(rng, spacing=(8.0, 8.0, 8.0))
            img, lab = folder / f"{split}_{i}.nii.gz", folder / f"{split}_{i}_label.nii.gz"
            write_image(np.round(p.image).astype(np.int16), p.affine, img)
            write_label_map(p.label, p.affine, lab)
            lists[split].append({"image": img.name, "label": lab.name})
    dl = folder / "datalist.json"
    dl.write_text(json.dumps(lists))
    return dl


def tiny_config(folder: Path, datalist: Path, *, out: str = "run", **train) -> Path:
    """A config for a tiny UNETR on 32³ windows of 8 mm phantoms; returns its path."""
    cfg = {
        "labels": LABELS,
        "preprocess": {"orientation": "RAS", "spacing": [8.0, 8.0, 8.0],
                       "intensity": {"modality": "ct", "window": [-1000.0, 600.0]}},
        "augment": {"num_samples": 1},
        "model": {"name": "unetr", "roi_size": [32, 32, 32], "options": TINY_UNETR},
        "train": {"datalist": str(datalist), "output_dir": str(folder / out), "epochs": 2, "batch_size": 1,
                  "lr": 1e-3, "val_every": 1, "cache": True, **train},
        "infer": {"overlap": 0.25, "sw_batch_size": 2},
    }
    path = folder / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def blob_batch(n: int, size=(8, 16, 16), seed: int = 0):
    """``n`` noisy volumes ``(n, 1, *size)`` with a bright box (label 1) and a dark box (label 2) at
    random places, and their float label maps (as MONAI's loaders give them): a task any of the nets
    learns in a few steps."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 1, *size, generator=g)
    y = torch.zeros(n, 1, *size)
    for i in range(n):
        for label, value in ((1, 2.0), (2, -2.0)):
            d, h, w = (int(torch.randint(0, s - s // 2 + 1, (1,), generator=g)) for s in size)
            sl = (i, 0, slice(d, d + size[0] // 2), slice(h, h + size[1] // 2), slice(w, w + size[2] // 2))
            x[sl] += value
            y[sl] = label
    return x, y


def fit_losses(net, size, *, lr: float, steps: int, deep_supervision: bool = False) -> list[float]:
    """DiceCE losses of ``steps`` AdamW steps of ``net`` (in training mode) on a
    :func:`blob_batch` of 4 volumes of ``size``; a deep-supervision net's outputs go through
    MONAI's ``DeepSupervisionLoss`` (weights 1, ½, ¼, ...), as ``medvit train`` does."""
    import torch
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    x, y = blob_batch(4, size=size)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    if deep_supervision:
        loss_fn = DeepSupervisionLoss(loss_fn, weight_mode="exp")
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = net(x)
        if deep_supervision:
            assert isinstance(out, tuple) and len(out) >= 2, type(out)
            loss = loss_fn(list(out), y)
        else:
            loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def train_and_segment(tmp_path: Path, capsys, model: dict) -> dict:
    """The whole user path for a net: ``medvit train`` 2 epochs on 2 tiny phantoms with the config's
    ``model`` block, then ``medvit segment`` a held-out phantom with the best checkpoint. Asserts
    both exit 0, two finite epoch losses, and labels on the input's grid (shape, affine to 1e-4);
    returns the net options the checkpoint recorded."""
    import math

    import nibabel as nib

    from tests.test_cli import run_cli

    dl = write_tiny_set(tmp_path / "data", n_train=2)
    cfg = tiny_config(tmp_path, dl, epochs=2)
    d = yaml.safe_load(cfg.read_text())
    d["model"] = model
    cfg.write_text(yaml.safe_dump(d))
    code, _, err = run_cli(["train", str(cfg), "--no-progress"], capsys)
    assert code == 0, err
    run = Path(d["train"]["output_dir"])
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    case = dl.parent / json.loads(dl.read_text())["test"][0]["image"]
    code, _, err = run_cli(["segment", str(case), "-o", str(tmp_path / "seg"), "--checkpoint",
                            str(run / "best.safetensors")], capsys)
    assert code == 0, err
    seg = nib.load(next((tmp_path / "seg").glob("*_seg.nii.gz")))
    src = nib.load(case)
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    return json.loads((run / "best.json").read_text())["net"]["options"]


def tiny_checkpoint(folder: Path, modality: str = "ct") -> Path:
    """A freshly initialised (seed 0) tiny UNETR checkpoint ``folder/tiny_MODALITY.safetensors`` with
    ``tests.test_cli.TINY``'s config, its intensity preprocessing CT or (``"mri"``) MRI."""
    import copy

    import torch

    from medvit.checkpoint import save_checkpoint
    from medvit.config import parse_config
    from medvit.nets import build_net
    from tests.test_cli import TINY

    cfg = copy.deepcopy(TINY)
    if modality == "mri":
        cfg["preprocess"]["intensity"] = {"modality": "mri"}
    cfg = parse_config(cfg)
    torch.manual_seed(0)
    return save_checkpoint(build_net(cfg.model), folder / f"tiny_{modality}.safetensors", config=cfg)


def assert_checkpoint_round_trip(cfg, cls: type, shape: tuple[int, ...], folder: Path) -> None:
    """``cfg``'s net (seed 0, eval) saved and loaded back is a ``cls`` in eval mode giving equal
    outputs on a fixed input of ``shape``; a net of another seed gives different ones."""
    import torch

    from medvit.checkpoint import load_checkpoint, save_checkpoint
    from medvit.nets import build_net

    torch.manual_seed(0)
    net = build_net(cfg.model).eval()
    x = torch.linspace(-1, 1, int(np.prod(shape))).reshape(shape).sin()
    loaded = load_checkpoint(save_checkpoint(net, folder / "best.safetensors", config=cfg))
    assert isinstance(loaded.net, cls) and not loaded.net.training
    with torch.no_grad():
        assert torch.equal(loaded.net(x), net(x))
        torch.manual_seed(1)
        assert not torch.equal(build_net(cfg.model).eval()(x), net(x))
