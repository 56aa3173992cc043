"""Trained checkpoints on OpenVINO and ONNX Runtime: do the label maps equal torch's, end to end?

For each demo folder (what ``medvit demo --net NET -o FOLDER`` leaves: ``run/best.safetensors`` and
the held-out ``phantoms/test/phantom_*.nii.gz`` with their ``*_label.nii.gz``), runs ``medvit
segment`` on the held-out phantoms and on the real CT once on torch and twice per converted
runtime (the first run converts into an empty cache, the second finds the conversion there), each
as its own process, as a user would. Prints, per net and runtime: the wall seconds of both runs,
the runtime that ran (from the sidecar), the share of voxels whose label equals torch's (all held-out
phantoms together, and the real CT), and the held-out mean Dice against the ground truth
(``medvit evaluate``'s, averaged over the cases).

    python bench/runtime_agreement.py --run unetr=/tmp/demo_unetr --run swin_unetr=/tmp/demo_swin \\
        --json bench/results/cpu_runtimes_trained.json

Measure alone: every run is timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medvit.runtimes import CONVERTED, backends
from pipelines.bench.engine import cpu_name
from pipelines.volume.demo import shared_data_dir
from pipelines.volume.evaluate import evaluate_files
from pipelines.volume.segment import case_name

ROOT = Path(__file__).resolve().parents[1]


def segment(inputs: list[Path], out: Path, checkpoint: Path, runtime: str, cache: Path) -> float:
    """Wall seconds of one ``medvit segment`` process writing into ``out``."""
    cmd = [sys.executable, "-m", "pipelines.cli", "segment", *map(str, inputs), "-o", str(out),
           "--checkpoint", str(checkpoint), "--runtime", runtime, "--no-progress"]
    env = {**os.environ, "MEDVIT_CACHE": str(cache)}
    t = time.perf_counter()
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"segment on {runtime} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall


def labels(folder: Path, case: str) -> np.ndarray:
    return np.asarray(nib.load(folder / f"{case}_seg.nii.gz").dataobj)


def ran(folder: Path, case: str) -> str:
    return json.loads((folder / f"{case}_seg.json").read_text()).get("runtime", {}).get("ran", "torch")


def bench_run(net: str, folder: Path, ct: Path, runtimes: list[str], tmp: Path) -> list[dict]:
    checkpoint = folder / "run" / "best.safetensors"
    phantoms = sorted(p for p in (folder / "phantoms" / "test").glob("phantom_*.nii.gz") if "_label" not in p.name)
    if not checkpoint.is_file() or not phantoms:
        raise SystemExit(f"{folder}: expected run/best.safetensors and phantoms/test/phantom_*.nii.gz (a medvit demo folder)")
    cases = [case_name(p) for p in phantoms]
    ct_case = case_name(ct)
    inputs = [*phantoms, ct]
    rows = []
    ref = None
    for runtime in ["torch", *runtimes]:
        cache = tmp / f"cache-{net}"
        first = tmp / net / runtime / "first"
        walls = [segment(inputs, first, checkpoint, runtime, cache)]
        if runtime != "torch":
            walls.append(segment(inputs, tmp / net / runtime / "second", checkpoint, runtime, cache))
        got = {c: labels(first, c) for c in [*cases, ct_case]}
        if ref is None:
            ref = got
        same = sum(int((got[c] == ref[c]).sum()) for c in cases)
        total = sum(ref[c].size for c in cases)
        rows.append({
            "net": net, "runtime": runtime, "ran": sorted({ran(first, c) for c in [*cases, ct_case]}),
            "wall_first_s": walls[0], "wall_second_s": walls[-1] if len(walls) > 1 else None,
            "phantom_voxels": total, "phantom_voxels_differing": total - same, "phantom_equal": same / total,
            "ct_voxels": int(ref[ct_case].size), "ct_voxels_differing": int((got[ct_case] != ref[ct_case]).sum()),
            "ct_equal": float((got[ct_case] == ref[ct_case]).mean()),
            "held_out_mean_dice": float(np.mean([
                evaluate_files(first / f"{c}_seg.nii.gz", folder / "phantoms" / "test" / f"{c}_label.nii.gz")["mean_dice"]
                for c in cases])),
            "cases": len(cases),
        })
        print(f"  {net} {runtime}: done", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, metavar="NET=FOLDER",
                    help="a net's name and its medvit demo folder (repeatable)")
    ap.add_argument("--ct", type=Path, default=shared_data_dir() / "totalsegmentator" / "example_ct.nii.gz")
    ap.add_argument("--runtimes", default=",".join(CONVERTED))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runs = [tuple(r.split("=", 1)) for r in args.run]
    if any(len(r) != 2 for r in runs):
        ap.error("--run takes NET=FOLDER")
    runtimes = [r for r in args.runtimes.split(",") if r]
    if not args.ct.is_file():
        ap.error(f"--ct: {args.ct} is not a file")
    with tempfile.TemporaryDirectory(prefix="medvit-bench-agreement-") as tmp:
        rows = [row for net, folder in runs for row in bench_run(net, Path(folder), args.ct, runtimes, Path(tmp))]

    print(f"medvit segment on the held-out phantoms and {args.ct.name}; {cpu_name()}; {os.cpu_count()} CPUs")
    head = (f"{'net':<13} {'runtime':<12} {'ran':<12} {'1st run s':>9} {'2nd run s':>9} {'phantoms = torch':>16} "
            f"{'CT = torch':>11} {'held-out Dice':>13}")
    print(head)
    print("-" * len(head))
    for r in rows:
        second = "-" if r["wall_second_s"] is None else f"{r['wall_second_s']:.1f}"
        print(f"{r['net']:<13} {r['runtime']:<12} {','.join(r['ran']):<12} {r['wall_first_s']:>9.1f} {second:>9} "
              f"{r['phantom_equal']:>16.4%} {r['ct_equal']:>11.4%} {r['held_out_mean_dice']:>13.4f}")
    if args.json:
        machine = {"cpu": cpu_name(), "cpus": os.cpu_count(), "date": datetime.date.today().isoformat(),
                   "versions": {p: backends.version(p) for p in ("torch", "onnxscript", *CONVERTED)}}
        args.json.write_text(json.dumps({"machine": machine, "ct": str(args.ct), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
