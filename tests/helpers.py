"""What the tests share: tiny configs and phantom sets, in-process CLI runs with the user-error
check, a LiDAR training set, and sparse-voxel references. DICOM writers: ``helpers_dicom.py``;
fixtures: ``conftest.py``. No test file imports another."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from medvit.data.phantom import LABELS, make_phantom
from pointcloud.structure import SparseVoxels


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

TINY = {
    "labels": LABELS,
    "preprocess": {"orientation": "RAS", "spacing": [8.0, 8.0, 8.0], "intensity": {"modality": "ct", "window": [-1000.0, 600.0]}},
    "model": {"name": "unetr", "roi_size": [32, 32, 32], "options": TINY_UNETR},
    "infer": {"overlap": 0.25, "sw_batch_size": 2},
}
"""A tiny UNETR's config on 8 mm phantoms: the volume CLI tests' checkpoint (``ckpt`` in conftest)."""


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
    :data:`TINY`'s config, its intensity preprocessing CT or (``"mri"``) MRI."""
    import copy

    from medvit.checkpoint import save_checkpoint
    from medvit.config import parse_config
    from medvit.nets import build_net

    cfg = copy.deepcopy(TINY)
    if modality == "mri":
        cfg["preprocess"]["intensity"] = {"modality": "mri"}
    cfg = parse_config(cfg)
    torch.manual_seed(0)
    return save_checkpoint(build_net(cfg.model), folder / f"tiny_{modality}.safetensors", config=cfg)


def assert_checkpoint_round_trip(cfg, cls: type, shape: tuple[int, ...], folder: Path) -> None:
    """``cfg``'s net (seed 0, eval) saved and loaded back is a ``cls`` in eval mode giving equal
    outputs on a fixed input of ``shape``; a net of another seed gives different ones."""
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


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``medvit ARGS`` in this process: (exit status, stdout, stderr)."""
    from pipelines.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(args, capsys, *needles, out_dir: Path | None = None):
    """``medvit ARGS`` fails as a user error: exit 2, one line on stderr holding every needle, no
    traceback, and nothing in ``out_dir``. Returns that line."""
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and err.count("\n") == 1, err
    for n in needles:
        assert n in err, (n, err)
    if out_dir is not None:
        assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())
    return err


TINY_LIDAR = {
    "labels": {0: "ground", 1: "building", 2: "car", 3: "pole", 4: "vegetation"},
    "features": {"intensity": 1.0},
    "voxel_size": 0.4,
    "model": {"name": "sparse_unet", "options": {"channels": [8, 16, 16], "point_mlp": 8}},
    "infer": {"tile_size": 30.0, "overlap": 0.25, "max_points": 8000},
}
"""A tiny sparse U-Net's LiDAR config: the LiDAR CLI tests' checkpoint."""


def lidar_train_set(folder: Path, n_scans: int = 2) -> Path:
    """``n_scans`` synthetic KITTI scans (seeded) for training plus one for validation, cropped to
    40 m, and their datalist ``folder/dl.json``; returns the datalist."""
    from pipelines.lidar.demo import write_kitti
    from pointcloud.data.synthetic import make_scene

    rng = np.random.default_rng(3)
    items = []
    for i in range(n_scans + 1):
        c = make_scene(rng)
        keep = np.all(np.abs(c.xyz[:, :2]) < 20, 1)
        write_kitti(c.xyz[keep], c.feature("intensity")[keep], c.labels[keep], folder / f"s{i}")
        items.append({"image": f"s{i}.bin", "label": f"s{i}.label"})
    dl = folder / "dl.json"
    dl.write_text(json.dumps({"training": items[:-1], "validation": items[-1:]}))
    return dl


def random_sites(n: int, side: int, batch: int = 2, seed: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` unique random ``(batch, z, y, x)`` int64 sites per grid of ``side^3``, rows shuffled
    (no reliance on sorted input); drawn from ``generator`` when given, else from ``seed``."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    rows = []
    for b in range(batch):
        lin = torch.randperm(side**3, generator=g)[:n]
        rows.append(torch.stack([torch.full_like(lin, b), lin // side**2, (lin // side) % side, lin % side], 1))
    idx = torch.cat(rows)
    return idx[torch.randperm(len(idx), generator=g)]


def random_voxels(n: int, side: int, channels: int, batch: int = 2, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> SparseVoxels:
    """:func:`random_sites` with random features ``(M, channels)`` of ``dtype``, one generator."""
    g = torch.Generator().manual_seed(seed)
    idx = random_sites(n, side, batch, generator=g)
    feats = torch.randn(len(idx), channels, generator=g, dtype=dtype)
    return SparseVoxels(feats, idx, (side,) * 3, batch)


def at_sites(dense: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(M, C)`` at ``(batch, z, y, x)`` sites."""
    i = indices.long()
    return dense[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]]


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """Ours/spconv ``(C_out, kz, ky, kx, C_in)`` -> conv3d ``(C_out, C_in, kz, ky, kx)``."""
    return weight.permute(0, 4, 1, 2, 3)
