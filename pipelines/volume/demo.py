"""``medvit demo``: the embedded default job, end to end on synthetic phantoms and one real CT.

1. Writes a phantom set (NIfTI, varied spacing and orientation) with a MONAI datalist.
2. Trains a small UNETR on the CPU (its time: the README's demo table), or with ``--net NAME``
   another registered volume net in the small CPU configuration :data:`DEMO_NETS` holds for it.
3. Segments the held-out phantoms through the full read → transform → engine → invert →
   write path and scores them against their true labels.
4. Segments the real CT ``totalsegmentator/example_ct.nii.gz`` from the shared data folder
   to show the real-file path works; the phantom-trained net's labels there are not scored.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import numpy as np
import yaml

from medvit.data.phantom import LABELS, make_phantom
from medvit.core.errors import ConfigError
from medvit.core.files import atomic_path, make_output_folder
from medvit.io import write_image, write_label_map

DEMO_CONFIG: dict = {
    "labels": LABELS,
    "preprocess": {
        "orientation": "RAS",
        "spacing": [3.0, 3.0, 3.0],
        "intensity": {"modality": "ct", "window": [-250.0, 350.0]},
        "crop_foreground": True,  # to the body: voxels above -500 HU
        "crop_margin": 4,
    },
    # no flips or turns (left/right matters to the organs), and small intensity jitter only:
    # the classes differ by about 0.1 in the window
    "augment": {"num_samples": 2, "flip_prob": 0.0, "rot90_prob": 0.0, "shift_intensity": 0.02, "shift_prob": 0.3,
                "scale_prob": 0.0},
    "model": {
        "name": "unetr",
        "in_channels": 1,
        "roi_size": [48, 48, 48],
        "options": {"feature_size": 16, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4},
    },
    "train": {
        "datalist": "phantoms/datalist.json",
        "output_dir": "run",
        "epochs": 32,
        "batch_size": 1,
        "lr": 2e-3,
        "weight_decay": 1e-5,
        "warmup_epochs": 2,
        "val_every": 8,
        "seed": 0,
        "amp": True,
    },
    "infer": {"overlap": 0.25, "sw_batch_size": 4},
}

DEMO_NETS: dict[str, dict] = {
    # net name -> its ``model`` block and the ``train`` keys it changes in DEMO_CONFIG; each is
    # chosen to reach mean Dice >= 0.90 on the held-out phantoms within 10 minutes on 2 CPU cores
    "unetr": {"model": DEMO_CONFIG["model"]},
    "swin_unetr": {
        # five halvings: sizes are multiples of 32, and 64 on two axes leaves instance norm a
        # 2x2x1 bottleneck; one block a stage keeps a step near UNETR's
        "model": {"name": "swin_unetr", "in_channels": 1, "roi_size": [64, 64, 32],
                  "options": {"feature_size": 12, "depths": [1, 1, 1, 1]}},
        "train": {"epochs": 24},
    },
    "unet": {
        "model": {"name": "unet", "in_channels": 1, "roi_size": [48, 48, 48],
                  "options": {"features": [16, 16, 32, 64, 128, 16]}},
        "train": {"epochs": 24},
    },
    "dformer": {
        # 2x2x2 patches and 4x4x4 groups keep a 24-token grid on 48^3 windows; the higher rate
        # moves the LayerNorm-ed embeddings far enough apart for kidney and spine to separate
        "model": {"name": "dformer", "in_channels": 1, "roi_size": [48, 48, 48],
                  "options": {"embed_dim": 24, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8],
                              "patch_size": [2, 2, 2], "group_size": [4, 4, 4]}},
        "train": {"lr": 5e-3, "epochs": 40},
    },
    "transunet3d": {
        # four stages (16..128 channels) leave a 6x6x6 token grid on 48^3 windows; a two-block
        # ViT of width 96 keeps a step near the CNN baseline's
        "model": {"name": "transunet3d", "in_channels": 1, "roi_size": [48, 48, 48],
                  "options": {"strides": [1, 2, 2, 2], "base_features": 16, "max_features": 128,
                              "vit_layers": 2, "vit_hidden": 96, "vit_heads": 4, "vit_mlp": 192,
                              "vit_dropout": 0.0}},
        "train": {"epochs": 40},
    },
    "cswin_unet3d": {
        # stride-4 stem: 12/6/3/2-token stages on 48^3 windows, the conv decoder's full-resolution
        # skip restoring the detail; stripes of 1 and 2 tokens where the grid is larger than them
        "model": {"name": "cswin_unet3d", "in_channels": 1, "roi_size": [48, 48, 48],
                  "options": {"embed_dim": 24, "depths": [2, 2, 2, 2], "num_heads": [3, 3, 6, 12],
                              "stripe_widths": [1, 2, 2, "full"], "stem_stride": 4, "feature_size": 16}},
        "train": {"epochs": 40},
    },
}
"""Every registered volume net's small CPU configuration for ``medvit demo --net NAME``."""

DEFAULT_NET = "unetr"

N_TRAIN, N_VAL, N_TEST = 12, 2, 4


def demo_config(net: str) -> dict:
    """:data:`DEMO_CONFIG` (a deep copy) with ``net``'s model block and training keys from :data:`DEMO_NETS`.

    Raises :class:`~medvit.core.errors.ConfigError` naming ``--net`` and the nets that have a demo
    configuration when ``net`` is not one of them.
    """
    from medvit.nets import NETS

    runnable = [n for n in NETS.names() if n in DEMO_NETS]
    if net not in runnable:
        why = "is registered but has no demo configuration" if net in NETS else "is not a registered net"
        raise ConfigError(f"--net {net!r} {why}; choose one of: {', '.join(runnable)}")
    entry = DEMO_NETS[net]
    cfg = copy.deepcopy(DEMO_CONFIG)
    cfg["model"] = copy.deepcopy(entry["model"])
    cfg["train"].update(entry.get("train", {}))
    return cfg


def default_output(net: str) -> Path:
    """The demo's folder when ``-o`` is not given: ``demo_out`` for UNETR (the default job), else
    ``demo_NET_out``, so that runs of several nets keep apart and say which net made them."""
    return Path("demo_out" if net == DEFAULT_NET else f"demo_{net}_out")


def shared_data_dir() -> Path:
    """The shared real-data folder: ``MEDVIT_TEST_DATA``, default ``../shared/data``."""
    return Path(os.environ.get("MEDVIT_TEST_DATA", "../shared/data"))


def write_phantom_set(
    folder: Path,
    *,
    seed: int,
    n_train: int = N_TRAIN,
    n_val: int = N_VAL,
    n_test: int = N_TEST,
    spacing: tuple[float, float, float] | None = None,
) -> Path:
    """Write phantoms as NIfTI (int16 HU images, uint8 labels) and a datalist; returns the datalist path."""
    rng = np.random.default_rng(seed)
    lists: dict[str, list[dict[str, str]]] = {"training": [], "validation": [], "test": []}
    for split, n in (("training", n_train), ("validation", n_val), ("test", n_test)):
        for i in range(n):
            p = make_phantom(rng, spacing=spacing)
            stem = f"{split}/phantom_{i:03d}"
            (folder / split).mkdir(parents=True, exist_ok=True)
            write_image(np.round(p.image).astype(np.int16), p.affine, folder / f"{stem}.nii.gz")
            write_label_map(p.label, p.affine, folder / f"{stem}_label.nii.gz")
            lists[split].append({"image": f"{stem}.nii.gz", "label": f"{stem}_label.nii.gz"})
    datalist = folder / "datalist.json"
    with atomic_path(datalist) as tmp:
        Path(tmp).write_text(json.dumps({"labels": {str(k): v for k, v in LABELS.items()}, **lists}, indent=1))
    return datalist


def write_run_config(out: str | Path, config: dict, *, seed: int, data: str, name: str) -> tuple[Path, dict, Path]:
    """Make ``out`` and write a demo's config there (a deep copy of ``config`` with the seed, the
    datalist under ``out/data`` and the run folder ``out/run``); returns ``(out, config, path)``."""
    out = Path(out)
    make_output_folder(out)
    raw = json.loads(json.dumps(config))
    raw["train"].update(seed=seed, datalist=str((out / data / "datalist.json").resolve()),
                        output_dir=str((out / "run").resolve()))
    path = out / name
    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(raw, sort_keys=False))
    return out, raw, path


def run_demo(
    out: Path,
    *,
    device: str = "cpu",
    seed: int = 0,
    config: dict | None = None,
    counts: tuple[int, int, int] = (N_TRAIN, N_VAL, N_TEST),
    phantom_spacing: tuple[float, float, float] | None = None,
) -> dict:
    """Run the demo into ``out``; returns the summary it prints (Dice per label and mean).

    ``config``, ``counts`` (training, validation, test phantoms) and ``phantom_spacing``
    (default: drawn per case) exist so tests can run the same path on a tiny set.
    """
    from medvit.checkpoint import load_checkpoint
    from medvit.config import load_config
    from pipelines.engine import Engine
    from pipelines.volume.evaluate import evaluate_files
    from pipelines.volume.train import train
    from pipelines.volume.segment import segment_case, volume_settings

    t_start = time.time()
    out, raw, cfg_path = write_run_config(out, config or DEMO_CONFIG, seed=seed, data="phantoms", name="config.yaml")

    print(f"[1/4] writing the phantom set to {out / 'phantoms'}", flush=True)
    n_train, n_val, n_test = counts
    write_phantom_set(out / "phantoms", seed=seed, n_train=n_train, n_val=n_val, n_test=n_test, spacing=phantom_spacing)
    cfg = load_config(cfg_path)

    print(f"[2/4] training {cfg.model.name} on {n_train} phantoms ({cfg.train.epochs} epochs, {device})", flush=True)
    t0 = time.time()
    res = train(cfg, device=device, restart=True)  # the demo's own folder: a rerun starts afresh
    t_train = time.time() - t0
    ckpt = res.output_dir / "best.safetensors"
    print(f"      done in {t_train:.0f} s; best validation mean Dice {res.best_metric:.3f}; checkpoint {ckpt}", flush=True)

    print("[3/4] segmenting held-out phantoms", flush=True)
    model = load_checkpoint(ckpt, device=device)
    seg_dir = out / "segmentations"
    test = json.loads((out / "phantoms" / "datalist.json").read_text())["test"]
    per_case = []
    engine = Engine(volume_settings(model.config, device=device))
    for item in test:
        img = out / "phantoms" / item["image"]
        r = segment_case([str(img)], model, seg_dir, engine=engine, stats=True, preview=True)
        per_case.append(evaluate_files(r.labels_path, out / "phantoms" / item["label"], labels=cfg.labels))
    names = [LABELS[k] for k in sorted(LABELS) if k]
    dice = {n: float(np.mean([c["labels"][n]["dice"] for c in per_case])) for n in names}
    mean = float(np.mean(list(dice.values())))
    for n in names:
        print(f"      {n:<10s} Dice {dice[n]:.3f}")
    print(f"      mean Dice over {len(test)} held-out phantoms: {mean:.3f}", flush=True)

    print("[4/4] segmenting a real CT with the phantom-trained net (no Dice: phantoms are not anatomy)", flush=True)
    real = shared_data_dir() / "totalsegmentator" / "example_ct.nii.gz"
    real_out = None
    if real.is_file():
        r = segment_case([str(real)], model, out / "real_ct", engine=engine, stats=True, preview=True)
        real_out = str(r.labels_path)
        print(f"      {real} -> {r.labels_path} (same geometry as the input)")
    else:
        print(f"      skipped: {real} not found (set MEDVIT_TEST_DATA to the shared data folder)")

    summary = {"net": cfg.model.name, "mean_dice": mean, "dice": dice, "train_seconds": round(t_train, 1),
               "total_seconds": round(time.time() - t_start, 1), "checkpoint": str(ckpt),
               "segmentations": str(seg_dir), "real_ct_labels": real_out}
    with atomic_path(out / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1))
    print(f"done in {summary['total_seconds']:.0f} s; outputs under {out} (summary.json)")
    return summary
