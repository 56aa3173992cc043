"""Which volume nets convert to OpenVINO and ONNX Runtime, how fast they run and how close they stay.

For each registered volume net (fresh seeded weights) and each installed runtime: whether the
conversion is used (``medvit.runtimes.compile_predictor`` falls back to torch otherwise, and the
row says why), the conversion's seconds (export + compile + check, nothing cached), seconds per
window (median of ``--repeat`` calls after a warm-up), speed-up over torch eager fp32, the largest
absolute difference from torch's logits and the share of voxels whose argmax label agrees, on one
seeded window. Torch and the runtimes get the same thread count.

``--size tiny`` uses the smallest settings of each net (the tests' ones) and ``--size default``
the registry's defaults; a window a net refuses (Swin UNETR wants multiples of 32 and one axis of
64, UNETR multiples of 16) is a row saying so.

    python bench/cpu_runtimes.py --size tiny --shape 32,32,32 --nets unetr,dformer
    python bench/cpu_runtimes.py --shape 96,96,96 --nets unetr,swin_unetr --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medvit.config import ModelConfig
from medvit.core.errors import MedvitError
from medvit.nets import NETS, build_net
from medvit.runtimes import (
    CONVERTED,
    backends,
    compile_predictor,
    cpu_threads,
    missing_packages,
    state_sha256,
)
from pipelines.bench.engine import cpu_name

TINY = {
    "unetr": {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 2},
    "swin_unetr": {"feature_size": 12, "depths": [1, 1, 1, 1]},
    "dformer": {"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4]},
    "cswin_unet3d": {"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 6], "feature_size": 8,
                     "stem_stride": 1},
    "transunet3d": {"strides": [1, 2, 2, 2], "base_features": 4, "max_features": 16, "vit_layers": 2,
                    "vit_hidden": 16, "vit_heads": 2, "vit_mlp": 32},
    "unet": {"features": [4, 4, 8, 16, 32, 4]},
}


def median_seconds(call, repeat: int) -> float:
    with torch.no_grad():
        call()  # warm-up
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
    return statistics.median(times)



class Notes(logging.Handler):
    """Keeps the runtimes' warnings (a fallback's reason) for the table instead of the console."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def bench_net(name: str, roi: tuple[int, int, int], args, cache: Path) -> list[dict]:
    options = TINY.get(name, {}) if args.size == "tiny" else {}
    try:
        torch.manual_seed(0)
        net = build_net(ModelConfig(name=name, in_channels=1, out_channels=args.classes, roi_size=roi,
                                    options=options)).eval()
    except MedvitError as e:
        return [{"net": name, "runtime": "torch", "converts": False, "note": f"not built: {e}"}]
    x = torch.randn((args.batch, 1, *roi), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(x)
    base = median_seconds(lambda: net(x), args.repeat) / args.batch
    params = sum(p.numel() for p in net.parameters())
    rows = [{"net": name, "runtime": "torch", "converts": True, "s_per_window": base, "speedup": 1.0,
             "max_abs_diff": 0.0, "output_max": float(want.abs().max()), "labels_equal": 1.0, "params": params}]
    sha = state_sha256(net)
    for runtime in CONVERTED:
        row = {"net": name, "runtime": runtime, "converts": False, "params": params}
        rows.append(row)
        if missing_packages(runtime):
            row["note"] = f"not installed ({', '.join(missing_packages(runtime))})"
            continue
        notes = Notes()
        logging.getLogger("medvit.runtimes").addHandler(notes)
        t = time.perf_counter()
        try:
            p = compile_predictor(net, runtime=runtime, roi=roi, batch=args.batch, in_channels=1,
                                  checkpoint_sha256=sha, cache_dir=cache, threads=args.threads)
        finally:
            logging.getLogger("medvit.runtimes").removeHandler(notes)
        row["convert_s"] = time.perf_counter() - t
        if p.runtime != runtime:
            row["note"] = p.note or "; ".join(notes.messages)
            continue
        got = p(x)
        s = median_seconds(lambda p=p: p(x), args.repeat) / args.batch
        row.update(converts=True, s_per_window=s, speedup=base / s, max_abs_diff=float((got - want).abs().max()),
                   output_max=float(want.abs().max()),
                   labels_equal=float((got.argmax(1) == want.argmax(1)).float().mean()))
    return rows


def fmt(row: dict, key: str, spec: str, width: int) -> str:
    v = row.get(key)
    return f"{'-':>{width}}" if v is None else f"{format(v, spec):>{width}}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="96,96,96", help="the window D,H,W (or one size for all three)")
    ap.add_argument("--nets", default=",".join(n for n in NETS.names()), help="comma-separated registered net names")
    ap.add_argument("--size", choices=("tiny", "default"), default="default")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: the CPUs this process may use")
    ap.add_argument("--cache", type=Path, default=None, help="a runtime cache to reuse (default: a fresh one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and the machine here")
    args = ap.parse_args()
    sizes = [int(s) for s in args.shape.split(",")]
    roi = tuple(sizes * 3 if len(sizes) == 1 else sizes)
    if len(roi) != 3:
        ap.error(f"--shape: expected one or three sizes, got {args.shape}")
    nets = [n for n in args.nets.split(",") if n]
    unknown = [n for n in nets if n not in NETS.names()]
    if unknown:
        ap.error(f"--nets: unknown {', '.join(unknown)}; registered: {', '.join(NETS.names())}")
    args.threads = args.threads or cpu_threads()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="medvit-bench-runtimes-") as tmp:
        cache = args.cache or Path(tmp)
        rows = [r for n in nets for r in bench_net(n, roi, args, cache)]

    print(f"window {'x'.join(map(str, roi))}, batch {args.batch}, {args.threads} threads, nets {args.size}, "
          f"{cpu_name()}")
    head = f"{'net':<14} {'runtime':<12} {'converts':<8} {'convert s':>9} {'s/window':>9} {'speed-up':>8} " \
           f"{'max |diff|':>10} {'out max':>8} {'labels =':>9}  note"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['net']:<14} {r['runtime']:<12} {'yes' if r['converts'] else 'no':<8} {fmt(r, 'convert_s', '.1f', 9)} "
              f"{fmt(r, 's_per_window', '.3f', 9)} {fmt(r, 'speedup', '.2f', 7)}x {fmt(r, 'max_abs_diff', '.2g', 10)} "
              f"{fmt(r, 'output_max', '.3g', 8)} {fmt(r, 'labels_equal', '.4%', 9)}  {r.get('note', '')}")
    if args.json:
        machine = {"cpu": cpu_name(), "threads": args.threads, "date": datetime.date.today().isoformat(),
                   "versions": {p: backends.version(p) for p in ("torch", "onnxscript", *CONVERTED)}}
        args.json.write_text(json.dumps({"machine": machine, "window": roi, "batch": args.batch, "size": args.size,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
