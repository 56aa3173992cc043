"""The training loop: ``medvit train CONFIG``.

AdamW with linear warm-up then cosine decay, MONAI's DiceCE loss, optional autocast on
CUDA, gradient accumulation, validation through the shared sliding-window engine with
MONAI's DiceMetric, best and last checkpoints written atomically, and exact resume.

Exact resume rests on one rule: every random draw is seeded from ``(seed, epoch)`` or
``(seed, epoch, sample index)``, never carried from draw to draw. The shuffle order of an
epoch comes from a generator seeded by ``(seed, epoch)``; the random transforms of one
sample from ``(seed, epoch, index)``. A run restarted from its last resume checkpoint
therefore sees the same next batch as the run that was killed, whatever the number of
loader workers.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, list_data_collate
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.transforms import Compose, Randomizable
from tqdm import tqdm

from medvit.checkpoint import save_checkpoint
from medvit.config import Config
from medvit.data.datalist import read_datalist
from medvit.errors import ConfigError, InputError
from medvit.io import atomic_path
from medvit.nets import build_net
from medvit.transforms import train_transforms, val_transforms
from pipelines.engine import sliding_window_labels

STATE_FILE = "last_state.pt"


def _mix(*parts: int) -> int:
    """A 31-bit seed from several integers (stable across runs and platforms)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def split_random(chain: Compose) -> tuple[Compose, Compose]:
    """Split a chain before its first random transform: (deterministic part, the rest)."""
    ts = list(chain.transforms)
    first = next((i for i, t in enumerate(ts) if isinstance(t, Randomizable)), len(ts))
    return Compose(ts[:first]), Compose(ts[first:])


class SeededSamples(torch.utils.data.Dataset):
    """Applies a random chain to cached samples with a seed fixed by (seed, epoch, index)."""

    def __init__(self, base: torch.utils.data.Dataset, chain: Compose, seed: int):
        self.base, self.chain, self.seed, self.epoch = base, chain, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Any:
        self.chain.set_random_state(seed=_mix(self.seed, self.epoch, index))
        return self.chain(self.base[index])


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` optimiser steps, then cosine decay to zero at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / span)))


@dataclass
class TrainResult:
    output_dir: Path
    best_metric: float | None
    best_epoch: int | None
    epochs_run: int
    global_step: int


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as tensors and ints, so the file loads with ``weights_only=True``."""
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_key, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "key": torch.tensor(py_key, dtype=torch.int64), "gauss": py_gauss},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["key"].tolist()), p["gauss"]))


def _save_state(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def validate(net: torch.nn.Module, loader, cfg: Config, device: torch.device, amp: bool) -> dict[str, Any]:
    """Mean and per-label Dice of argmax predictions on the preprocessed validation grid."""
    n_classes = int(cfg.model.out_channels)
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    net.eval()
    with torch.no_grad():
        for batch in loader:
            image = batch["image"].to(device)
            with _autocast(device, amp):
                pred = sliding_window_labels(
                    image,
                    net,
                    roi_size=cfg.model.roi_size,
                    sw_batch_size=cfg.infer.sw_batch_size,
                    overlap=cfg.infer.overlap,
                    mode=cfg.infer.mode,
                )[:, None].to(device)
            label = torch.as_tensor(batch["label"]).to(device).long()
            onehot = lambda t: torch.nn.functional.one_hot(t[:, 0], n_classes).movedim(-1, 1)  # noqa: E731
            metric(y_pred=onehot(pred), y=onehot(label))
    per = metric.aggregate().cpu()
    metric.reset()
    names = {i: cfg.labels.get(i, str(i)) for i in range(1, n_classes)}
    per_label = {names[i + 1]: (None if torch.isnan(v) else float(v)) for i, v in enumerate(per)}
    valid = [v for v in per_label.values() if v is not None]
    return {"mean_dice": float(np.mean(valid)) if valid else float("nan"), "per_label": per_label}


def train(cfg: Config, *, device: str | torch.device = "cpu", resume: bool = False, progress: bool = True) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.train.datalist``; see the module docstring."""
    if cfg.train is None:
        raise ConfigError("config has no 'train' section")
    tc = cfg.train
    device = torch.device(device)
    out = Path(tc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    if resume and not state_path.is_file():
        raise InputError(state_path, "nothing to resume: no resume checkpoint in the output folder")

    train_files = read_datalist(tc.datalist, "training", base_dir=tc.data_root)
    val_files = read_datalist(tc.datalist, "validation", base_dir=tc.data_root, required=False)

    fixed, rand = split_random(train_transforms(cfg))
    cached = CacheDataset(train_files, fixed, progress=False) if tc.cache else Dataset(train_files, fixed)
    train_ds = SeededSamples(cached, rand, tc.seed)
    val_loader = None
    if val_files:
        vds = CacheDataset(val_files, val_transforms(cfg), progress=False) if tc.cache else Dataset(val_files, val_transforms(cfg))
        val_loader = DataLoader(vds, batch_size=1, num_workers=0)

    torch.manual_seed(tc.seed)
    net = build_net(cfg.model).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    batches_per_epoch = math.ceil(len(train_ds) / tc.batch_size)
    if tc.max_steps_per_epoch:
        batches_per_epoch = min(batches_per_epoch, tc.max_steps_per_epoch * tc.accumulate)
    steps_per_epoch = math.ceil(batches_per_epoch / tc.accumulate)
    total_steps = steps_per_epoch * tc.epochs
    warmup = steps_per_epoch * tc.warmup_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, warmup=warmup, total=total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=tc.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())

    epoch, batch_in_epoch, global_step = 0, 0, 0
    best_metric, best_epoch = None, None
    if resume:
        st = torch.load(state_path, map_location=device, weights_only=True)
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        epoch, batch_in_epoch, global_step = st["epoch"], st["batch_in_epoch"], st["global_step"]
        best_metric, best_epoch = st["best_metric"], st["best_epoch"]
        _set_rng_state(st["rng"])

    log_path = out / "metrics.jsonl"
    amp = tc.amp and device.type == "cuda"
    bar = tqdm(total=total_steps, initial=global_step, disable=not progress, desc="train", unit="step", dynamic_ncols=True)

    def log(record: dict[str, Any]) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_resume_point() -> None:
        _save_state(
            state_path,
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "global_step": global_step,
                "best_metric": best_metric,
                "best_epoch": best_epoch,
                "rng": _rng_state(),
            },
        )

    while epoch < tc.epochs:
        train_ds.epoch = epoch
        torch.manual_seed(_mix(tc.seed, epoch, 1))  # dropout and other in-net randomness
        gen = torch.Generator().manual_seed(_mix(tc.seed, epoch, 2))
        order = torch.randperm(len(train_ds), generator=gen).tolist()
        order = order[batch_in_epoch * tc.batch_size : batches_per_epoch * tc.batch_size]
        loader = DataLoader(
            torch.utils.data.Subset(train_ds, order),
            batch_size=tc.batch_size,
            shuffle=False,
            num_workers=tc.num_workers,
            collate_fn=list_data_collate,
        )
        net.train()
        t0, losses = time.time(), []
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            with _autocast(device, amp):
                loss = loss_fn(net(image), label) / tc.accumulate
            scaler.scale(loss).backward()
            losses.append(float(loss.detach()) * tc.accumulate)
            batch_in_epoch += 1
            if batch_in_epoch % tc.accumulate == 0 or batch_in_epoch == batches_per_epoch:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
                global_step += 1
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(losses[-tc.accumulate:]):.4f}")
                if tc.checkpoint_every and global_step % tc.checkpoint_every == 0 and batch_in_epoch < batches_per_epoch:
                    save_resume_point()
        record = {"epoch": epoch + 1, "step": global_step, "loss": float(np.mean(losses)) if losses else None,
                  "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 3)}
        epoch, batch_in_epoch = epoch + 1, 0
        if val_loader is not None and (epoch % tc.val_every == 0 or epoch == tc.epochs):
            v = validate(net, val_loader, cfg, device, amp)
            record.update(val_mean_dice=v["mean_dice"], val_dice=v["per_label"])
            if best_metric is None or v["mean_dice"] > best_metric:
                best_metric, best_epoch = v["mean_dice"], epoch
                save_checkpoint(net, out / "best.safetensors", config=cfg, extra={"epoch": epoch, "val_mean_dice": best_metric})
            net.train()
        save_checkpoint(net, out / "last.safetensors", config=cfg, extra={"epoch": epoch, "global_step": global_step})
        save_resume_point()
        log(record)
    bar.close()
    return TrainResult(out, best_metric, best_epoch, epoch, global_step)
