"""Self-supervised pretraining (``medvit pretrain``) and ``model.pretrained`` loading in ``medvit train``:
the task losses, the learned weighting, the encoder checkpoint, and the one-line errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from medvit.config import load_config, parse_config
from medvit.data.phantom import LABELS
from medvit.core.errors import CheckpointError, ConfigError
from medvit.nets import build_net
from medvit.nets.encoders import encoder_of
from pipelines.cli import main
from pipelines.volume.pretrain import (
    Pretrainer,
    cube_mask,
    info_nce,
    masked_mse,
    rotate_batch,
)
from tests.helpers import write_tiny_set

TINY_DFORMER = {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "patch_size": [2, 2, 2],
                "group_size": [2, 2, 2]}
ROI = [16, 16, 16]


def _config(folder: Path, datalist: Path, *, name: str = "cfg", model: dict | None = None, pretrained: Path | None = None,
            **pretrain) -> Path:
    model = dict(model or {"name": "dformer", "roi_size": ROI, "options": TINY_DFORMER})
    if pretrained is not None:
        model["pretrained"] = str(pretrained)
    cfg = {
        "labels": LABELS,
        "preprocess": {"orientation": "RAS", "spacing": [8.0, 8.0, 8.0],
                       "intensity": {"modality": "ct", "window": [-1000.0, 600.0]}},
        "augment": {"num_samples": 1},
        "model": model,
        "pretrain": {"datalist": str(datalist), "output_dir": str(folder / f"{name}_pre"), "epochs": 2,
                     "batch_size": 2, "num_samples": 1, "lr": 1e-3, **pretrain},
        "train": {"datalist": str(datalist), "output_dir": str(folder / f"{name}_run"), "epochs": 1,
                  "batch_size": 1, "max_steps_per_epoch": 1, "lr": 1e-3, "val_every": 1},
        "infer": {"overlap": 0.0, "sw_batch_size": 2},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return write_tiny_set(tmp_path_factory.mktemp("pre_set"), n_train=2, n_val=1, n_test=0)


@pytest.fixture(scope="module")
def pretrained(tiny_set, tmp_path_factory) -> Path:
    """An encoder checkpoint from ``medvit pretrain`` on the tiny set (CLI, all three tasks)."""
    folder = tmp_path_factory.mktemp("pre_run")
    cfg = _config(folder, tiny_set)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", str(cfg), "--device", "cpu", "--no-progress"])
    assert e.value.code == 0
    return folder / "cfg_pre" / "encoder.safetensors"


def _run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


# --- the tasks --------------------------------------------------------------------------------------

def test_inpainting_loss_counts_masked_voxels_only():
    gen = torch.Generator().manual_seed(0)
    mask = cube_mask(2, (12, 10, 8), 4, 0.25, gen)
    cells = 3 * 3 * 2  # ceil(12/4) * ceil(10/4) * ceil(8/4)
    chosen = round(0.25 * cells)
    # whole cubes chosen per sample (cut short at the edge)
    assert mask.shape == (2, 1, 12, 10, 8)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    coarse = mask[:, 0, ::4, ::4, ::4]
    assert coarse.flatten(1).sum(1).tolist() == [chosen, chosen]
    target = torch.rand(2, 2, 12, 10, 8, generator=gen)
    pred = target.clone()
    pred[mask.expand_as(pred) == 0] += 5.0  # wrong everywhere unmasked: no effect
    assert float(masked_mse(pred, target, mask)) == 0.0
    pred[mask.expand_as(pred) == 1] += 0.5  # off by 0.5 on every masked voxel
    assert float(masked_mse(pred, target, mask)) == pytest.approx(0.25)


def test_rotation_labels_name_the_turn():
    gen = torch.Generator().manual_seed(1)
    x = torch.arange(2 * 8 * 8 * 3, dtype=torch.float32).reshape(1, 2, 8, 8, 3).repeat(64, 1, 1, 1, 1)
    turned, k = rotate_batch(x, (0, 1), gen)
    assert set(k.tolist()) == {0, 1, 2, 3}  # 64 draws
    for s, q in zip(turned, k):
        # turning back by the label gives the crop; the label k means k quarter turns in the plane
        assert torch.equal(torch.rot90(s, -int(q), (1, 2)), x[0])
        assert torch.equal(s, torch.rot90(x[0], int(q), (1, 2)))
    assert not torch.equal(turned[k == 1][0], x[0])


def test_info_nce_of_identical_views_is_below_shuffled():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(8, 16, generator=gen)
    same = info_nce(z, z.clone(), 0.1)
    shuffled = info_nce(z, z[torch.roll(torch.arange(8), 1)], 0.1)
    assert float(same) < float(shuffled)
    assert float(same) < 0.1  # each view finds its twin


def test_contrast_projection_spreads_alike_crops_apart():
    # crops of one kind of image pool to nearly parallel features (cosine 0.99 for the demo's
    # dformer on phantoms); InfoNCE on projections that stay parallel sits at chance, ln(2n - 1),
    # with no gradient to leave it (seen in the pretraining bench); the projection's BatchNorm
    # centres them across the batch, as SimCLR's does
    cfg = parse_config({"labels": {0: "background", 1: "organ"},
                        "model": {"name": "dformer", "roi_size": [16, 16, 16],
                                  "options": {"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4],
                                              "patch_size": [2, 2, 2], "group_size": [2, 2, 2]}},
                        "pretrain": {"folder": ".", "tasks": ["contrast"]}})
    torch.manual_seed(0)
    net = build_net(cfg.model)
    model = Pretrainer(net, encoder_of(net), cfg).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 16, 16, 16, generator=gen) + 0.2 * torch.rand(8, 1, 16, 16, 16, generator=gen)

    def mean_cosine(v: torch.Tensor) -> float:
        v = torch.nn.functional.normalize(v, dim=1)
        return float(((v @ v.T).sum() - len(v)) / (len(v) * (len(v) - 1)))

    with torch.no_grad():
        pooled = model.encoder.encode(x).mean((2, 3, 4))
        projected = model.heads["contrast"](pooled)
    assert mean_cosine(pooled) > 0.9
    assert mean_cosine(projected) < 0.5


def test_uncertainty_weights_are_learned(tiny_set, tmp_path):
    cfg = load_config(_config(tmp_path, tiny_set))
    torch.manual_seed(0)
    net = build_net(cfg.model)
    model = Pretrainer(net, encoder_of(net), cfg)
    assert model.weighting.log_vars.tolist() == [0.0, 0.0, 0.0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, *ROI, generator=gen)
    for _ in range(3):
        total, losses = model(x, gen)
        assert set(losses) == {"inpaint", "rotation", "contrast"}
        expected = sum(torch.exp(-s) * losses[n] + s for n, s in zip(model.weighting.names, model.weighting.log_vars))
        assert float(total.detach()) == pytest.approx(float(expected.detach()))
        opt.zero_grad()
        total.backward()
        opt.step()
    moved = model.weighting.log_vars.detach().abs()
    assert bool((moved > 1e-3).all())


def test_swin_unetr_encoder_pretrains(tiny_set, tmp_path):
    model = {"name": "swin_unetr", "roi_size": [64, 32, 32], "options": {"feature_size": 12, "depths": [1, 1, 1, 1]}}
    cfg = load_config(_config(tmp_path, tiny_set, model=model, num_samples=2))
    net = build_net(cfg.model)
    enc = encoder_of(net)
    assert enc.prefixes == ("swinViT.",)
    x = torch.rand(2, 1, 64, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.encode(x), net.swinViT(x, net.normalize)[4])
    model = Pretrainer(net, enc, cfg)
    total, _ = model(x, torch.Generator().manual_seed(0))
    total.backward()
    # the encoder gets gradients, the segmentation decoder does not take part
    assert net.swinViT.patch_embed.proj.weight.grad is not None
    assert net.decoder1.conv_block.conv1.conv.weight.grad is None


# --- medvit pretrain and model.pretrained ----------------------------------------------------------

def test_pretrain_cli_writes_an_encoder_checkpoint(pretrained):
    sidecar = json.loads(pretrained.with_suffix(".json").read_text())
    assert sidecar["kind"] == "pretrain" and sidecar["net"]["name"] == "dformer"
    assert sidecar["net"]["options"] == TINY_DFORMER and sidecar["net"]["roi_size"] == ROI
    prefixes = tuple(sidecar["encoder_prefixes"])
    state = safetensors.torch.load_file(str(pretrained))
    net = build_net(load_config(pretrained.parent.parent / "cfg.yaml").model)
    assert sorted(state) == sorted(k for k in net.state_dict() if k.startswith(prefixes))
    assert not any(k.startswith(("decoder.", "head.", "expands.")) for k in state)
    lines = [json.loads(line) for line in (pretrained.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert set(r["weight"]) == {"inpaint", "rotation", "contrast"}
        assert all(r[t] > 0 for t in ("inpaint", "rotation", "contrast"))
    assert not list(pretrained.parent.glob(".*tmp*"))  # written atomically


def test_train_loads_exactly_the_encoder_keys(pretrained, tiny_set, tmp_path, capsys, caplog):
    from medvit.checkpoint import load_pretrained

    cfg = load_config(_config(tmp_path, tiny_set, pretrained=pretrained))
    assert cfg.model.pretrained == pretrained
    torch.manual_seed(123)
    net = build_net(cfg.model)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = safetensors.torch.load_file(str(pretrained))
    res = load_pretrained(net, cfg.model)
    after = net.state_dict()
    assert res.loaded == sorted(state)
    assert res.not_loaded == sorted(k for k in after if k not in state)
    for k in after:
        assert torch.equal(after[k], state[k] if k in state else before[k]), k
    assert any(not torch.equal(before[k], state[k]) for k in state)  # the load changed weights

    # through medvit train: it says what it loaded and trains on
    caplog.set_level(logging.WARNING)
    code, err = _run(["train", str(tmp_path / "cfg.yaml"), "--device", "cpu", "--no-progress"], capsys)
    assert code == 0, err
    assert f"model.pretrained: loaded {len(state)} encoder keys" in caplog.text
    assert "keep their fresh weights (decoder, decoder_norm, expands, fuse, head)" in caplog.text


def test_bad_pretrained_is_one_line_naming_the_key(pretrained, tiny_set, tmp_path, capsys):
    # a missing file
    cfg = _config(tmp_path, tiny_set, name="missing", pretrained=tmp_path / "nope.safetensors")
    code, err = _run(["train", str(cfg), "--no-progress", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "model.pretrained" in err and "no such checkpoint file" in err
    assert not (tmp_path / "missing_run").exists()  # nothing left behind

    # another net's encoder
    other = tmp_path / "other" / "encoder.safetensors"
    other.parent.mkdir()
    shutil.copy(pretrained, other)
    meta = json.loads(pretrained.with_suffix(".json").read_text())
    meta["net"]["name"] = "cswin_unet3d"
    other.with_suffix(".json").write_text(json.dumps(meta))
    cfg = _config(tmp_path, tiny_set, name="other", pretrained=other)
    code, err = _run(["train", str(cfg), "--no-progress", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "model.pretrained" in err and "'cswin_unet3d'" in err and "'dformer'" in err

    # the same net built with other options: shapes differ
    wider = {"name": "dformer", "roi_size": ROI, "options": {**TINY_DFORMER, "embed_dim": 16}}
    cfg = _config(tmp_path, tiny_set, name="wider", model=wider, pretrained=pretrained)
    code, err = _run(["train", str(cfg), "--no-progress", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "model.pretrained" in err and "has shape" in err

    # a trained net's checkpoint is not an encoder checkpoint: segment refuses it too
    with pytest.raises(CheckpointError, match="medvit pretrain"):
        from medvit.checkpoint import load_checkpoint

        load_checkpoint(pretrained)


def test_net_without_encoder_and_bad_pretrain_sections(tiny_set, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_set, name="unet",
                  model={"name": "unet", "roi_size": [32, 32, 32], "options": {"features": [4, 4, 8, 8, 16, 4]}})
    code, err = _run(["pretrain", str(cfg), "--no-progress", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "model.name" in err and "unet" in err and "no transformer encoder" in err
    assert not (tmp_path / "unet_pre").exists()

    base = yaml.safe_load(cfg.read_text())
    base["model"] = {"name": "dformer", "roi_size": ROI, "options": TINY_DFORMER}
    for pre, words in (({"output_dir": "x"}, "exactly one of 'datalist' or 'folder'"),
                       ({"folder": "f", "tasks": ["contrast"], "batch_size": 1, "num_samples": 1}, "two crops"),
                       ({"folder": "f", "tasks": ["jigsaw"]}, "pretrain.tasks")):
        with pytest.raises(ConfigError, match=words):
            parse_config({**base, "pretrain": pre}, tmp_path / "c.yaml")


def test_pretrain_reads_a_folder_of_images(tiny_set, tmp_path):
    from pipelines.volume.pretrain import image_files

    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(tiny_set.parent.glob("training_*.nii.gz")):
        if "label" not in p.name:
            shutil.copy(p, folder / p.name)
    raw = yaml.safe_load(_config(tmp_path, tiny_set).read_text())
    raw["pretrain"] = {"folder": "imgs"}
    cfg = parse_config(raw, tmp_path / "c.yaml")
    assert cfg.pretrain.folder == folder
    assert [Path(f["image"]).name for f in image_files(cfg)] == ["training_0.nii.gz", "training_1.nii.gz"]


def test_pretrain_refuses_a_folder_holding_a_run(pretrained, capsys):
    before = pretrained.read_bytes()
    code, err = _run(["pretrain", str(pretrained.parent.parent / "cfg.yaml"), "--no-progress", "--device", "cpu"], capsys)
    assert code == 2 and err.count("\n") == 1 and "already holds a pretraining run" in err
    assert pretrained.read_bytes() == before
