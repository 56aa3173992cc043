"""``medvit bench lidar``: point-net backbones on real scans, and scene memory against scene size.

Part 1 runs each backbone in a fresh subprocess (one per backbone, its peak RSS counted
from each input's reading on) at equal width (same channels per level) on the real nuScenes sweep, the
real KITTI scan and a 1M-point synthetic map (the map through the engine's tiling):
latency, points per second, peak memory. Part 2 segments synthetic maps of 1M, 4M and
10M points with the same net and tiling, each in a fresh subprocess, and reports peak RSS
above the bare scene arrays: the engine's share should stay flat as scenes grow.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.engine.runner import sync_device

BACKBONES = ("sparse_unet", "flatformer", "condaformer")
WIDTH = [24, 48, 96, 96]
"""Channels per level for every backbone (ConDaFormer needs heads = width / 8 divisible by 3)."""
VOXEL = 0.1


def _status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _peak_rss() -> int:
    """Peak resident memory since the last :func:`_reset_peak` (the whole run where Linux's VmHWM is missing)."""
    return _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    return _status("VmRSS") or _peak_rss()


def _reset_peak() -> bool:
    """Restart the peak-RSS count (Linux: ``5`` to ``/proc/self/clear_refs``), so that reading
    the scene file (whose loader briefly holds a second copy) does not count as the engine's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _net(name: str, device: torch.device) -> torch.nn.Module:
    from pointcloud.nets import POINT_NETS

    torch.manual_seed(0)
    return POINT_NETS.build(name, {"channels": WIDTH}, in_channels=4, out_channels=5, voxel_size=VOXEL).to(device).eval()


def write_synthetic(n: int, folder: Path) -> Path:
    """A synthetic map of at least ``n`` points as ``.npz`` (xyz float64, intensity), made once per run."""
    from pointcloud.data.synthetic import make_aggregated_scene

    path = folder / f"synthetic_{n}.npz"
    if not path.is_file():
        # the street grows with the point count, so density (and so work per tile) stays the same
        c = make_aggregated_scene(np.random.default_rng(0), n_points_min=n, length=300.0 * max(1.0, n / 1_000_000))
        np.savez(path, xyz=c.xyz, feats=c.feature("intensity")[:, None].astype(np.float32))
    return path


def measure(kind: str, net, backbone: str, source: str, dev: torch.device, tile: float) -> dict:
    """One measurement: a single scan through the net (median of 3 after a warm-up), or a scene through tiling."""
    if source.endswith(".npz"):
        z = np.load(source)
        xyz, feats = z["xyz"], z["feats"]
    else:
        from pointcloud.io import read_points

        c = read_points(source)
        xyz, feats = c.xyz, c.feature("intensity")[:, None].astype(np.float32)
        if "nuscenes" in source or feats.max() > 1.5:
            feats = feats / 255.0  # nuScenes intensity is 0..255, KITTI's 0..1
    rss_data = _rss_now()
    reset = _reset_peak()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if kind == "scan":
        from pointcloud.structure import Point

        rel = (xyz - xyz.mean(0)).astype(np.float32)
        p = Point.from_clouds([rel], [np.c_[rel, feats]], device=dev)
        net(p)  # warm-up (kernel maps, allocator)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            net(p)
            sync_device(dev)
            times.append(time.perf_counter() - t0)
        seconds = float(np.median(times))
        tiles = calls = 1
        notes: list[str] = []
    else:
        from pipelines.engine import Engine, InferenceSettings
        from pipelines.engine.points import segment_scene

        engine = Engine(InferenceSettings(overlap=0.25, batch_size=1, device=dev))
        t0 = time.perf_counter()
        _, rep = segment_scene(engine, xyz, feats, net, tile_size=tile, max_points=150_000, coords_in_features=True)
        seconds = time.perf_counter() - t0
        tiles, calls, notes = rep.windows_run, rep.calls, rep.notes  # notes: out-of-memory fallbacks
    return {"kind": kind, "backbone": backbone, "source": source, "points": int(len(xyz)), "seconds": seconds,
            "points_per_s": len(xyz) / seconds, "tiles": tiles, "calls": calls, "notes": notes, "peak_rss": _peak_rss(), "rss_after_data": rss_data,
            "peak_reset_after_data": reset,
            "peak_gpu": int(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None}


def worker(backbone: str, device: str, tile: float, jobs: list[tuple[str, str]]) -> None:
    """Run ``jobs`` ((kind, source) pairs) with one net in this process, printing one JSON line each.

    One process per backbone instead of one per measurement: process start-up (imports, CUDA
    context, spconv) cost more than the GPU measurements themselves. Peak RSS is counted from
    each job's data read (``_reset_peak``), and peak GPU memory from each job's start.
    """
    from pipelines.engine.points import bounded_onednn_cache

    torch.set_grad_enabled(False)
    dev = torch.device(device)
    with bounded_onednn_cache():  # from the first kernel on, as `medvit lidar segment` runs
        net = _net(backbone, dev)
        for kind, source in jobs:
            print(json.dumps(measure(kind, net, backbone, source, dev, tile)), flush=True)


def _spawn(backbone: str, device: str, tile: float, jobs: list[tuple[str, str]]):
    """Yield one result per job from a worker process; the jobs it did not reach get an error row."""
    cmd = [sys.executable, "-m", "pipelines.bench.lidar", backbone, device, str(tile), *[f"{k}:{s}" for k, s in jobs]]
    # stderr to a file, not a pipe: a worker that logs more than a pipe holds would block
    # while this process waits on its stdout
    with tempfile.TemporaryFile("w+") as errf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errf, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        done = 0
        try:
            for line in proc.stdout:
                if line.startswith("{"):
                    done += 1
                    yield json.loads(line)
            proc.wait()
        finally:
            if proc.poll() is None:  # the caller stopped early
                proc.kill()
                proc.wait()
        errf.seek(0)
        err = errf.read().strip()
    for _ in jobs[done:]:
        yield {"error": err.splitlines()[-1] if err else f"exit {proc.returncode}"}


def run(data_dir: Path, *, device: str = "cpu", sizes=(1_000_000, 4_000_000, 10_000_000), tile: float = 50.0,
        on_row=None) -> dict:
    """Every measurement; ``on_row(partial result)`` is called after each one (so a run stopped
    by a time limit still leaves what it measured)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _run(data_dir, Path(tmp), device=device, sizes=sizes, tile=tile, on_row=on_row or (lambda res: None))


def real_scans(data_dir: Path) -> dict[str, str]:
    """The bench's real scans found under ``data_dir`` (the shared data), by label."""
    scans = {
        "nuScenes sweep": next((data_dir / "mmdet3d/demo/data/nuscenes").glob("*.pcd.bin"), None),
        "KITTI scan": data_dir / "mmdet3d/demo/data/kitti/000008.bin",
    }
    return {label: str(path) for label, path in scans.items() if path is not None and Path(path).is_file()}


def _run(data_dir: Path, tmp: Path, *, device: str, sizes, tile: float, on_row) -> dict:
    rows: list[dict] = []
    scaling: list[dict] = []
    res = {"backbones": rows, "scaling": scaling, "width": WIDTH, "voxel": VOXEL, "tile": tile}
    scans = real_scans(data_dir)
    synthetic = str(write_synthetic(1_000_000, tmp))
    for b in BACKBONES:
        jobs = [("scan", path) for path in scans.values()] + [("scene", synthetic)]
        labels = [*scans, "synthetic 1M map (tiled)"]
        for label, r in zip(labels, _spawn(b, device, tile, jobs)):
            rows.append({"input": label, "backbone": b, **r})
            on_row(res)
    for n in sizes:
        [r] = list(_spawn("flatformer", device, tile, [("scene", str(write_synthetic(n, tmp)))]))
        scaling.append({"input": f"synthetic {n / 1e6:g}M map", **r})
        on_row(res)
    return res


def _gib(b) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def format_result(res: dict) -> str:
    rows_all = [r for r in res["backbones"] + res["scaling"] if "error" not in r]
    gpu = any(r.get("peak_gpu") is not None for r in rows_all)  # a GPU run: peak GPU memory too

    def gpu_col(r: dict | None) -> str:
        if not gpu:
            return ""
        return f" {'peak GPU GiB':>13}" if r is None else f" {_gib(r.get('peak_gpu')):>13}"

    out = [f"lidar bench: equal width {res['width']}, voxel {res['voxel']} m, tiles {res['tile']} m", "",
           f"{'input':<26} {'backbone':<12} {'points':>10} {'latency s':>10} {'points/s':>11} {'tiles':>6} {'calls':>6} {'peak RSS GiB':>13}"
           + gpu_col(None)]
    order = {k: i for i, k in enumerate(dict.fromkeys(r["input"] for r in res["backbones"]))}
    for r in sorted(res["backbones"], key=lambda r: (order[r["input"]], BACKBONES.index(r["backbone"]))):
        if "error" in r:
            out.append(f"{r['input']:<26} {r['backbone']:<12} failed: {r['error']}")
            continue
        out.append(f"{r['input']:<26} {r['backbone']:<12} {r['points']:>10,} {r['seconds']:>10.2f} {r['points_per_s']:>11,.0f} "
                   f"{r['tiles']:>6} {r.get('calls', '-'):>6} {_gib(r['peak_rss']):>13}" + gpu_col(r))
    out += ["", "scene size vs memory (flatformer, tiled):",
            f"{'input':<22} {'points':>11} {'seconds':>8} {'peak RSS GiB':>13} {'RSS after reading GiB':>22} {'engine share GiB':>17}"
            + gpu_col(None)]
    for r in res["scaling"]:
        if "error" in r:
            out.append(f"{r['input']:<22} failed: {r['error']}")
            continue
        out.append(f"{r['input']:<22} {r['points']:>11,} {r['seconds']:>8.1f} {_gib(r['peak_rss']):>13} "
                   f"{_gib(r['rss_after_data']):>22} {_gib(r['peak_rss'] - r['rss_after_data']):>17}" + gpu_col(r))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    a = argv if argv is not None else sys.argv[1:]
    backbone, device, tile, *jobs = a
    worker(backbone, device, float(tile), [tuple(j.split(":", 1)) for j in jobs])


if __name__ == "__main__":
    main()
