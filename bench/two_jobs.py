"""Two torch jobs on one machine: per-step time alone and two at once.

Each job is a fresh process running training steps of one of the demos' nets (``lidar``: the
LiDAR demo's FlatFormer on two 30k-point crops of a synthetic sweep; ``volume``: the volume
demo's UNETR on a 48³ patch), forward + backward + AdamW, inside ``AdaptiveThreads`` with a tick
a step, as ``pipelines.fit`` runs them. A setting is the environment the jobs start with:
``medvit`` is the default (threads fitted to the cores other jobs leave), ``spin`` turns that off
(``MEDVIT_ADAPT_THREADS=0``: torch's threads and libgomp's defaults), and
``VAR=VALUE;VAR=VALUE`` adds variables to ``spin`` (say ``OMP_WAIT_POLICY=PASSIVE``). A job
written ``lidar:fixed`` in a pair keeps its threads in every setting (a process that does not
adapt, such as another program). For each setting the bench runs each job alone, then the pairs at
once, and prints the median step time and the ratios: two-at-once against alone, and each
setting's alone against ``spin``'s alone.

    python bench/two_jobs.py --steps 16 --json bench/results/two_jobs.json

Run it on an otherwise idle machine: it measures contention, so any other load distorts it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the variables a setting may set; every run starts with none of them, then its own
KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MEDVIT_ADAPT_THREADS")


def _lidar_step():
    import numpy as np
    import torch

    from pipelines.lidar.demo import DEMO_LIDAR_CONFIG
    from pointcloud.data.synthetic import make_scene
    from pointcloud.losses import CELovaszLoss
    from pointcloud.nets import POINT_NETS
    from pointcloud.structure import Point

    cfg = DEMO_LIDAR_CONFIG
    torch.manual_seed(0)
    net = POINT_NETS.build(cfg["model"]["name"], cfg["model"]["options"], in_channels=4, out_channels=len(cfg["labels"]),
                           voxel_size=cfg["voxel_size"])
    cloud = make_scene(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    crops = []
    for _ in range(2):
        idx = rng.choice(len(cloud.xyz), size=min(30_000, len(cloud.xyz)), replace=False)
        xyz = cloud.xyz[idx].astype(np.float32)
        feat = np.c_[xyz, cloud.feature("intensity")[idx]].astype(np.float32)
        crops.append((xyz, feat, cloud.labels[idx].astype(np.int64)))
    label = torch.from_numpy(np.concatenate([c[2] for c in crops]))
    loss_fn = CELovaszLoss(ignore_index=-100)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step():
        point = Point.from_clouds([c[0] for c in crops], [c[1] for c in crops])
        loss = loss_fn(net(point).float(), label)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _volume_step():
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    net = UNETR(in_channels=1, out_channels=6, img_size=(48, 48, 48), feature_size=16, hidden_size=96, mlp_dim=192,
                num_heads=4)
    x = torch.randn(1, 1, 48, 48, 48)
    y = torch.randint(0, 6, (1, 1, 48, 48, 48))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def step():
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _wait_for(folder: Path, prefix: str, n: int) -> None:
    while len(list(folder.glob(prefix + "*"))) < n:
        time.sleep(0.01)


def worker(job: str, steps: int, warmup: int, sync: Path, n_jobs: int) -> None:
    """Run ``steps`` timed steps of ``job`` (after ``warmup``) and print their times as JSON.

    The jobs of a pair start their timed steps together (files in ``sync``), and a job that is
    done keeps stepping, untimed, until the others are done, so every timed step shares the CPU.
    """
    import torch

    from pipelines.threads import AdaptiveThreads

    step = {"lidar": _lidar_step, "volume": _volume_step}[job]()
    with AdaptiveThreads() as adapt:
        for _ in range(warmup):
            step()
            adapt.tick()
        (sync / f"ready.{os.getpid()}").touch()
        _wait_for(sync, "ready.", n_jobs)
        times, threads = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            threads.append(adapt.tick())
        (sync / f"done.{os.getpid()}").touch()
        while len(list(sync.glob("done.*"))) < n_jobs:
            step()
            adapt.tick()
    print(json.dumps({"job": job, "times": times, "threads": threads}))


def setting_env(name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env["PYTHONPATH"] = str(ROOT)
    if name != "medvit":
        env["MEDVIT_ADAPT_THREADS"] = "0"
    if name not in ("medvit", "spin"):
        env.update(dict(kv.split("=", 1) for kv in name.split(",")))  # e.g. OMP_WAIT_POLICY=PASSIVE
    return env


def run_jobs(jobs: list[str], env: dict[str, str], steps: int, warmup: int) -> list[tuple[float, int]]:
    """Start ``jobs`` at once; the median step time of each (seconds) and its usual thread count."""
    with tempfile.TemporaryDirectory() as sync:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", job.split(":")[0], "--steps", str(steps),
                                   "--warmup", str(warmup), "--sync", sync, "--jobs", str(len(jobs))],
                                  env={**env, "MEDVIT_ADAPT_THREADS": "0"} if job.endswith(":fixed") else env,
                                  stdout=subprocess.PIPE, text=True) for job in jobs]
        out = []
        for p in procs:
            stdout, _ = p.communicate()
            if p.returncode:
                raise RuntimeError(f"a {jobs} worker failed with status {p.returncode}")
            res = json.loads(stdout.strip().splitlines()[-1])
            out.append((statistics.median(res["times"]), statistics.mode(res["threads"])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["lidar", "volume"])
    ap.add_argument("--sync", type=Path)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--settings", default="spin,medvit", help="comma list: spin, medvit, or VAR=VALUE;VAR=VALUE")
    ap.add_argument("--pairs", default="lidar+lidar,lidar+volume,lidar+volume:fixed")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.steps, a.warmup, a.sync, a.jobs)
        return

    settings = [s.replace(";", ",") for s in a.settings.split(",")]
    pairs = [p.split("+") for p in a.pairs.split(",")]
    res: dict = {"steps": a.steps, "nproc": os.cpu_count(), "settings": {}}
    for s in settings:
        env = setting_env(s)
        row: dict = {"env": {k: env[k] for k in KNOBS if k in env}, "alone": {}, "pairs": {}}
        for job in sorted({j.split(":")[0] for p in pairs for j in p}):
            (row["alone"][job], n), = run_jobs([job], env, a.steps, a.warmup)
            print(f"{s:>10s}  {job} alone: {row['alone'][job]:.3f} s/step ({n} threads)", flush=True)
        for p in pairs:
            got = run_jobs(p, env, a.steps, a.warmup)
            row["pairs"]["+".join(p)] = [{"job": j, "seconds": t, "threads": n} for j, (t, n) in zip(p, got)]
            slow = ", ".join(f"{j} {t:.3f} s/step, {n} threads ({t / row['alone'][j.split(':')[0]]:.1f}x alone)"
                             for j, (t, n) in zip(p, got))
            print(f"{s:>10s}  {'+'.join(p)} at once: {slow}", flush=True)
        res["settings"][s] = row
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
    base = res["settings"].get("spin")
    if base:
        for s, row in res["settings"].items():
            if s != "spin":
                for job, t in row["alone"].items():
                    print(f"{s} alone against spin alone, {job}: {t / base['alone'][job]:.3f}x the time")


if __name__ == "__main__":
    main()
