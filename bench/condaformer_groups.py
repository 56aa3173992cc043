"""ConDaFormer's smallest window group (``MIN_GROUP_SIZE``) against scan latency, on one device.

Plane windows run in size groups, one attention call per group, each padded to its largest
window; a huge value puts every window in one group, padded to the largest (SST-style). On the
CPU small groups win; on a GPU, where a small scan is bound by kernel launches and host syncs (each
group costs several), fewer groups may win (``docs/benchmarks.md``). This times the bench's ConDaFormer (equal width,
as ``medvit bench lidar``) on the real scans at each value, median of 3 after a warm-up.

On the GPU machine (carry ``.whl`` with ``--spconv`` and ``.gpu_data/mmdet3d/demo/data``):
    source bench/gpu_env.sh && python3 bench/condaformer_groups.py --device cuda --data .gpu_data
Here: python3 bench/condaformer_groups.py --data ../shared/data --sizes 2,64
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from medvit.core.files import atomic_path
from pipelines.bench import lidar as bench_lidar
from pointcloud.nets import condaformer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--sizes", default="2,8,32,128,1048576", help="MIN_GROUP_SIZE values (1048576: one group)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    scans = bench_lidar.real_scans(a.data)
    if not scans:
        raise SystemExit(f"{a.data}: no mmdet3d demo scans under mmdet3d/demo/data")
    torch.set_grad_enabled(False)
    dev = torch.device(a.device)
    net = bench_lidar._net("condaformer", dev)
    rows = []
    for size in (int(v) for v in a.sizes.split(",")):
        condaformer.MIN_GROUP_SIZE = size
        for label, path in scans.items():
            r = bench_lidar.measure("scan", net, "condaformer", path, dev, 50.0)
            rows.append({"min_group_size": size, "input": label, "seconds": r["seconds"], "peak_gpu": r["peak_gpu"]})
            gpu = "" if r["peak_gpu"] is None else f", peak GPU {r['peak_gpu'] / 2**30:.2f} GiB"
            print(f"MIN_GROUP_SIZE {size:>8}  {label:<15} {r['seconds']:.4f} s{gpu}", flush=True)
            if a.json:
                with atomic_path(a.json) as tmp:
                    tmp.write_text(json.dumps({"device": str(dev), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
