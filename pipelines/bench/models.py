"""``medvit bench models``: every registered volume net in its paper configuration, side by side.

Per net: parameters, GFLOPs of one ``1 x C x 96³`` window (C: the paper's input channels, 1 but
for bpMRI's 3; and of the net's paper window where it
differs), CPU latency of one window (median of ``repeats`` calls after a warm-up, with one
thread and with all of them), and the peak RSS of the process that measured it. Each net runs
in a fresh subprocess, so the peak RSS is that net's alone.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add)
on one eval-mode forward pass (inference: a deep-supervision net's extra heads do not run; for
such a net also in training mode, with them, as the official D-Former figures are counted),
built and run on the ``meta`` device where the net allows (no compute), else on the CPU.
Attention is counted through PyTorch's math path of ``scaled_dot_product_attention``: the
CPU's fused kernel is not in the counter's table and would count as zero.

The reference beside ours: for the nets that configure a MONAI class, MONAI's own class built
directly with the same paper configuration (the registry must add nothing); for D-Former, the
figures measured on the official code; for 3D TransUNet, an estimate (labelled so in the table).
:data:`PAPER` is the one table of paper settings.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import torch

from medvit.core.errors import MedvitError
from pipelines.bench.engine import USER_ERROR, run_worker

WINDOW = (96, 96, 96)
"""The common window every net is measured at."""


@dataclass(frozen=True)
class Paper:
    """A net's paper configuration and the reference to compare it with."""

    options: dict[str, Any] = field(default_factory=dict)
    out_channels: int = 14
    in_channels: int = 1
    """Input channels of the paper's data (3 for bi-parametric MRI); every window is ``in_channels x window``."""
    window: tuple[int, int, int] = WINDOW
    monai: str | None = None
    """The MONAI class (in ``monai.networks.nets``) that is the reference, built directly from ``options``."""
    figures: dict[str, Any] | None = None
    """Published or official-code figures: ``params``, ``params_no_ds``, ``gflops`` {window "DxHxW": GFLOP}."""
    source: str = "official code"
    """Where ``figures`` come from, printed in the table's reference column."""


PAPER: dict[str, Paper] = {
    # UNETR (Hatamizadeh et al., 2022), BTCV: 14 classes on 96³
    "unetr": Paper(options={"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12}, monai="UNETR"),
    # Swin UNETR (Hatamizadeh et al., 2022), BTCV: feature size 48 on 96³
    "swin_unetr": Paper(options={"feature_size": 48}, monai="SwinUNETR"),
    # MONAI's BasicUNet with its defaults: a CNN baseline, no paper figure
    "unet": Paper(),
    # D-Former (Wu et al., 2022), Synapse: the official model.py's SegNetwork(14), three heads built;
    # measured there with FlopCounterMode. Used only when "dformer" is registered.
    "dformer": Paper(options={"deep_supervision": True}, window=(64, 128, 128),
                     figures={"params": 50.56e6, "params_no_ds": 44.35e6,
                              "gflops": {"64x128x128": 120.8, "96x96x96": 107.3}}),
    # 3D TransUNet (Chen et al., 2023), encoder variant, BTCV: the official 64x192x160 (z, y, x)
    # patch in RAS order, first halving in-plane only, ViT-B bottleneck, deep supervision. The
    # reference is the estimate (the official code needs nnU-Net v1 and was not run).
    "transunet3d": Paper(options={"strides": [1, [2, 2, 1], 2, 2, 2, 2], "deep_supervision": True},
                         window=(160, 192, 64), figures={"params": 117e6},
                         source="estimate (ViT-B 85 M + nnU-Net CNN; official code not run)"),
    # CSwin UNet (Li et al., 2023), bpMRI (T2W, ADC, HBV): our defaults (no public code, no
    # published size), csPCa vs background; the common 96³ window only
    "cswin_unet3d": Paper(in_channels=3, out_channels=2),
}


VARIANTS: dict[str, tuple[str, Paper]] = {
    # row label -> (registered net, its setting): a second configuration of one net, measured
    # right after the net's own row
    "transunet3d (mask transformer)": ("transunet3d", Paper(
        options={"strides": [1, [2, 2, 1], 2, 2, 2, 2], "decoder": "mask_transformer"}, window=(160, 192, 64))),
}
"""Further rows: nets with a second paper configuration (3D TransUNet's decoder variant)."""


def window_key(window: tuple[int, ...]) -> str:
    return "x".join(str(int(w)) for w in window)


def _model_config(name: str, paper: Paper, window: tuple[int, int, int], options: dict | None = None):
    from medvit.config import ModelConfig

    return ModelConfig(name=name, in_channels=paper.in_channels, out_channels=paper.out_channels, roi_size=window,
                       options=paper.options if options is None else options)


def _monai_net(paper: Paper, window: tuple[int, int, int]) -> torch.nn.Module:
    """The reference: MONAI's class from the paper options, not through our registry."""
    import inspect

    from monai.networks import nets

    cls = getattr(nets, paper.monai)
    kw = dict(in_channels=paper.in_channels, out_channels=paper.out_channels, spatial_dims=3, **paper.options)
    if "img_size" in inspect.signature(cls.__init__).parameters:
        kw["img_size"] = window
    return cls(**kw)


_NOT_ON_META = (NotImplementedError, RuntimeError, TypeError, ValueError, MedvitError)
"""What a net that cannot be built or run on the meta device raises there (the registry turns a
constructor's RuntimeError, such as ``Tensor.item()`` on a meta tensor, into a ConfigError)."""


def count_flops(build: Callable[[], torch.nn.Module], window: tuple[int, int, int], *,
                train: bool = False, in_channels: int = 1) -> tuple[int, str]:
    """``(FLOPs, device)`` of one forward pass of ``build()`` on a ``1 x in_channels x window`` input, in eval mode
    (or training mode with ``train``: a deep-supervision net's extra heads run too), on the
    ``meta`` device (no compute) when the net builds and runs there, else on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                net = build().train(train).requires_grad_(False)
            x = torch.zeros((1, in_channels, *window), device=device)
            # no parameter requires grad: the counter's module tracker fails on a module input that is
            # a view of a parameter (a mask transformer's expanded query embeddings) under no_grad
            # the math path: the CPU's fused attention kernel is not in the counter's table
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                net(x)
            return int(counter.get_total_flops()), device
        except _NOT_ON_META:
            if device == "cpu":
                raise
    raise AssertionError("unreachable")


def count_params(build: Callable[[], torch.nn.Module]) -> int:
    """``build()``'s parameter count, built on the meta device where it allows (no memory)."""
    try:
        with torch.device("meta"):
            net = build()
    except _NOT_ON_META:
        net = build()
    return sum(p.numel() for p in net.parameters())


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def all_threads() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def measure(name: str, paper: Paper, *, window: tuple[int, int, int] = WINDOW, repeats: int = 3,
            threads: int | None = None) -> dict[str, Any]:
    """One net's row, measured in this process (run it in a fresh one: the peak RSS is the process's).

    Latency first (a seeded net on the CPU, eval mode, no autograd; the peak RSS is read right
    after), then parameters and FLOPs, ours and the reference's.
    """
    from medvit.nets import build_net

    threads = threads or all_threads()
    torch.manual_seed(0)
    ours = lambda w, options=None: (lambda: build_net(_model_config(name, paper, w, options)))  # noqa: E731
    net = ours(window)().eval()
    x = torch.randn((1, paper.in_channels, *window))
    latency = {}
    with torch.no_grad():
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            net(x)  # warm-up: oneDNN's kernels, the allocator
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                net(x)
                times.append(time.perf_counter() - t0)
            latency[str(n)] = statistics.median(times) * 1e3
    row: dict[str, Any] = {"net": name, "options": paper.options, "in_channels": paper.in_channels,
                           "out_channels": paper.out_channels,
                           "window": list(window), "paper_window": list(paper.window),
                           "ms_per_window": latency, "threads": threads, "peak_rss": _peak_rss_bytes(),
                           "params": sum(p.numel() for p in net.parameters())}
    del net, x
    windows = [window] + ([paper.window] if tuple(paper.window) != tuple(window) else [])
    row["gflops"], row["flops_on"] = {}, {}
    for w in windows:
        flops, device = count_flops(ours(w), w, in_channels=paper.in_channels)
        row["gflops"][window_key(w)], row["flops_on"][window_key(w)] = flops / 1e9, device
    if paper.options.get("deep_supervision"):
        # the official D-Former figures run all three heads: count ours that way too
        row["gflops_ds"] = {window_key(w): count_flops(ours(w), w, train=True, in_channels=paper.in_channels)[0] / 1e9
                            for w in windows}
        row["params_no_ds"] = count_params(ours(window, {**paper.options, "deep_supervision": False}))
    if paper.monai:
        row["reference"] = {"source": f"monai.networks.nets.{paper.monai}",
                            "params": count_params(lambda: _monai_net(paper, window)),
                            "gflops": {window_key(w): count_flops(lambda w=w: _monai_net(paper, w), w,
                                                                  in_channels=paper.in_channels)[0] / 1e9
                                       for w in windows}}
    elif paper.figures:
        row["reference"] = {"source": paper.source, **paper.figures}
    return row


def _spawn(name: str, paper: Paper, *, window, repeats: int, threads: int) -> dict[str, Any]:
    spec = {"name": name, "paper": asdict(paper), "window": list(window), "repeats": repeats, "threads": threads}
    return run_worker([sys.executable, "-m", "pipelines.bench.models", "--worker", json.dumps(spec)],
                      f"bench worker for {name}")


def run(nets: list[str] | None = None, *, papers: dict[str, Paper] | None = None, window: tuple[int, int, int] = WINDOW,
        repeats: int = 3, threads: int | None = None, on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Measure ``nets`` (default: every registered volume net), each in a fresh subprocess.

    ``papers`` replaces :data:`PAPER` (and :data:`VARIANTS`) rows (tests use tiny settings); a net
    without a row is measured with its defaults and 14 classes. A net's :data:`VARIANTS` rows follow its own. ``on_row(result so far)`` is called after each net.
    Raises :class:`MedvitError` for a name that is not registered.
    """
    from medvit.nets import NETS

    table = {**PAPER, **(papers or {})}
    names = list(nets) if nets else NETS.names()
    unknown = [n for n in names if n not in NETS]
    if unknown:
        raise MedvitError(f"--nets: {', '.join(map(repr, unknown))} not registered; available: {', '.join(NETS.names())}")
    threads = threads or all_threads()
    res: dict[str, Any] = {"window": list(window), "repeats": repeats, "threads": threads, "rows": []}
    for name in names:
        res["rows"].append(_spawn(name, table.get(name, Paper()), window=window, repeats=repeats, threads=threads))
        if on_row is not None:
            on_row(res)
        # a variant runs beside its net unless ``papers`` replaces the net's row and not the variant's
        for label, (base, paper) in VARIANTS.items():
            if base != name or (name in (papers or {}) and label not in (papers or {})):
                continue
            row = _spawn(name, (papers or {}).get(label, paper), window=window, repeats=repeats, threads=threads)
            res["rows"].append({**row, "net": label})
            if on_row is not None:
                on_row(res)
    return res


def _m(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}"


def _g(n: float | None) -> str:
    return "-" if n is None else f"{n:.1f}" if n >= 1 else f"{n:.3g}"


COLUMNS = ("net", "params M", "ref. params M", "GFLOP window", "ref. GFLOP window", "paper window", "GFLOP paper window",
           "ref. GFLOP paper window", "ms/window 1 thread", "ms/window all threads", "peak RSS GiB", "reference")


def format_table(res: dict[str, Any]) -> str:
    """The rows as a markdown table (``-`` where a figure does not exist)."""
    win = window_key(res["window"])
    lines = [f"window {win}, batch 1, median of {res['repeats']} after a warm-up; all threads = {res['threads']}", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in res["rows"]:
        ref = r.get("reference") or {}
        rg = ref.get("gflops", {})
        paper = window_key(r["paper_window"])
        params = _m(r["params"]) + (f" ({_m(r['params_no_ds'])} without DS heads)" if "params_no_ds" in r else "")
        rparams = (_m(ref.get("params")) + (f" ({_m(ref['params_no_ds'])})" if "params_no_ds" in ref else "")) if ref else "-"
        differs = paper != win
        lat = r["ms_per_window"]
        ds = r.get("gflops_ds", {})

        def ours(w: str) -> str:
            return _g(r["gflops"][w]) + (f" ({_g(ds[w])} with DS heads)" if w in ds else "")

        cells = [r["net"], params, rparams, ours(win), _g(rg.get(win)), paper,
                 ours(paper) if differs else "-", _g(rg.get(paper)) if differs else "-",
                 f"{lat['1']:.0f}", f"{lat[str(r['threads'])]:.0f}", f"{r['peak_rss'] / 2**30:.2f}",
                 ref.get("source", "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, help="JSON: name, paper, window, repeats, threads")
    spec = json.loads(ap.parse_args(argv).worker)
    p = spec["paper"]
    paper = replace(Paper(**p), window=tuple(p["window"]))
    import medvit.nets  # noqa: F401  (registers the nets)

    try:
        row = measure(spec["name"], paper, window=tuple(spec["window"]), repeats=spec["repeats"], threads=spec["threads"])
    except MedvitError as e:  # a paper setting the net refuses: the parent repeats the one line
        print(f"{USER_ERROR}{e}", file=sys.stderr)
        sys.exit(e.exit_code)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
