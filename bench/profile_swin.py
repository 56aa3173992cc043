"""Where one batch of SwinUNETR spends its time on one device: per top-level part, and per op.

The engine's time is within a few per cent of the model's own, so the issue's 2x-MONAI GPU target
(SwinUNETR, bf16, output on the GPU) depends on the net alone (``docs/benchmarks.md``). This
prints, for the
eager net with the speed-ups given (default SDPA), each top-level part's share (timed with
device events around its forward), and the ops with the most device time (``torch.profiler``,
self time, summed over calls). It runs once with cuDNN's default algorithms and once with
``cudnn_benchmark``, unless ``--speedups`` names the steps itself.

On the GPU machine (carry ``.whl``): source bench/gpu_env.sh && python3 bench/profile_swin.py --json $OUT/profile_swin.json
A dry run here: python3 bench/profile_swin.py --device cpu --feature-size 12 --batch 1 --speedups sdpa
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medvit.core.files import atomic_path
from medvit.nets.speedups import speed_up
from pipelines.bench.engine import Case, _input, _net, _time_batch, _window_batch
from pipelines.engine.runner import autocast_context, sync_device


class _PartClock:
    """Device time of each top-level child of ``net``, from events (CUDA) or the wall clock (CPU)
    around its forward; SwinUNETR calls each child in turn, so the parts add up to the net."""

    def __init__(self, net: torch.nn.Module, device: torch.device):
        self.device, self.ms, self.open = device, {}, {}
        for name, child in net.named_children():
            child.register_forward_pre_hook(lambda m, a, n=name: self._start(n))
            child.register_forward_hook(lambda m, a, y, n=name: self._stop(n))

    def _mark(self):
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _start(self, name: str) -> None:
        self.open[name] = self._mark()

    def _stop(self, name: str) -> None:
        self.ms.setdefault(name, []).append((self.open.pop(name), self._mark()))

    def totals(self) -> dict[str, float]:
        sync_device(self.device)
        out = {}
        for name, pairs in self.ms.items():
            if self.device.type == "cuda":
                out[name] = sum(a.elapsed_time(b) for a, b in pairs)
            else:
                out[name] = sum(b - a for a, b in pairs) * 1e3
        self.ms.clear()
        return out


def profile(steps: list[str], a, x: torch.Tensor, dev: torch.device, top: int) -> dict:
    case = Case(model="swin_unetr", shape=tuple(x.shape[1:]), classes=14, roi=a.roi)
    net = _net(case, dev, {"feature_size": a.feature_size})
    clock = _PartClock(net, dev)
    pred = speed_up(net, steps)
    xb = _window_batch(case, x, a.batch, dev)
    _, first_s, ms = _time_batch(pred, xb, dev, torch.bfloat16, a.reps)  # warm (and cuDNN's search, if on)
    clock.totals()
    with torch.no_grad(), autocast_context(dev, torch.bfloat16):
        pred(xb)
    parts = clock.totals()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch.no_grad(), autocast_context(dev, torch.bfloat16), torch.profiler.profile(activities=acts) as prof:
        for _ in range(a.reps):
            pred(xb)
        sync_device(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) / 1e3 / a.reps
    ops = [{"op": e.key, "ms_per_batch": getattr(e, key) / 1e3 / a.reps, "calls_per_batch": e.count / a.reps}
           for e in events[:top]]
    return {"steps": steps, "ms_per_batch": ms, "first_call_s": first_s, "parts_ms": parts,
            "profiled_self_ms_per_batch": total, "ops": ops}


def show(r: dict) -> None:
    print(f"\n== {'+'.join(r['steps']) or 'plain'}: {r['ms_per_batch']:.1f} ms a batch (first call {r['first_call_s']:.1f} s)")
    whole = sum(r["parts_ms"].values()) or 1.0
    for name, ms in sorted(r["parts_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<14} {ms:8.1f} ms  {100 * ms / whole:5.1f} %")
    print(f"  top ops by self time ({r['profiled_self_ms_per_batch']:.1f} ms a batch in all):")
    for o in r["ops"]:
        print(f"  {o['ms_per_batch']:8.2f} ms {o['calls_per_batch']:6.0f}x  {o['op'][:90]}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--feature-size", type=int, default=48)
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--speedups", default="", help="one run with these steps; default: sdpa, then sdpa,cudnn_benchmark")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    dev = torch.device(a.device)
    torch.set_grad_enabled(False)
    x = _input(Case(model="swin_unetr", shape=(a.roi * 3 // 2,) * 3, classes=14, roi=a.roi))[0]  # seeded noise
    runs = [a.speedups.split(",")] if a.speedups else [["sdpa"], ["sdpa", "cudnn_benchmark"]]
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "feature_size": a.feature_size, "roi": a.roi, "batch": a.batch, "runs": []}
    for steps in runs:
        try:
            r = profile([s for s in steps if s], a, x, dev, a.top)
        except Exception as e:  # one run failing (out of memory, say) leaves the other
            r = {"steps": steps, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"\n== {'+'.join(steps)}: failed: {r['error']}", flush=True)
        else:
            show(r)
        res["runs"].append(r)
        if a.json:
            with atomic_path(a.json) as tmp:
                tmp.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
