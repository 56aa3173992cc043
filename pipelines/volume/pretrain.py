"""Self-supervised pretraining of a net's encoder: ``medvit pretrain CONFIG``.

Random crops of ``model.roi_size`` from unlabelled images train the encoder (see
:mod:`medvit.nets.encoders`) on up to three tasks, each with a light head on the bottleneck features:

- ``inpaint``: cubes of ``mask_cube`` voxels, a share ``mask_ratio`` of them, are zeroed; a head of
  transposed convolutions brings the bottleneck back to the crop's size and the mean squared error is
  taken over the masked voxels only;
- ``rotation``: each crop is turned 0, 90, 180 or 270 degrees in the first plane whose two crop sides
  are equal; a linear head on the average-pooled features predicts which (cross-entropy);
- ``contrast``: two views of each crop (random flips, intensity scale and shift, Gaussian noise); an
  MLP projection of the pooled features with BatchNorm as SimCLR's, InfoNCE over the batch (SimCLR's
  NT-Xent: each view's positive is the other view of its crop, every other view a negative).

The task losses are combined by learned uncertainty weighting (Kendall, Gal and Cipolla, 2018) in the
form ``sum_i exp(-s_i) * L_i + s_i`` with one learned log-variance ``s_i`` per task, started at 0;
the same form for the regression and the classification tasks (the paper's ½ factors of the
regression case are dropped). All inputs of a step go through the encoder in one batch.

Output folder: ``encoder.safetensors`` with its ``encoder.json`` sidecar (kind ``pretrain``: the
net's model block, its encoder prefixes, roi and preprocessing), rewritten atomically after every
epoch and holding the encoder's weights only, and ``metrics.jsonl`` (per epoch: each task's mean
loss, its log-variance and weight ``exp(-s)``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

import medvit
from medvit.checkpoint import PRETRAIN_KIND
from medvit.config import Config, dump_config
from medvit.core.errors import ConfigError, InputError, MedvitError
from medvit.core.weights import FORMAT, FORMAT_VERSION, write_weights
from medvit.io.formats import by_key, by_name
from medvit.nets import build_net
from medvit.nets.encoders import Encoder, encoder_of
from pipelines.fit import _mix, lr_factor
from pipelines.threads import AdaptiveThreads

log = logging.getLogger(__name__)

CHECKPOINT = "encoder.safetensors"


# --- the tasks, as functions of tensors --------------------------------------------------------

def cube_mask(batch: int, size: tuple[int, int, int], cube: int, ratio: float, gen: torch.Generator) -> Tensor:
    """``(batch, 1, *size)`` float mask, 1 on masked voxels: the crop cut into cubes of side ``cube``
    (the last ones cut short), ``max(1, round(ratio * cubes))`` of them chosen per sample."""
    cells = [math.ceil(s / cube) for s in size]
    n = math.prod(cells)
    k = max(1, round(ratio * n))
    mask = torch.zeros(batch, n)
    for b in range(batch):
        mask[b, torch.randperm(n, generator=gen)[:k]] = 1.0
    mask = mask.reshape(batch, 1, *cells)
    for axis in range(3):
        mask = mask.repeat_interleave(cube, dim=2 + axis)
    return mask[:, :, : size[0], : size[1], : size[2]].contiguous()


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error of ``pred`` against ``target`` ``(B, C, D, H, W)`` over the voxels where
    ``mask`` ``(B, 1, D, H, W)`` is 1; the other voxels do not count."""
    err = (pred - target).square() * mask
    return err.sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)


def rotation_plane(roi: tuple[int, int, int]) -> tuple[int, int] | None:
    """The first pair of spatial axes (0, 1), (0, 2), (1, 2) of equal crop size, else None."""
    return next(((a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if roi[a] == roi[b]), None)


def rotate_batch(x: Tensor, plane: tuple[int, int], gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each sample of ``x`` ``(B, C, D, H, W)`` turned ``k`` quarter turns (k in 0..3, drawn per sample)
    in the spatial ``plane``; returns the turned batch and the labels ``k`` ``(B,)``."""
    k = torch.randint(0, 4, (x.shape[0],), generator=gen)
    dims = (1 + plane[0], 1 + plane[1])  # sample axes: channel first
    return torch.stack([torch.rot90(s, int(q), dims) for s, q in zip(x, k)]), k


def info_nce(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent of two views ``(B, E)``: row i of ``z1`` and of ``z2`` are one crop's views, all others negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    n = z1.shape[0]
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def augment_view(x: Tensor, gen: torch.Generator) -> Tensor:
    """A random view of ``x`` ``(B, C, D, H, W)``: flips (each axis, p = ½), intensity × U(0.9, 1.1)
    + U(-0.1, 0.1), Gaussian noise σ = 0.05; drawn per sample."""
    out = []
    for s in x:
        axes = [1 + a for a in range(3) if torch.rand((), generator=gen) < 0.5]
        if axes:
            s = torch.flip(s, axes)
        scale = 0.9 + 0.2 * torch.rand((), generator=gen)
        shift = 0.2 * torch.rand((), generator=gen) - 0.1
        out.append(s * scale + shift + 0.05 * torch.randn(s.shape, generator=gen))
    return torch.stack(out)


class UncertaintyWeighting(nn.Module):
    """``sum_i exp(-s_i) * L_i + s_i`` over named losses, ``s_i`` learned log-variances started at 0."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.names = list(names)
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)))

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(torch.exp(-self.log_vars[i]) * losses[n] + self.log_vars[i] for i, n in enumerate(self.names))

    def weights(self) -> dict[str, float]:
        return {n: float(torch.exp(-s)) for n, s in zip(self.names, self.log_vars.detach())}


class InpaintHead(nn.Module):
    """Bottleneck ``(B, C, d, h, w)`` → ``(B, out, *size)``: transposed convs of stride 2 (or the odd
    factor left) per axis until the grid covers ``size``, channels halving (at least 8), GELU between,
    then a 1×1×1 conv; the result is cut to ``size``."""

    def __init__(self, channels: int, out_channels: int, grid: tuple[int, ...], size: tuple[int, ...]):
        super().__init__()
        self.size = tuple(size)
        left = [math.ceil(s / g) for s, g in zip(size, grid)]
        layers: list[nn.Module] = []
        ch = channels
        while any(f > 1 for f in left):
            step = tuple(2 if f % 2 == 0 else f for f in left)
            nxt = max(8, ch // 2)
            layers += [nn.ConvTranspose3d(ch, nxt, kernel_size=step, stride=step), nn.GELU()]
            left, ch = [f // s for f, s in zip(left, step)], nxt
        layers.append(nn.Conv3d(ch, out_channels, kernel_size=1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        d, h, w = self.size
        return self.body(x)[:, :, :d, :h, :w]


class Pretrainer(nn.Module):
    """A net with its encoder's task heads and the loss weighting; ``forward(x, gen)`` → (total, task losses)."""

    def __init__(self, net: nn.Module, encoder: Encoder, cfg: Config):
        super().__init__()
        pc = cfg.pretrain
        self.net, self.encoder, self.pc = net, encoder, pc
        self.roi = tuple(int(r) for r in cfg.model.roi_size)
        self.plane = rotation_plane(self.roi)
        if "rotation" in pc.tasks and self.plane is None:
            raise ConfigError(f"model.roi_size: rotation prediction turns crops in a plane of two equal sides; "
                              f"{list(self.roi)} has none (drop 'rotation' from pretrain.tasks or make two sizes equal)")
        with torch.no_grad():  # the bottleneck's channels and grid size the heads
            feat = encoder.encode(torch.zeros(1, cfg.model.in_channels, *self.roi))
        ch, grid = feat.shape[1], tuple(feat.shape[2:])
        self.heads = nn.ModuleDict()
        if "inpaint" in pc.tasks:
            self.heads["inpaint"] = InpaintHead(ch, cfg.model.in_channels, grid, self.roi)
        if "rotation" in pc.tasks:
            self.heads["rotation"] = nn.Linear(ch, 4)
        if "contrast" in pc.tasks:
            # SimCLR's projection: BatchNorm across the batch centres the pooled features, which
            # start nearly parallel for crops of one kind of image (cosine 0.99), so InfoNCE can tell them apart
            self.heads["contrast"] = nn.Sequential(nn.Linear(ch, ch), nn.BatchNorm1d(ch), nn.ReLU(), nn.Linear(ch, 128))
        self.weighting = UncertaintyWeighting(list(pc.tasks))

    def forward(self, x: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        b = x.shape[0]
        parts, extra = [], {}
        if "inpaint" in self.heads:
            mask = cube_mask(b, self.roi, self.pc.mask_cube, self.pc.mask_ratio, gen).to(x.device)
            parts.append(x * (1 - mask))
            extra["mask"] = mask
        if "rotation" in self.heads:
            turned, k = rotate_batch(x.cpu(), self.plane, gen)
            parts.append(turned.to(x.device))
            extra["k"] = k.to(x.device)
        if "contrast" in self.heads:
            parts += [augment_view(x.cpu(), gen).to(x.device) for _ in range(2)]
        feats = self.encoder.encode(torch.cat(parts)).split(b)  # one encoder pass for every task
        losses, i = {}, 0
        if "inpaint" in self.heads:
            losses["inpaint"] = masked_mse(self.heads["inpaint"](feats[i]), x, extra["mask"])
            i += 1
        if "rotation" in self.heads:
            losses["rotation"] = F.cross_entropy(self.heads["rotation"](feats[i].mean((2, 3, 4))), extra["k"])
            i += 1
        if "contrast" in self.heads:
            z1, z2 = self.heads["contrast"](torch.cat([f.mean((2, 3, 4)) for f in feats[i:i + 2]])).split(b)
            losses["contrast"] = info_nce(z1, z2, self.pc.temperature)
        return self.weighting(losses), losses


# --- data ---------------------------------------------------------------------------------------

def image_files(cfg: Config) -> list[dict]:
    """``[{"image": path}]`` from ``pretrain.datalist`` (its ``split``) or every NIfTI in ``pretrain.folder``."""
    pc = cfg.pretrain
    if pc.datalist is not None:
        from medvit.data.datalist import read_datalist

        return [{"image": e["image"]} for e in read_datalist(pc.datalist, pc.split, base_dir=pc.data_root)]
    folder = Path(pc.folder)
    if not folder.is_dir():
        raise InputError(folder, "pretrain.folder: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and by_name(p) is by_key("nifti"))
    if not files:
        raise InputError(folder, "pretrain.folder holds no .nii or .nii.gz images")
    return [{"image": str(p)} for p in files]


class CheckChannels:
    """Refuses an image whose channel count is not ``model.in_channels``, naming the file."""

    def __init__(self, in_channels: int):
        self.in_channels = in_channels

    def __call__(self, item: dict) -> dict:
        c = item["image"].shape[0]
        if c != self.in_channels:
            src = item["image"].meta.get("filename_or_obj", "image") if hasattr(item["image"], "meta") else "image"
            raise InputError(src, f"has {c} channels but model.in_channels is {self.in_channels}")
        return item


def pretrain_chains(cfg: Config):
    """(deterministic chain: load, preprocess, pad to the roi; random chain: ``num_samples`` crops of the roi)."""
    from monai.transforms import Compose, EnsureTyped, RandSpatialCropSamplesd, SpatialPadd

    from medvit.io import LoadVolumed
    from medvit.transforms.chains import preprocess_transforms

    roi = tuple(int(r) for r in cfg.model.roi_size)
    fixed = Compose([LoadVolumed(keys=["image"]), CheckChannels(cfg.model.in_channels),
                     *preprocess_transforms(cfg.preprocess, image_key="image"),
                     SpatialPadd(keys=["image"], spatial_size=roi)])
    rand = Compose([RandSpatialCropSamplesd(keys=["image"], roi_size=roi, num_samples=cfg.pretrain.num_samples,
                                            random_size=False),
                    EnsureTyped(keys=["image"], dtype=torch.float32, track_meta=False)])
    return fixed, rand


# --- the run ------------------------------------------------------------------------------------

def _sidecar(cfg: Config, encoder: Encoder, extra: dict[str, Any]) -> dict[str, Any]:
    dumped = dump_config(cfg)
    net = {k: v for k, v in dumped["model"].items() if k != "pretrained"}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": PRETRAIN_KIND,
            "medvit_version": medvit.__version__, "net": net, "labels": dumped["labels"],
            "preprocess": dumped["preprocess"], "encoder_prefixes": list(encoder.prefixes),
            "pretrain": dumped["pretrain"], "extra": extra}


def pretrain(cfg: Config, *, device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Pretrain ``cfg.model``'s encoder on ``cfg.pretrain``'s images; returns the checkpoint's path.

    Raises :class:`ConfigError` for a config without a ``pretrain`` section or a net without an
    encoder, :class:`InputError` for an output folder that already holds a run, missing images, or
    an image of the wrong channel count, :class:`MedvitError` when the loss diverges.
    """
    from pipelines.volume.train import CheckedCases

    pc = cfg.pretrain
    if pc is None:
        raise ConfigError("config has no 'pretrain' section")
    device = torch.device(device)
    torch.manual_seed(pc.seed)
    net = build_net(cfg.model)
    encoder = encoder_of(net, cfg.model.name)
    model = Pretrainer(net, encoder, cfg)

    from medvit.core.files import make_output_folder

    out = Path(pc.output_dir)
    if (out / "metrics.jsonl").exists() or (out / CHECKPOINT).exists():
        raise InputError(out, "already holds a pretraining run; choose another output folder")
    files = image_files(cfg)
    fixed, rand = pretrain_chains(cfg)
    cases = CheckedCases(files, fixed, cache=pc.cache)
    out = make_output_folder(out)

    model = model.to(device)
    opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if not n.startswith("weighting.")]},
                             {"params": [model.weighting.log_vars], "weight_decay": 0.0}],
                            lr=pc.lr, weight_decay=pc.weight_decay)
    steps_per_epoch = math.ceil(len(cases) / pc.batch_size)
    total = steps_per_epoch * pc.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup=0, total=total))
    bar = tqdm(total=total, disable=not progress, desc="pretrain", unit="step", dynamic_ncols=True)
    step = 0
    with AdaptiveThreads() as threads:
        for epoch in range(pc.epochs):
            t0 = time.time()
            gen = torch.Generator().manual_seed(_mix(pc.seed, epoch, 2))
            order = torch.randperm(len(cases), generator=gen).tolist()
            sums: dict[str, list[float]] = {n: [] for n in [*pc.tasks, "loss"]}
            model.train()
            for first in range(0, len(order), pc.batch_size):
                crops = []
                for index in order[first:first + pc.batch_size]:
                    rand.set_random_state(seed=_mix(pc.seed, epoch, index))
                    crops += [s["image"] for s in rand(cases[index])]
                x = torch.stack([torch.as_tensor(c) for c in crops]).to(device)
                total_loss, losses = model(x, gen)
                if not bool(torch.isfinite(total_loss)):
                    raise MedvitError(f"pretraining diverged: the loss is {float(total_loss)} at epoch {epoch + 1}; "
                                      f"lower pretrain.lr (now {pc.lr:g})")
                opt.zero_grad(set_to_none=True)
                total_loss.backward()
                threads.tick()
                opt.step()
                sched.step()
                step += 1
                sums["loss"].append(float(total_loss.detach()))
                for n, v in losses.items():
                    sums[n].append(float(v.detach()))
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, **{n: f"{v[-1]:.3f}" for n, v in sums.items()})
            record = {"epoch": epoch + 1, "step": step, **{n: float(np.mean(v)) for n, v in sums.items()},
                      "log_var": {n: float(s) for n, s in zip(pc.tasks, model.weighting.log_vars.detach())},
                      "weight": model.weighting.weights(), "lr": sched.get_last_lr()[0],
                      "seconds": round(time.time() - t0, 3)}
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            write_weights(net, out / CHECKPOINT, _sidecar(cfg, encoder, {"epoch": epoch + 1, "step": step}),
                          prefixes=encoder.prefixes)
    bar.close()
    return out / CHECKPOINT
