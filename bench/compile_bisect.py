"""Which part of SwinUNETR does ``torch.compile`` get wrong on the GPU, and which way round it is exact?

On a GPU, SwinUNETR (SDPA, bf16 autocast) compiled whole leaves bf16 tolerance against the
unmodified net, where eager bf16 stays within it; on the CPU the compiled net stays within it too
(``docs/benchmarks.md``). Every row here is judged against the fp32 net
with the engine bench's rule (``pipelines.bench.engine.within_bf16_tolerance``), in this order:

1. the whole net compiled with the other attention paths (every row is timed per batch, so a
   path that stays within tolerance comes with its speed): MONAI's explicit softmax attention; SDPA
   with only its math backend;
2. one top-level part compiled at a time, the rest eager (SDPA): the part whose compiled form
   carries the error is where to look next (``--parts`` takes dotted names, e.g.
   ``swinViT.layers1``, to go deeper);
3. the whole net with SDPA as ``bench engine --speedups sdpa,compile`` runs it (the deviation
   itself), then with the inductor settings that change numerics
   (``KNOBS``).

The JSON is rewritten after every row, so a run cut short keeps what it measured.
On the GPU machine (carry ``.whl``; ``timeout`` keeps it inside one device call):
    source bench/gpu_env.sh && timeout 570 python3 bench/compile_bisect.py --json $OUT/compile_bisect.json
A dry run here: python3 bench/compile_bisect.py --device cpu --feature-size 12 --batch 2 --parts out --time-limit 120
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medvit.core.files import atomic_path
from medvit.nets.speedups import use_sdpa
from pipelines.bench.engine import Case, _input, _net, _time_batch, _window_batch, within_bf16_tolerance

KNOBS = {"emulate_precision_casts": True}
"""Inductor settings tried on the whole net (those that exist in this torch): rounding
intermediates to bf16 where eager would, instead of keeping them in fp32."""


def _set(net: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def _attention(net: torch.nn.Module, sdpa: bool) -> None:
    """SDPA as ``bench engine`` switches it on (``use_sdpa``), or MONAI's explicit softmax attention on every block."""
    if sdpa:
        use_sdpa(net)
        return
    for m in net.modules():
        if hasattr(m, "use_flash_attention"):
            m.use_flash_attention = False


def _math_sdpa(net: torch.nn.Module):
    """``net`` with SDPA restricted to its math backend (no fused kernel), as one callable to compile."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(x: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel([SDPBackend.MATH]):
            return net(x)

    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--feature-size", type=int, default=48)
    ap.add_argument("--roi", type=int, default=96)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--parts", default="", help="comma-separated (dotted) submodule names; default: every top-level one")
    ap.add_argument("--time-limit", type=float, default=540.0, help="start no new compile after this many seconds")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    t_start = time.perf_counter()
    dev = torch.device(a.device)
    reps = 10 if dev.type == "cuda" else 1
    torch.set_grad_enabled(False)
    case = Case(model="swin_unetr", shape=(a.roi * 3 // 2,) * 3, classes=14, roi=a.roi)
    net = _net(case, dev, {"feature_size": a.feature_size})
    use_sdpa(net)
    x = _input(case)[0]  # seeded noise
    xb = _window_batch(case, x, a.batch, dev)
    ref32 = net(xb).float()
    scale = float(ref32.abs().max())

    def bf16(fn) -> tuple[torch.Tensor, float, float]:
        """(output, seconds of the first call, milliseconds per later call), as ``bench engine`` times a step."""
        return _time_batch(fn, xb, dev, torch.bfloat16, reps)

    rows: list[dict] = []
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "feature_size": a.feature_size, "roi": a.roi, "batch": a.batch, "rows": rows}

    def row(label: str, y: torch.Tensor, first_s: float | None, ms: float | None) -> None:
        r = {"compiled": label, "first_call_s": first_s, "ms_per_batch": ms,
             "max_abs_diff_fp32": float((y - ref32).abs().max()),
             "labels_equal_fp32": float((y.argmax(1) == ref32.argmax(1)).float().mean())}
        r["max_rel_diff_fp32"] = r["max_abs_diff_fp32"] / max(scale, 1e-12)
        if rows:
            r["within_bf16_tolerance"] = within_bf16_tolerance(r, rows[0])
        rows.append(r)
        print(f"{label:<44} {'' if ms is None else format(ms, '8.1f') + ' ms':>11} "
              f"{'' if first_s is None else format(first_s, '6.1f') + ' s':>8}  vs fp32: "
              f"{100 * r['max_rel_diff_fp32']:6.2f} % of max |logit|, argmax {100 * r['labels_equal_fp32']:.3f} %"
              + ("" if "within_bf16_tolerance" not in r else "  ok" if r["within_bf16_tolerance"] else "  OUTSIDE"), flush=True)
        if a.json:
            with atomic_path(a.json) as tmp:
                tmp.write_text(json.dumps(res, indent=1))

    row("nothing: eager bf16, SDPA", *bf16(net))
    _attention(net, False)
    row("nothing: eager bf16, explicit attention", *bf16(net))
    _attention(net, True)
    longest = {True: 0.0, False: 0.0}  # the longest first call so far, whole net / one part

    def compiled(label: str, module_name: str | None = None, *, sdpa: bool = True, math: bool = False,
                 knobs: dict | None = None) -> None:
        whole = module_name is None
        if time.perf_counter() - t_start + 1.5 * longest[whole] > a.time_limit:
            print(f"{label}: not run, time limit", flush=True)
            return
        import torch._inductor.config as inductor

        saved = {k: getattr(inductor, k) for k in knobs or {}}
        orig = net.get_submodule(module_name) if module_name else net
        torch._dynamo.reset()
        _attention(net, sdpa)
        try:
            for k, v in (knobs or {}).items():
                setattr(inductor, k, v)
            c = torch.compile(_math_sdpa(net) if math else orig, dynamic=False)
            if module_name:
                _set(net, module_name, c)
            y, first, ms = bf16(c if whole else net)
            longest[whole] = max(longest[whole], first)
            row(label, y, first, ms)
        except Exception as e:  # a part that fails to compile is a finding too
            print(f"{label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        finally:
            if module_name:
                _set(net, module_name, orig)
            _attention(net, True)
            for k, v in saved.items():
                setattr(inductor, k, v)

    compiled("whole net, explicit attention", sdpa=False)
    compiled("whole net, SDPA math backend only", math=True)
    for name in [p for p in a.parts.split(",") if p] or [n for n, _ in net.named_children()]:
        compiled(f"{name} only (SDPA)", name)
    compiled("whole net, SDPA (as benched)")
    import torch._inductor.config as inductor

    for k, v in KNOBS.items():
        if hasattr(inductor, k):
            compiled(f"whole net, SDPA, {k}={v}", knobs={k: v})


if __name__ == "__main__":
    main()
