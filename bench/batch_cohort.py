"""Cases per minute of ``medvit batch`` with 1 and 2 workers, against one ``medvit segment`` process a case.

A cohort of synthetic CT phantoms (the demo's generator, its default spacing) is segmented by the
demo's UNETR configuration (untrained weights: the same work as trained ones) three ways, each a
fresh command as a user runs it: one ``medvit segment`` process per case, one after another (what a
shell loop over a cohort does, as TotalSegmentator is often run); ``medvit batch --workers 1``;
``medvit batch --workers 2``. Each wall time includes everything the user waits for (interpreter,
imports, checkpoint loads; Ray's start for ``batch``). The per-process overhead that actors save is
measured on its own: the wall time of a process that imports the segment pipeline and loads the
checkpoint, and nothing else.

    flock /tmp/medvit_heavy.lock python bench/batch_cohort.py --cases 8 --json bench/results/cpu_batch.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from pipelines.bench.engine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> float:
    # each command's own default threads, as a user's shell gives them
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | {"PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    return wall



def _setup(folder: Path, n: int) -> Path:
    import nibabel as nib
    import numpy as np
    import torch

    from medvit.checkpoint import save_checkpoint
    from medvit.config import parse_config
    from medvit.data.phantom import make_phantom
    from medvit.nets import build_net
    from pipelines.volume.demo import DEMO_CONFIG

    cfg = copy.deepcopy(DEMO_CONFIG)
    cfg.pop("train")
    cfg = parse_config(cfg)
    torch.manual_seed(0)
    ckpt = save_checkpoint(build_net(cfg.model), folder / "unetr.safetensors", config=cfg)
    rng = np.random.default_rng(0)
    (folder / "cases").mkdir()
    for i in range(n):
        p = make_phantom(rng)
        nib.save(nib.Nifti1Image(np.round(p.image).astype(np.int16), p.affine), folder / "cases" / f"case{i:03d}.nii.gz")
    return ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    res: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "load_average_at_start": os.getloadavg(),
                 "cases": a.cases, "net": "demo UNETR (feature 16, hidden 96), 48³ windows, 3 mm"}
    with tempfile.TemporaryDirectory(prefix="medvit_batch_bench_") as tmp:
        folder = Path(tmp)
        ckpt = _setup(folder, a.cases)
        cases = sorted((folder / "cases").iterdir())
        load = [_run(["-c", "from medvit.checkpoint import load_checkpoint; import pipelines.volume.segment; "
                            f"load_checkpoint({str(ckpt)!r})"]) for _ in range(3)]
        res["process_start_and_load_s"] = statistics.median(load)
        per = [_run(["-m", "pipelines.cli", "segment", str(c), "-o", str(folder / "seg"), "--checkpoint", str(ckpt),
                     "--no-progress"]) for c in cases]
        res["segment_per_process"] = {"wall_s": sum(per), "case_median_s": statistics.median(per),
                                      "cases_per_min": 60 * a.cases / sum(per)}
        print(f"one process a case: {sum(per):.1f} s, {60 * a.cases / sum(per):.1f} cases/min", flush=True)
        for workers in (1, 2):
            wall = _run(["-m", "pipelines.cli", "batch", str(folder / "cases"), "-o", str(folder / f"b{workers}"),
                         "--checkpoint", str(ckpt), "--workers", str(workers), "--no-progress"])
            res[f"batch_workers_{workers}"] = {"wall_s": wall, "cases_per_min": 60 * a.cases / wall}
            print(f"batch --workers {workers}: {wall:.1f} s, {60 * a.cases / wall:.1f} cases/min", flush=True)
        res["saved_vs_per_process_s"] = sum(per) - res["batch_workers_1"]["wall_s"]
        res["load_cost_per_process_total_s"] = a.cases * res["process_start_and_load_s"]
    print(json.dumps(res, indent=1))
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
