"""``medvit bench engine``: our engine against MONAI's ``sliding_window_inference``, same input and net.

Each engine runs in a fresh subprocess so its peak RSS is its own; both see the same
seeded net and input. Ours returns labels (argmax per slab); MONAI returns the blended
float volume, which a user then reduces with ``argmax`` — that is what we time and
measure for it. The printed table gives wall time, time inside the model, windows run,
peak RSS (and peak GPU memory on a GPU), and how the two outputs compare. With ``--runtime``,
ours runs again in a fresh worker per runtime asked for (OpenVINO, ONNX Runtime, auto), its
labels compared with ours on torch.
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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from medvit.core.errors import MedvitError
from pipelines.engine.runner import Engine, autocast_context, sync_device
from pipelines.engine.settings import InferenceSettings

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
    speedups: tuple[str, ...] = ()
    """Ours only, after its plain run: apply these model speed-ups one by one (``medvit.nets.speedups``),
    time the model on one batch after each, then run the engine again with all of them."""
    batch_sweep: tuple[int, ...] = ()
    """With ``speedups`` (eager ones only: compiling would recompile per batch size): time the sped-up
    net per window at these batch sizes too; its engine run then uses the fastest."""
    fp32_reference: bool = False
    """With ``amp`` and ``speedups``: also run our engine once in fp32, so that the bf16 runs' labels,
    plain and sped up, are both compared with the unmodified net's fp32 labels."""
    runtime: str = "torch"
    """What runs the net in our engine (``Engine.predictor``): torch, openvino, onnxruntime or auto."""


def _net(case: Case, device: torch.device, options: dict | None = None) -> torch.nn.Module:
    """The case's seeded net; ``options`` replace its ``NETS`` options (the bench scripts' feature size)."""
    from medvit.config import ModelConfig
    from medvit.nets import build_net

    spec = NETS[case.model]
    torch.manual_seed(case.seed)
    cfg = ModelConfig(name=spec["name"], in_channels=1, out_channels=case.classes, roi_size=(case.roi,) * 3,
                      options=spec["options"] if options is None else options)
    return build_net(cfg).to(device).eval()


CT_WINDOW = (-175.0, 250.0)


def _preprocess(case: Case):
    from medvit.config import IntensityConfig, PreprocessConfig

    return PreprocessConfig(spacing=case.spacing, intensity=IntensityConfig(modality="ct", window=CT_WINDOW))


def _input(case: Case) -> tuple[torch.Tensor, float | None, torch.Tensor | None]:
    """``(x, skip_below, skip_source)``: ``x`` (1, D, H, W) seeded noise, or a real CT windowed to
    [0, 1] and resampled to ``case.spacing``, with ``--skip-below-hu`` as ``medvit segment`` applies it."""
    if case.input is None:
        if case.skip_below_hu is not None:
            raise ValueError("--skip-below-hu needs --input (a CT in HU)")
        g = torch.Generator().manual_seed(case.seed)
        return torch.rand((1, *case.shape), generator=g), None, None
    from medvit.io import LoadVolumed
    from pipelines.volume.segment import preprocess_case

    prep = preprocess_case(_preprocess(case), LoadVolumed(keys="image")({"image": case.input}), case.skip_below_hu)
    return prep.image, prep.skip_below, prep.skip_source


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(net, device: torch.device, model_s: list[float]):
    def timed(t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        y = net(t)
        sync_device(device)
        model_s[0] += time.perf_counter() - t0
        return y

    return timed


def _ours(case: Case, net, x: torch.Tensor, skip: list, engine, full_batches: bool = False) -> tuple[np.ndarray, dict]:
    """Our engine on ``x``; ``skip`` is ``(skip_below, skip_source)`` from :func:`_input`; ``engine``
    the worker's (see :func:`worker`), run with ``case``'s batch and overlap; ``full_batches`` for a
    compiled net (one batch shape, see :meth:`~pipelines.engine.runner.Engine.run`)."""
    from pipelines.engine import segment_volume

    engine = engine.with_settings(batch_size=case.our_batch or case.batch, overlap=case.overlap)
    device = engine.settings.device
    model_s = [0.0]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    grid, rep = segment_volume(engine, x, _timed(net, device, model_s), roi_size=(case.roi,) * 3, output=case.output,
                               skip_below=skip[0], skip_source=skip[1], full_batches=full_batches)
    out = grid.labels.numpy() if case.output == "labels" else grid.scores.numpy()
    return out, {"seconds": time.perf_counter() - t0, "model_seconds": model_s[0], "windows": rep.windows_run,
                 "skipped": rep.windows_skipped, "input_device": rep.input_device, "notes": rep.notes,
                 "peak_gpu": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None}


TOL_FACTOR = 2.0
TOL_LABELS = 0.005


def within_bf16_tolerance(step: dict, plain: dict) -> bool:
    """A sped-up net is within bf16 tolerance of the unmodified one when, measured against the
    unmodified net in fp32, its largest error is at most ``TOL_FACTOR`` times the unmodified bf16
    net's own and its argmax agrees on no fewer voxels than that net's minus ``TOL_LABELS``.

    Comparing two bf16 runs directly says little: a compiler that fuses and rounds at other
    places differs from eager bf16 by about bf16's own error, which on a deep net with random
    weights is far from zero.
    """
    return (step["max_abs_diff_fp32"] <= TOL_FACTOR * max(plain["max_abs_diff_fp32"], 1e-12)
            and step["labels_equal_fp32"] >= plain["labels_equal_fp32"] - TOL_LABELS)


def _window_batch(case: Case, x: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """``n`` windows of ``x`` at a few fixed starts (cycled), as the engine would feed them."""
    r = case.roi
    starts = [(0, 0, 0), (0, r // 2, 0), (0, 0, r // 2), (r // 2, 0, 0)]
    short = [max(r + r // 2 - s, 0) for s in x.shape[1:]]  # windows of a small input see padding, as in the engine
    if any(short):
        x = torch.nn.functional.pad(x, [p for v in reversed(short) for p in (0, v)])
    return torch.stack([x[:, d : d + r, h : h + r, w : w + r] for d, h, w in (starts * n)[:n]]).to(device)


def _time_batch(pred, xb: torch.Tensor, device: torch.device, amp, reps: int) -> tuple[torch.Tensor, float, float]:
    """(output of the first call, seconds of the first call, milliseconds per later call)."""
    with torch.no_grad(), autocast_context(device, amp):
        t0 = time.perf_counter()
        y = pred(xb)
        sync_device(device)
        first = time.perf_counter() - t0
        pred(xb)
        sync_device(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            pred(xb)
        sync_device(device)
    return y.float(), first, (time.perf_counter() - t0) / reps * 1e3


def model_steps(case: Case, plain: torch.nn.Module, x: torch.Tensor, device: torch.device, amp, reps: int | None = None):
    """Model-only time per batch of ``case.batch`` windows of ``plain`` (the unmodified net, left
    unchanged) and of fresh copies with each speed-up added in turn.

    Returns ``(rows, predictor)``: one row per step (``plain`` first) with milliseconds per batch,
    seconds of the first call (compilation, when compiling), and the largest difference from the
    plain net's output on the same batch, absolute and relative to its largest magnitude; the
    predictor has every step applied and is already warm.
    """
    from medvit.nets.speedups import speed_up

    reps = reps or (10 if device.type == "cuda" else 2)
    xb = _window_batch(case, x, case.batch, device)

    def bench(pred) -> tuple[torch.Tensor, float, float]:
        return _time_batch(pred, xb, device, amp, reps)

    ref, first, ms = bench(plain)
    scale = float(ref.abs().max())
    ref32 = None
    if amp is not None:  # the unmodified net in fp32: the yardstick for what bf16 itself costs
        with torch.no_grad():
            ref32 = plain(xb).float()

    def against(y: torch.Tensor) -> dict:
        d = float((y - ref).abs().max())
        row = {"max_abs_diff": d, "max_rel_diff": d / max(scale, 1e-12)}
        if ref32 is not None:
            row["max_abs_diff_fp32"] = float((y - ref32).abs().max())
            row["labels_equal_fp32"] = float((y.argmax(1) == ref32.argmax(1)).float().mean())
        return row

    rows = [{"step": "plain", "ms_per_batch": ms, "first_call_s": first, **against(ref)}]
    pred = None
    for i in range(len(case.speedups)):
        try:
            step = speed_up(_net(case, device), case.speedups[: i + 1])
            y, first, ms = bench(step)
        except Exception as e:  # a step that fails (a compiler error, say) is reported, not fatal
            rows.append({"step": "+" + case.speedups[i], "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            break
        pred = step
        row = {"step": "+" + case.speedups[i], "ms_per_batch": ms, "first_call_s": first, **against(y)}
        if ref32 is not None:
            row["within_bf16_tolerance"] = within_bf16_tolerance(row, rows[0])
        rows.append(row)
    return rows, pred


def batch_sweep(case: Case, x: torch.Tensor, pred, device: torch.device, amp, reps: int | None = None) -> list[dict]:
    """Milliseconds per window of ``pred`` at each batch size of ``case.batch_sweep`` (a GPU that
    a batch of 4 windows leaves mostly idle runs more windows per pass for little more time)."""
    reps = reps or (5 if device.type == "cuda" else 1)
    rows = []
    for b in case.batch_sweep:
        try:
            _, _, ms = _time_batch(pred, _window_batch(case, x, b, device), device, amp, reps)
        except torch.OutOfMemoryError:
            rows.append({"batch": b, "error": "out of memory"})
            break
        rows.append({"batch": b, "ms_per_window": ms / b})
    return rows


def _labels_agree(a: np.ndarray, b: np.ndarray, output: str) -> float:
    """Share of voxels with the same label (scores are reduced by argmax first)."""
    return float((a.argmax(0) == b.argmax(0)).mean() if output == "scores" else (a == b).mean())


def _sped_up(case: Case, net, x: torch.Tensor, skip: list, engine, labels: np.ndarray) -> dict:
    """``case.speedups`` step by step on one batch, then our engine again with all that worked (at
    the fastest batch of ``case.batch_sweep``), and with ``fp32_reference`` once more in fp32."""
    device, amp = engine.settings.device, engine.settings.amp_dtype
    rows, fast = model_steps(case, net, x, device, amp)
    extra: dict = {"steps": rows}
    if fast is None:
        return extra
    applied = [r["step"][1:] for r in rows[1:] if "error" not in r]
    compiled = "compile" in applied
    fast_case = case
    if case.batch_sweep and not compiled:
        sweep = [{"batch": case.batch, "ms_per_window": rows[len(applied)]["ms_per_batch"] / case.batch},
                 *batch_sweep(case, x, fast, device, amp)]
        extra["batch_sweep"] = sweep
        best = min((r for r in sweep if "error" not in r), key=lambda r: r["ms_per_window"])
        fast_case = replace(case, our_batch=best["batch"])
    fast_batch = fast_case.our_batch or fast_case.batch
    if compiled and fast_batch != case.batch:  # compile for the engine's batch shape, untimed
        extra["compile_engine_batch_s"] = _time_batch(fast, _window_batch(case, x, fast_batch, device), device, amp, 1)[1]
    fast_labels, fast_run = _ours(fast_case, fast, x, skip, engine, full_batches=compiled)
    extra["fast"] = {**fast_run, "batch": fast_batch, "speedups": applied,
                     "labels_equal_plain": _labels_agree(fast_labels, labels, case.output)}
    if amp is not None and case.fp32_reference:
        ref_labels, ref_run = _ours(case, net, x, skip, engine.with_settings(amp=False))
        extra["fp32"] = {"seconds": ref_run["seconds"], "model_seconds": ref_run["model_seconds"],
                         "labels_equal_plain_bf16": _labels_agree(labels, ref_labels, case.output),
                         "labels_equal_fast": _labels_agree(fast_labels, ref_labels, case.output)}
    return extra


def worker(impl: str, case: Case, out: Path) -> dict:
    """Run one engine on ``case``; writes its labels (or scores) to ``out`` and returns its measurements."""
    torch.set_grad_enabled(False)
    device = torch.device(case.device)
    net = _net(case, device)
    x, *skip = _input(case)
    amp = torch.bfloat16 if case.amp else None  # CPU autocast runs bf16 too (slowly; for dry runs)
    if device.type == "cuda":  # one untimed batch first: CUDA context, cuDNN/cuBLAS set-up
        with autocast_context(device, amp):
            net(torch.zeros((case.batch, 1, *(case.roi,) * 3), device=device))
        sync_device(device)
    rss_before = _peak_rss_bytes()
    extra: dict = {}
    if impl == "ours":
        # one engine for the worker's runs: what out-of-memory taught the plain run carries over
        engine = Engine(InferenceSettings(overlap=case.overlap, batch_size=case.our_batch or case.batch, device=device,
                                          amp=amp if amp is not None else False, runtime=case.runtime))
        pred = net
        if case.runtime != "torch":  # converted (or read from the cache) before the timed run
            from medvit.runtimes import state_sha256

            t0 = time.perf_counter()
            pred = engine.predictor(net, roi=(case.roi,) * 3, in_channels=1, checkpoint_sha256=state_sha256(net))
            extra = {"runtime_ran": pred.runtime, "runtime_note": pred.note, "compile_seconds": time.perf_counter() - t0}
        labels, run = _ours(case, pred, x, skip, engine)
        run["peak_rss"] = _peak_rss_bytes()  # before the speed-up runs add nets of their own
        if case.speedups:
            extra.update(_sped_up(case, net, x, skip, engine, labels))
    else:
        from monai.inferers import sliding_window_inference

        model_s = [0.0]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        with autocast_context(device, amp):
            scores = sliding_window_inference(x[None].to(device), (case.roi,) * 3, case.batch, _timed(net, device, model_s),
                                              overlap=case.overlap, mode="gaussian", device=case.output_device or device)
        labels = (scores.argmax(1)[0].to(torch.uint8) if case.output == "labels" else scores[0].float()).cpu().numpy()
        del scores
        from pipelines.engine.dense import windows_for

        run = {"seconds": time.perf_counter() - t0, "model_seconds": model_s[0],
               "windows": windows_for(x.shape[1:], (case.roi,) * 3, case.overlap), "skipped": 0,
               "peak_gpu": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
               "output_device": case.output_device or str(device)}
    np.save(out, labels)
    return {"impl": impl, "peak_rss": _peak_rss_bytes(), **run, "rss_before": rss_before, "shape": list(x.shape[1:]), **extra}


USER_ERROR = "medvit-bench-worker: user error: "
"""Prefix of the line a worker prints for a user error (a bad input), so the parent can repeat it."""


def run_worker(cmd: list[str], what: str) -> dict:
    """Run a bench worker process; its last stdout line is its JSON result.

    A user error the worker printed with :data:`USER_ERROR` is raised here as :class:`MedvitError`
    (one line); any other failure is a RuntimeError carrying the worker's stderr tail.
    """
    r = subprocess.run(cmd, capture_output=True, text=True)
    said = [ln[len(USER_ERROR):] for ln in r.stderr.splitlines() if ln.startswith(USER_ERROR)]
    if r.returncode == MedvitError.exit_code and said:
        raise MedvitError(said[-1])
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _spawn(impl: str, case: Case, out: Path) -> dict:
    cmd = [sys.executable, "-m", "pipelines.bench.engine", "--worker", impl, "--case", json.dumps(case.__dict__), "--out", str(out)]
    return run_worker(cmd, f"{impl} worker")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    cpu = cpu_name()
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


def _gib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**30:.2f}"


def compare(case: Case, *, peer: bool = True, peer_outputs: tuple[str | None, ...] | None = None,
            on_result=None, runtimes: tuple[str, ...] = ()) -> dict:
    """Run ours (on torch, in fp32 unless ``case.amp``), then ours once per runtime of ``runtimes``
    other than torch (each in its own worker: its conversion, wall and model time, peak RSS, and
    the share of voxels whose label equals the torch run's), then MONAI (when ``peer``) once per
    output device in ``peer_outputs`` (default: ``case.output_device``); returns every
    measurement and the comparisons. ``on_result(partial result)`` is called after each run, so
    that a run stopped by a time limit (a GPU machine's) still leaves what it measured."""
    on_result = on_result or (lambda res: None)
    with tempfile.TemporaryDirectory() as tmp:
        ours = _spawn("ours", replace(case, runtime="torch"), Path(tmp) / "ours.npy")
        res = {"case": case.__dict__, "ours": ours}
        on_result(res)
        a = np.load(Path(tmp) / "ours.npy")
        for r in (r for r in runtimes if r != "torch"):
            other = replace(case, runtime=r, speedups=(), batch_sweep=(), fp32_reference=False)
            run = _spawn("ours", other, Path(tmp) / f"{r}.npy")
            run["runtime"] = r
            run["labels_equal_torch"] = _labels_agree(np.load(Path(tmp) / f"{r}.npy"), a, case.output)
            res.setdefault("runtimes", []).append(run)
            on_result(res)
        if not peer:
            return res
        body = _input(case)[0][0].numpy() > 0 if case.input is not None else None  # above -175 HU
        runs: list[dict] = []
        for od in peer_outputs or (case.output_device,):
            m = _spawn("monai", replace(case, output_device=od), Path(tmp) / "monai.npy")
            b = np.load(Path(tmp) / "monai.npy")
            la, lb = a, b
            if case.output == "scores":
                m["max_abs_diff"] = float(np.abs(a - b).max())
                la, lb = a.argmax(0), b.argmax(0)
            m["labels_equal"] = float((la == lb).mean())
            if body is not None:
                m["labels_equal_in_body"] = float((la[body] == lb[body]).mean())
            runs.append(m)
            res["monai_runs"] = runs
            on_result(res)
    return res


def format_result(res: dict) -> str:
    c = res["case"]
    head = (f"engine bench: {c['model']}, {c['classes']} classes, input {res['ours']['shape']}"
            f"{' from ' + c['input'] if c['input'] else ''}, roi {c['roi']}, overlap {c['overlap']}, batch: MONAI {c['batch']}, ours {c.get('our_batch') or c['batch']}, "
            f"{c['device']}, output {c.get('output', 'labels')}{' bf16' if c['amp'] else ''}{', skip below ' + str(c['skip_below_hu']) + ' HU' if c['skip_below_hu'] is not None else ''}")
    rows = [f"{'engine':<22} {'wall s':>8} {'model s':>8} {'windows':>8} {'skipped':>8} {'peak RSS GiB':>13} {'peak GPU GiB':>13}"]

    def row(name: str, r: dict, rss: int | None) -> str:
        return (f"{name:<22} {r['seconds']:>8.2f} {r['model_seconds']:>8.2f} {r['windows']:>8d} {r['skipped']:>8d} "
                f"{_gib(rss):>13} {_gib(r['peak_gpu']):>13}")

    o = res["ours"]
    rows.append(row("ours", o, o["peak_rss"]))
    if "fast" in o:
        rows.append(row("ours + " + "+".join(o["fast"].get("speedups") or ())
                        + (f" b{o['fast']['batch']}" if o["fast"].get("batch") not in (None, c.get("our_batch") or c["batch"]) else ""),
                        o["fast"], None))
    runs = res.get("monai_runs", [])
    for m in runs:
        rows.append(row(f"monai (output {m.get('output_device') or c['device']})", m, m["peak_rss"]))
    out = [head, *rows]
    for m in runs:
        where = m.get("output_device") or c["device"]
        line = (f"vs MONAI with output on {where}: time MONAI/ours {m['seconds'] / o['seconds']:.2f}x")
        if "fast" in o:
            line += f" (with speed-ups {m['seconds'] / o['fast']['seconds']:.2f}x)"
        line += f", peak RSS ours/MONAI {o['peak_rss'] / m['peak_rss']:.2f}"
        if o.get("peak_gpu") and m.get("peak_gpu"):
            line += f", peak GPU ours/MONAI {o['peak_gpu'] / m['peak_gpu']:.2f}"
        out.append(line)
        eq = f"  labels equal to MONAI's argmax: {100 * m['labels_equal']:.4f} % of voxels"
        if "max_abs_diff" in m:
            eq = f"  max abs difference of the blended outputs: {m['max_abs_diff']:.2e};" + eq[1:]
        if "labels_equal_in_body" in m:
            eq += f"; inside the body: {100 * m['labels_equal_in_body']:.4f} %"
        out.append(eq)
    out.append(f"model-only floor {o['model_seconds']:.2f} s (ours at {o['seconds'] / max(o['model_seconds'], 1e-9):.2f}x of it)")
    if "fast" in o:
        f = o["fast"]
        out.append(f"with speed-ups: floor {f['model_seconds']:.2f} s (ours at {f['seconds'] / max(f['model_seconds'], 1e-9):.2f}x of it); "
                   f"labels equal to the plain run: {100 * f['labels_equal_plain']:.4f} %")
    if "steps" in o:
        out.append(f"model steps, one batch of {c['batch']} windows:")
        for s in o["steps"]:
            if "error" in s:
                out.append(f"  {s['step']:<16} failed: {s['error']}")
                continue
            out.append(f"  {s['step']:<16} {s['ms_per_batch']:>8.1f} ms  first call {s['first_call_s']:>6.1f} s  "
                       f"max diff vs plain {s['max_abs_diff']:.2e} ({100 * s['max_rel_diff']:.3f} % of max |output|)"
                       + (f"; vs fp32 net: max diff {s['max_abs_diff_fp32']:.2e}, argmax equal {100 * s['labels_equal_fp32']:.3f} %"
                          if "max_abs_diff_fp32" in s else "")
                       + ("" if "within_bf16_tolerance" not in s else
                          " (within bf16 tolerance)" if s["within_bf16_tolerance"] else " (OUTSIDE bf16 tolerance)"))
    if "batch_sweep" in o:
        out.append("batch sweep, sped-up net: " + ", ".join(
            f"{r['batch']}: {'out of memory' if 'error' in r else format(r['ms_per_window'], '.1f') + ' ms/window'}"
            for r in o["batch_sweep"]) + f"; the sped-up engine run used batch {o['fast'].get('batch')}")
    if "compile_engine_batch_s" in o:
        out.append(f"compiled again for the engine's batch of {o['fast']['batch']}: {o['compile_engine_batch_s']:.1f} s (untimed)")
    if "fp32" in o:
        r = o["fp32"]
        out.append(f"ours in fp32 (the unmodified net's reference): {r['seconds']:.2f} s; its labels equal the bf16 run's on "
                   f"{100 * r['labels_equal_plain_bf16']:.4f} % of voxels, the sped-up run's on {100 * r['labels_equal_fast']:.4f} %")
    if res.get("runtimes"):
        out.extend(format_runtimes(res))
    if not runs:
        vox = int(np.prod(o["shape"]))
        out.append(f"MONAI not run (--no-peer); its float output alone would need {c['classes'] * vox * 4 / 1e9:.1f} GB "
                   f"(+ {vox * 4 / 1e9:.1f} GB count map), computed, not measured")
    return "\n".join(out)


def format_runtimes(res: dict) -> list[str]:
    """The runtimes' table: ours on torch first, then each runtime asked for, against it."""
    o = res["ours"]
    rows = [f"{'runtime':<24} {'wall s':>8} {'model s':>8} {'ms/window':>10} {'peak RSS GiB':>13} {'speed-up':>9} "
            f"{'model speed-up':>15} {'labels = torch':>15}"]

    def row(name: str, r: dict, equal: float) -> str:
        per = 1e3 * r["model_seconds"] / max(r["windows"], 1)
        return (f"{name:<24} {r['seconds']:>8.2f} {r['model_seconds']:>8.2f} {per:>10.1f} {_gib(r['peak_rss']):>13} "
                f"{o['seconds'] / r['seconds']:>8.2f}x {o['model_seconds'] / max(r['model_seconds'], 1e-9):>14.2f}x "
                f"{100 * equal:>14.4f}%")

    rows.append(row("torch", o, 1.0))
    notes = []
    for r in res["runtimes"]:
        ran = r.get("runtime_ran", r["runtime"])
        rows.append(row(r["runtime"] if ran == r["runtime"] else f"{r['runtime']} (ran {ran})", r,
                        r["labels_equal_torch"]))
        line = f"  {r['runtime']}: conversion or cache load {r.get('compile_seconds', 0.0):.1f} s (untimed)"
        notes.append(line + (f"; {r['runtime_note']}" if r.get("runtime_note") else ""))
    return ["runtimes (ours; speed-ups and labels against ours on torch fp32):", *rows, *notes]


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
    d["speedups"] = tuple(d.get("speedups") or ())
    d["batch_sweep"] = tuple(d.get("batch_sweep") or ())
    try:
        print(json.dumps(worker(a.worker, Case(**d), Path(a.out))))
    except MedvitError as e:  # a bad --input: the parent turns this line back into a user error
        print(f"{USER_ERROR}{e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
