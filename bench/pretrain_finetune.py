"""Does self-supervised pretraining help with few labels? Pretrain vs. scratch on the demo phantoms.

1. Writes the demo's phantom set (12 training, 2 validation, 4 test phantoms).
2. ``medvit pretrain`` of the net's encoder on the 12 training images, their labels unused.
3. Fine-tunes from that encoder (``model.pretrained``) with the first ``--labelled`` training cases,
   and trains the same net from scratch with the same cases, seed, epochs and steps.
4. Segments the 4 held-out phantoms with each net's last checkpoint and prints mean Dice of both,
   the per-epoch training loss curves and the validation Dice; writes ``summary.json`` in ``--out``.

With ``--seeds``, the whole comparison (phantoms, pretraining, both fine-tunings) repeats per seed
and the summary gives each start's Dice per seed, their mean and standard deviation, and the
per-seed difference. Run it alone under the heavy-run lock (it trains three nets a seed); the
settings of ``docs/benchmarks.md``::

    flock /tmp/medvit_heavy.lock python bench/pretrain_finetune.py --out /tmp/pretrain_bench \
        --pretrain-epochs 24 --pretrain-batch 4 --pretrain-crops 2 --finetune-epochs 40 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def _curve(run: Path) -> tuple[list[float], list[tuple[int, float]]]:
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    loss = [round(r["loss"], 4) for r in lines]
    val = [(r["epoch"], round(r["val_mean_dice"], 4)) for r in lines if r.get("val_mean_dice") is not None]
    return loss, val


def _test_dice(ckpt: Path, phantoms: Path, test: list[dict], labels: dict, out: Path) -> float:
    from medvit.checkpoint import load_checkpoint
    from pipelines.volume.evaluate import evaluate_files
    from pipelines.engine import Engine
    from pipelines.volume.segment import segment_case, volume_settings

    model = load_checkpoint(ckpt)
    engine = Engine(volume_settings(model.config, device="cpu"))
    scores = []
    for item in test:
        r = segment_case([str(phantoms / item["image"])], model, out, engine=engine)
        rep = evaluate_files(r.labels_path, phantoms / item["label"], labels=labels)
        scores.append(np.mean([rep["labels"][labels[k]]["dice"] for k in sorted(labels) if k]))
    return float(np.mean(scores))


def _one_seed(args, seed: int, out: Path) -> dict:
    """Pretrain, then fine-tune from it and from scratch, for one seed (phantoms, crops, init)."""
    from medvit.config import parse_config
    from medvit.data.phantom import LABELS
    from pipelines.volume.demo import demo_config, write_phantom_set
    from pipelines.volume.pretrain import pretrain
    from pipelines.volume.train import train

    out.mkdir(parents=True)
    phantoms = out / "phantoms"
    n_train, n_val, n_test = args.phantoms
    full = write_phantom_set(phantoms, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)
    lists = json.loads(full.read_text())
    few = phantoms / "few.json"
    few.write_text(json.dumps({**lists, "training": lists["training"][: args.labelled]}))

    base = demo_config(args.net)
    base["train"].update(datalist=str(few), epochs=args.finetune_epochs, val_every=args.val_every, seed=seed,
                         warmup_epochs=1)
    base["pretrain"] = {"datalist": str(full), "output_dir": str(out / "pretrain"), "epochs": args.pretrain_epochs,
                        "batch_size": args.pretrain_batch, "num_samples": args.pretrain_crops,
                        "lr": base["train"]["lr"] / 2, "seed": seed}
    t0 = time.time()
    ckpt = pretrain(parse_config(copy.deepcopy(base)), progress=False)
    t_pre = time.time() - t0
    pre_log = [json.loads(s) for s in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    crops = args.pretrain_batch * args.pretrain_crops
    print(f"seed {seed}: pretrained {args.net} encoder on {len(lists['training'])} unlabelled phantoms "
          f"({args.pretrain_epochs} epochs, {crops} crops a step) in {t_pre:.0f} s")
    for r in pre_log:
        tasks = ", ".join(f"{t} {r[t]:.3f} (w {r['weight'][t]:.2f})" for t in r["weight"])
        print(f"  epoch {r['epoch']}: {tasks}")

    results = {}
    for name, pretrained in (("scratch", None), ("pretrained", ckpt)):
        raw = copy.deepcopy(base)
        raw.pop("pretrain")
        raw["train"]["output_dir"] = str(out / name)
        if pretrained is not None:
            raw["model"]["pretrained"] = str(pretrained)
        torch.manual_seed(seed)
        t0 = time.time()
        res = train(parse_config(raw), progress=False)
        seconds = time.time() - t0
        loss, val = _curve(res.output_dir)
        dice = _test_dice(res.output_dir / "last.safetensors", phantoms, lists["test"], LABELS, out / f"{name}_seg")
        results[name] = {"test_mean_dice": round(dice, 4), "train_loss": loss, "val_mean_dice": val,
                         "steps": res.global_step, "seconds": round(seconds, 1)}
        print(f"{name:>10s}: test mean Dice {dice:.3f} on {len(lists['test'])} phantoms, {res.global_step} steps, "
              f"{seconds:.0f} s\n            loss {loss}\n            validation Dice {val}")
    return {"seed": seed, "pretrain_seconds": round(t_pre, 1), "pretrain_log": pre_log, **results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="work folder (replaced)")
    ap.add_argument("--net", default="dformer", help="a net with an encoder and a demo configuration")
    ap.add_argument("--labelled", type=int, default=3, help="labelled training cases for fine-tuning")
    ap.add_argument("--pretrain-epochs", type=int, default=8)
    ap.add_argument("--pretrain-batch", type=int, default=2, help="volumes a pretraining step")
    ap.add_argument("--pretrain-crops", type=int, default=1, help="random crops per volume a step")
    ap.add_argument("--finetune-epochs", type=int, default=20)
    ap.add_argument("--val-every", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="one whole run (phantoms, pretraining, both fine-tunings) per seed")
    ap.add_argument("--phantoms", type=int, nargs=3, default=(12, 2, 4), metavar=("TRAIN", "VAL", "TEST"),
                    help="phantoms written per split (the demo's 12 2 4)")
    args = ap.parse_args()

    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    runs = [_one_seed(args, seed, args.out / f"seed{seed}") for seed in args.seeds]
    summary = {"net": args.net, "labelled": args.labelled, "pretrain_epochs": args.pretrain_epochs,
               "pretrain_crops_per_step": args.pretrain_batch * args.pretrain_crops,
               "finetune_epochs": args.finetune_epochs, "runs": runs}
    for name in ("scratch", "pretrained"):
        d = np.array([r[name]["test_mean_dice"] for r in runs])
        summary[name] = {"test_mean_dice": [float(x) for x in d], "mean": round(float(d.mean()), 4),
                         "sd": round(float(d.std(ddof=1)), 4) if len(d) > 1 else None}
        print(f"{name:>10s}: test mean Dice per seed {d.round(3).tolist()}, mean {d.mean():.3f}")
    diff = np.array([r["pretrained"]["test_mean_dice"] - r["scratch"]["test_mean_dice"] for r in runs])
    summary["pretrained_minus_scratch"] = [round(float(x), 4) for x in diff]
    print(f"pretrained - scratch per seed: {diff.round(3).tolist()}")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
