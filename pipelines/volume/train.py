"""Volume training: ``medvit train CONFIG``, the volume task of the shared loop in :mod:`pipelines.fit`.

MONAI's DiceCE loss on random patches (RandCropByPosNegLabeld and the configured
augmentation), weighted over the scales of a deep-supervision net by MONAI's
DeepSupervisionLoss (a mask-transformer net's prediction: the Hungarian set loss instead);
validation through the shared engine with MONAI's Dice (``compute_dice``) on the preprocessed grid,
checkpoints as safetensors with a JSON sidecar.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, list_data_collate
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import compute_dice
from monai.metrics.utils import do_metric_reduction
from monai.transforms import Compose, Randomizable

from medvit.checkpoint import load_pretrained, save_checkpoint
from medvit.config import Config
from medvit.data.datalist import read_datalist
from medvit.core.errors import ConfigError
from medvit.losses import HungarianMaskLoss
from medvit.nets import build_net
from medvit.nets.mask_transformer import MaskPrediction
from medvit.transforms import run_chain, train_transforms, val_transforms
from pipelines.engine import Engine, InferenceSettings, sliding_window_labels
from pipelines.fit import SeededSamples, TrainResult, _autocast, fit, lr_factor, prepared_output  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def split_random(chain: Compose) -> tuple[Compose, Compose]:
    """Split a chain before its first random transform: (deterministic part, the rest)."""
    ts = list(chain.transforms)
    first = next((i for i, t in enumerate(ts) if isinstance(t, Randomizable)), len(ts))
    return Compose(ts[:first]), Compose(ts[first:])


def validate(net: torch.nn.Module, loader, cfg: Config, device: torch.device, amp: bool,
             engine: Engine | None = None) -> dict[str, Any]:
    """Mean and per-label Dice of argmax predictions on the preprocessed validation grid (a label
    absent from a case's ground truth is left out of that label's mean, as MONAI's DiceMetric with
    ``ignore_empty`` reduces with ``mean_batch``). ``engine`` runs the windows (default a fresh one
    with the config's ``infer`` settings on ``device``; autocast is ``amp``'s, around it)."""
    if engine is None:
        engine = Engine(InferenceSettings.from_sources(cfg.infer, device=device, amp=False))
    n_classes = int(cfg.model.out_channels)
    # MONAI's functional Dice, not DiceMetric, whose buffers gather from every rank of a process
    # group: under DDP rank 0 validates alone
    scores = []
    net.eval()
    with torch.no_grad():
        for batch in loader:
            image = batch["image"].to(device)
            with _autocast(device, amp):
                pred = sliding_window_labels(image, net, roi_size=cfg.model.roi_size, engine=engine)[:, None].to(device)
            label = torch.as_tensor(batch["label"]).to(device).long()
            onehot = lambda t: torch.nn.functional.one_hot(t[:, 0], n_classes).movedim(-1, 1)  # noqa: E731
            scores.append(compute_dice(onehot(pred), onehot(label), include_background=False, ignore_empty=True))
    per, _ = do_metric_reduction(torch.cat(scores), "mean_batch")
    per = per.cpu()
    names = {i: cfg.labels.get(i, str(i)) for i in range(1, n_classes)}
    per_label = {names[i + 1]: (None if torch.isnan(v) else float(v)) for i, v in enumerate(per)}
    valid = [v for v in per_label.values() if v is not None]
    return {"mean_dice": float(np.mean(valid)) if valid else float("nan"), "per_label": per_label}




class CheckedCases(torch.utils.data.Dataset):
    """``chain`` over every case, run once now on this thread.

    A bad case (a corrupt file, a label on another grid, label values past the class count)
    fails here with its one-line error, before training starts, not hours in or on a cache
    thread. With ``cache`` the outputs are kept (as MONAI's CacheDataset would, without its
    thread pool); without, each case is read again when drawn.
    """

    def __init__(self, files: list[dict], chain: Compose, *, cache: bool):
        self.files, self.chain = files, chain
        items = []
        for f in files:
            out = run_chain(chain, f)
            if cache:
                items.append(out)
        self.items = items if cache else None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        return self.items[index] if self.items is not None else run_chain(self.chain, self.files[index])


class SegmentationLoss(torch.nn.Module):
    """DiceCE (softmax, one-hot label) on a net's logits, deep supervision included; the
    Hungarian set loss on a mask-classification net's prediction.

    ``outputs``: logits ``(B, K, D, H, W)``, or a deep-supervision net's tuple/list of them in
    nnU-Net's order, full resolution first, then coarser (a net's ``deep_supervision`` option,
    training mode only). Several outputs are weighted 1, 1/2, 1/4, ... (MONAI's
    :class:`~monai.losses.DeepSupervisionLoss`, ``weight_mode="exp"``, floored at 1/16) and summed,
    the label ``(B, 1, D, H, W)`` resized to each output's grid by ``nearest-exact`` interpolation.
    A first output on another grid than the label, or a later one larger than the one before it,
    is a RuntimeError (a net that breaks this contract is a bug, not a user's mistake).

    A :class:`~medvit.nets.mask_transformer.MaskPrediction` (a mask-transformer decoder in training
    mode) goes to :class:`~medvit.losses.HungarianMaskLoss` with ``num_classes`` classes (the
    config's ``out_channels``), its aux predictions included; without ``num_classes`` it is a
    RuntimeError.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)
        self.deep = DeepSupervisionLoss(self.dice_ce, weight_mode="exp")
        self.hungarian = None if num_classes is None else HungarianMaskLoss(num_classes)

    def forward(self, outputs: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor] | MaskPrediction,
                label: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, MaskPrediction):
            if self.hungarian is None:
                raise RuntimeError("a MaskPrediction needs SegmentationLoss(num_classes) for its Hungarian loss")
            return self.hungarian(outputs, label)
        if not isinstance(outputs, (tuple, list)):
            return self.dice_ce(outputs, label)
        shapes = [tuple(o.shape[2:]) for o in outputs]
        if not shapes or shapes[0] != tuple(label.shape[2:]):
            raise RuntimeError(f"a deep-supervision net must return the full-resolution output first: outputs on "
                               f"{shapes}, label on {tuple(label.shape[2:])}")
        if any(any(b > a for a, b in zip(big, small)) for big, small in zip(shapes, shapes[1:])):
            raise RuntimeError(f"a deep-supervision net's outputs must go from fine to coarse, got {shapes}")
        return self.deep(list(outputs), label)


class VolumeTask:
    """Random patches with DiceCE (:class:`SegmentationLoss`, deep supervision and mask-transformer
    predictions included); validation Dice on whole preprocessed volumes, from the full-resolution output only."""

    metric, per_label, collate = "mean_dice", "dice", staticmethod(list_data_collate)

    def __init__(self, cfg: Config):
        tc = cfg.train
        self.cfg = cfg
        self.files = read_datalist(tc.datalist, "training", base_dir=tc.data_root, need_label=True)
        val_files = read_datalist(tc.datalist, "validation", base_dir=tc.data_root, required=False, need_label=True)
        # the deterministic prefix of the training chain: cached; the random rest runs per sample
        self.fixed, self.rand = split_random(train_transforms(cfg))
        self.cases = CheckedCases(self.files, self.fixed, cache=tc.cache)
        self.val_loader = None
        if val_files:
            vds = CheckedCases(val_files, val_transforms(cfg), cache=tc.cache)
            self.val_loader = DataLoader(vds, batch_size=1, num_workers=0)
        self.loss_fn = SegmentationLoss(int(cfg.model.out_channels))
        self.engine: Engine | None = None  # one for every validation: what out-of-memory taught carries over

    def train_samples(self) -> SeededSamples:
        return SeededSamples(self.cases, self.rand, self.cfg.train.seed)

    def loss(self, net: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
        return self.loss_fn(net(batch["image"].to(device)), batch["label"].to(device))

    def validate(self, net: torch.nn.Module, device: torch.device, amp: bool) -> dict[str, Any] | None:
        if self.val_loader is None:
            return None
        if self.engine is None or self.engine.settings.device != torch.device(device):
            self.engine = Engine(InferenceSettings.from_sources(self.cfg.infer, device=device, amp=False))
        v = validate(net, self.val_loader, self.cfg, device, amp, self.engine)
        return {"score": v["mean_dice"], "per_label": v["per_label"]}

    def save(self, net: torch.nn.Module, path: Path, extra: dict[str, Any]) -> None:
        save_checkpoint(net, path, config=self.cfg, extra=extra)


def train(cfg: Config, *, device: str | torch.device = "cpu", resume: bool = False, progress: bool = True,
          restart: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.train.datalist``; checkpoints and metrics go to ``cfg.train.output_dir``.

    ``restart`` replaces an earlier run in that folder (the demo's); without it, or ``resume``, an
    earlier run there is an error (see :func:`pipelines.fit.prepare_output`). With ``model.pretrained``
    the encoder weights of that ``medvit pretrain`` checkpoint are loaded into the fresh net first
    (:func:`medvit.checkpoint.load_pretrained`; a one-line summary of the keys loaded and left is logged).
    """
    if cfg.train is None:
        raise ConfigError("config has no 'train' section")
    top = max(cfg.labels)
    unused = top + 1 - len(cfg.labels)
    if unused > len(cfg.labels):  # ids such as {0, 2000}: one output channel per id up to the largest
        log.warning("labels name %d ids up to %d: the net gets an output channel for each id 0..%d, %d of them "
                    "for ids no label has; numbering the labels 0..%d would train a smaller net", len(cfg.labels), top,
                    top, unused, len(cfg.labels) - 1)
    # the folder is checked before the data is read: a bad folder fails at once
    with prepared_output(cfg.train, resume=resume, restart=restart):
        # the net first: a bad model option fails before minutes of reading and checking cases
        torch.manual_seed(cfg.train.seed)
        net = build_net(cfg.model)
        if cfg.model.pretrained is not None and not resume:  # a resumed run has its own weights
            log.warning("%s", load_pretrained(net, cfg.model).summary())
        task = VolumeTask(cfg)
        return fit(task, net, cfg.train, device=device, resume=resume, progress=progress)
