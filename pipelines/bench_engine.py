"""``medvit bench engine``: our engine against MONAI's ``sliding_window_inference``, same input and net.

Each engine runs in a fresh subprocess so its peak RSS is its own; both see the same
seeded net and input. Ours returns labels (argmax per slab); MONAI returns the blended
float volume, which a user then reduces with ``argmax`` — that is what we time and
measure for it. The printed table gives wall time, time inside the model, windows run,
peak RSS (and peak GPU memory on a GPU), and how the two outputs compare.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

NETS = {
    "unetr": dict(name="unetr", options={"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12}),
    "swin_unetr": dict(name="swin_unetr", options={"feature_size": 48}),
    "small": dict(name="unetr", options={"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4}),
}


@dataclass
class Case:
    model: str
    shape: tuple[int, int, int]
    classes: int
    roi: int = 96
    overlap: float = 0.5
    batch: int = 4
    input: str | None = None
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0)
    skip_below_hu: float | None = None
    device: str = "cpu"
    amp: bool = False
    seed: int = 0
    output: str = "labels"
    """labels (argmax; what segmenting needs) or scores (blended outputs, to compare to MONAI's exactly)."""
    our_batch: int | None = None
    """Our engine's windows per pass; default ``batch``. On the CPU we run one at a time."""
    output_device: str | None = None
    """MONAI's ``device`` (where its stitched output lives); ours always ends with labels on the CPU."""


def _net(case: Case, device: torch.device) -> torch.nn.Module:
    from medvit.config import ModelConfig
    from medvit.nets import build_net

    spec = NETS[case.model]
    torch.manual_seed(case.seed)
    cfg = ModelConfig(name=spec["name"], in_channels=1, out_channels=case.classes, roi_size=(case.roi,) * 3,
                      options=spec["options"])
    return build_net(cfg).to(device).eval()


CT_WINDOW = (-175.0, 250.0)


def _input(case: Case) -> torch.Tensor:
    """(1, D, H, W): seeded noise, or a real CT windowed to [0, 1] and resampled to ``case.spacing``."""
    if case.input is None:
        g = torch.Generator().manual_seed(case.seed)
        return torch.rand((1, *case.shape), generator=g)
    from medvit.config import IntensityConfig, PreprocessConfig
    from medvit.transforms import infer_transforms

    pre = PreprocessConfig(spacing=case.spacing, intensity=IntensityConfig(modality="ct", window=CT_WINDOW))
    return infer_transforms(pre)({"image": case.input})["image"].as_tensor()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(impl: str, case: Case, out: Path) -> dict:
    """Run one engine on ``case``; writes labels to ``out`` and returns its measurements."""
    torch.set_grad_enabled(False)
    device = torch.device(case.device)
    net = _net(case, device)
    x = _input(case)
    amp = torch.bfloat16 if case.amp and device.type == "cuda" else None
    rss_before = _peak_rss_bytes()
    model_s = [0.0]

    def timed(t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = net(t)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        model_s[0] += time.perf_counter() - t0
        return y

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    if impl == "ours":
        from pipelines.engine import segment_volume

        skip = None
        if case.skip_below_hu is not None:
            skip = max((case.skip_below_hu - CT_WINDOW[0]) / (CT_WINDOW[1] - CT_WINDOW[0]), 0.0)
        grid, rep = segment_volume(x, timed, roi_size=(case.roi,) * 3, batch_size=case.our_batch or case.batch, overlap=case.overlap,
                                   output=case.output, skip_below=skip, device=device, amp_dtype=amp)
        labels = grid.labels.numpy() if case.output == "labels" else grid.scores.numpy()
        windows, skipped = rep.windows_run, rep.windows_skipped
    else:
        from monai.inferers import sliding_window_inference

        import contextlib

        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            scores = sliding_window_inference(x[None].to(device), (case.roi,) * 3, case.batch, timed,
                                              overlap=case.overlap, mode="gaussian", device=case.output_device or device)
        labels = (scores.argmax(1)[0].to(torch.uint8) if case.output == "labels" else scores[0].float()).cpu().numpy()
        del scores
        from pipelines.engine.dense import windows_for

        windows, skipped = windows_for(x.shape[1:], (case.roi,) * 3, case.overlap), 0
    seconds = time.perf_counter() - t0
    np.save(out, labels)
    return {
        "impl": impl,
        "seconds": seconds,
        "model_seconds": model_s[0],
        "windows": windows,
        "skipped": skipped,
        "peak_rss": _peak_rss_bytes(),
        "rss_before": rss_before,
        "peak_gpu": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "shape": list(x.shape[1:]),
    }


def _spawn(impl: str, case: Case, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pipelines.bench_engine", "--worker", impl, "--case", json.dumps(case.__dict__), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{impl} worker failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def compare(case: Case, *, peer: bool = True) -> dict:
    """Run ours (and MONAI when ``peer``) on ``case``; returns both measurements and the comparison."""
    with tempfile.TemporaryDirectory() as tmp:
        ours = _spawn("ours", case, Path(tmp) / "ours.npy")
        res = {"case": case.__dict__, "ours": ours}
        if peer:
            monai = _spawn("monai", case, Path(tmp) / "monai.npy")
            a, b = np.load(Path(tmp) / "ours.npy"), np.load(Path(tmp) / "monai.npy")
            res["monai"] = monai
            if case.output == "scores":
                res["max_abs_diff"] = float(np.abs(a - b).max())
                a, b = a.argmax(0), b.argmax(0)
            res["labels_equal"] = float((a == b).mean())
            if case.input is not None:
                x = _input(case)[0].numpy()
                body = x > 0  # above the bottom of the CT window (-175 HU)
                res["labels_equal_in_body"] = float((a[body] == b[body]).mean())
    return res


def format_result(res: dict) -> str:
    c = res["case"]
    head = (f"engine bench: {c['model']}, {c['classes']} classes, input {res['ours']['shape']}"
            f"{' from ' + c['input'] if c['input'] else ''}, roi {c['roi']}, overlap {c['overlap']}, batch: MONAI {c['batch']}, ours {c.get('our_batch') or c['batch']}, "
            f"{c['device']}, output {c.get('output', 'labels')}{' bf16' if c['amp'] else ''}{', skip below ' + str(c['skip_below_hu']) + ' HU' if c['skip_below_hu'] is not None else ''}")
    rows = [f"{'engine':<8} {'wall s':>8} {'model s':>8} {'windows':>8} {'skipped':>8} {'peak RSS GiB':>13} {'peak GPU GiB':>13}"]
    for k in ("ours", "monai"):
        if k in res:
            r = res[k]
            rows.append(f"{k:<8} {r['seconds']:>8.1f} {r['model_seconds']:>8.1f} {r['windows']:>8d} {r['skipped']:>8d} "
                        f"{_gib(r['peak_rss']):>13} {_gib(r['peak_gpu']):>13}")
    out = [head, *rows]
    if "monai" in res:
        o, m = res["ours"], res["monai"]
        out.append(f"ratios: time MONAI/ours {m['seconds'] / o['seconds']:.2f}x, peak RSS ours/MONAI "
                   f"{o['peak_rss'] / m['peak_rss']:.2f}, model-only floor {o['model_seconds']:.1f} s "
                   f"(ours at {o['seconds'] / max(o['model_seconds'], 1e-9):.2f}x of it)")
        line = f"labels equal to MONAI's argmax: {100 * res['labels_equal']:.4f} % of voxels"
        if "max_abs_diff" in res:
            line = f"max abs difference of the blended outputs: {res['max_abs_diff']:.2e}; " + line
        if "labels_equal_in_body" in res:
            line += f"; inside the body: {100 * res['labels_equal_in_body']:.4f} %"
        out.append(line)
    else:
        k = res["ours"]
        vox = int(np.prod(k["shape"]))
        out.append(f"MONAI not run: its float output alone would need {c['classes'] * vox * 4 / 1e9:.1f} GB "
                   f"(+ {vox * 4 / 1e9:.1f} GB count map), computed, not measured")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=["ours", "monai"], required=True)
    ap.add_argument("--case", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    d = json.loads(a.case)
    d["shape"] = tuple(d["shape"])
    d["spacing"] = tuple(d["spacing"])
    print(json.dumps(worker(a.worker, Case(**d), Path(a.out))))


if __name__ == "__main__":
    main()
