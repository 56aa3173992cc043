"""Benchmark commands: ``bench engine``, ``bench models``, ``bench lidar``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from medvit.core.errors import MedvitError
from pipelines.cli.app import bench_app
from pipelines.cli.options import (
    check_output_file,
    json_writer,
    parse_triple,
    pick_device,
)


@bench_app.command("engine")
def bench_engine(
    model: Annotated[str, typer.Option(help="unetr, swin_unetr, or small (a tiny UNETR).")] = "unetr",
    shape: Annotated[str, typer.Option(help="D,H,W of a random input (ignored with --input).")] = "192,192,128",
    classes: Annotated[int, typer.Option(help="Output classes.")] = 14,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    overlap: Annotated[float, typer.Option(help="Window overlap.")] = 0.5,
    batch: Annotated[int, typer.Option(help="MONAI's windows per forward pass (sw_batch_size).")] = 4,
    our_batch: Annotated[Optional[int], typer.Option(help="Ours; default 1 on the CPU (as medvit segment runs), else --batch.")] = None,
    input: Annotated[Optional[Path], typer.Option(help="A real CT (NIfTI file or DICOM series folder) instead of random input; resampled to --spacing.")] = None,
    spacing: Annotated[str, typer.Option(help="Spacing in mm for --input.")] = "1.5,1.5,2.0",
    skip_below_hu: Annotated[Optional[float], typer.Option("--skip-below-hu", help="Ours: skip windows with no voxel above this HU.")] = None,
    amp: Annotated[bool, typer.Option(help="bf16 autocast (meant for CUDA; on the CPU it runs, slowly).")] = False,
    output_device: Annotated[Optional[str], typer.Option(help="Where MONAI keeps its stitched output: cpu, cuda, or both (two MONAI runs).")] = None,
    output: Annotated[str, typer.Option(help="labels (argmax, bounded memory) or scores (blended outputs, compared exactly).")] = "labels",
    speedups: Annotated[str, typer.Option(help="Ours, as a second run: comma-separated model speed-ups (sdpa, cudnn_benchmark, channels_last, compile), each timed.")] = "",
    batch_sweep: Annotated[str, typer.Option(help="With eager --speedups: also time the sped-up net at these batch sizes (e.g. 8,16); its engine run uses the fastest per window.")] = "",
    fp32_reference: Annotated[bool, typer.Option(help="With --amp and --speedups: also run ours in fp32 and compare both bf16 runs' labels with it.")] = False,
    runtime: Annotated[str, typer.Option(help="Comma-separated runtimes for ours (torch, openvino, onnxruntime, auto), each in its own worker, against torch fp32 (which always runs).")] = "torch",
    peer: Annotated[bool, typer.Option(help="Also run MONAI (off when its buffer cannot fit).")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the measurements as JSON.")] = None,
) -> None:
    """Our engine against MONAI's sliding_window_inference: time, model floor, windows, peak memory, agreement."""
    from pipelines.bench.engine import NETS, Case, compare, format_result, machine
    from pipelines.engine import check_options

    if model not in NETS:
        raise MedvitError(f"--model must be one of {', '.join(NETS)}, got {model!r}")
    if input is not None and not input.exists():
        raise MedvitError(f"{input}: no such file or DICOM folder")
    if output not in ("labels", "scores"):
        raise MedvitError(f"--output must be labels or scores, got {output!r}")
    check_options(skip_below_hu=skip_below_hu)
    if skip_below_hu is not None and input is None:
        raise MedvitError("--skip-below-hu needs --input (a CT in HU); random input has no HU")
    check_options(overlap=overlap)
    if classes < 1:
        raise MedvitError(f"--classes must be at least 1, got {classes}")
    if batch < 1 or (our_batch is not None and our_batch < 1):
        raise MedvitError(f"--batch and --our-batch must be at least 1, got {batch} and {our_batch}")
    if output_device not in (None, "cpu", "cuda", "both"):
        raise MedvitError(f"--output-device must be cpu, cuda or both, got {output_device!r}")
    device = pick_device(device)
    if output_device in ("cuda", "both") and not device.startswith("cuda"):
        raise MedvitError(f"--output-device {output_device} needs --device cuda")
    check_output_file(json_out, [input] if input else [])
    shape3, spacing3 = parse_triple(shape, "--shape"), parse_triple(spacing, "--spacing", float)
    if not all(math.isfinite(v) for v in spacing3) or min(shape3) < 1 or min(spacing3) <= 0:
        raise MedvitError(f"--shape and --spacing must be positive, got {shape!r} and {spacing!r}")
    if our_batch is None:
        our_batch = 1 if device == "cpu" else batch
    from medvit.nets.speedups import STEPS

    steps = tuple(v for v in speedups.split(",") if v)
    if any(v not in STEPS for v in steps):
        raise MedvitError(f"--speedups takes {', '.join(STEPS)}, got {speedups!r}")
    try:
        sweep = tuple(int(v) for v in batch_sweep.split(",") if v)
    except ValueError:
        raise MedvitError(f"--batch-sweep takes batch sizes like 8,16, got {batch_sweep!r}") from None
    if sweep and (not steps or "compile" in steps or min(sweep) < 1):
        raise MedvitError("--batch-sweep takes positive batch sizes and needs eager --speedups (compile would recompile per size)")
    if fp32_reference and not (amp and steps):
        raise MedvitError("--fp32-reference compares bf16 runs with fp32: it needs --amp and --speedups")
    runtimes = tuple(dict.fromkeys(v.strip() for v in runtime.split(",") if v.strip())) or ("torch",)
    for r in runtimes:
        check_options(runtime=r, device=device)
    converted = [r for r in runtimes if r != "torch"]
    if converted and amp:
        raise MedvitError("--runtime compares each runtime with ours on torch fp32; leave out --amp")
    for r in converted:
        if r != "auto":
            from medvit.runtimes.backends import require

            require(r)  # before any worker starts
    outputs = ("cpu", "cuda") if output_device == "both" else (output_device,)
    if output_device == "both":
        output_device = None
    case = Case(model=model, shape=shape3, classes=classes, overlap=overlap, batch=batch, our_batch=our_batch,
                input=str(input) if input else None, spacing=spacing3,
                skip_below_hu=skip_below_hu, device=device, amp=amp, output_device=output_device, output=output,
                speedups=steps, fp32_reference=fp32_reference, batch_sweep=sweep)
    save = json_writer(json_out)
    # the machine is named at the end: naming the GPU starts CUDA in this process, which
    # should not hold GPU memory while the workers are measured
    res = compare(case, peer=peer, peer_outputs=outputs, on_result=save, runtimes=runtimes)
    res["machine"] = machine()
    save(res)
    typer.echo(f"machine: {res['machine']}")
    typer.echo(format_result(res))


@bench_app.command("models")
def bench_models(
    nets: Annotated[str, typer.Option(help="Comma-separated registered volume nets (default: all).")] = "",
    threads: Annotated[Optional[int], typer.Option(help="The 'all threads' latency's thread count (default: the CPUs this process may use).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed calls per latency (the median is reported), after one warm-up.")] = 3,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the measurements as JSON.")] = None,
) -> None:
    """Every volume net in its paper configuration: parameters, GFLOPs, CPU latency per window, peak RSS, reference figures."""
    from pipelines.bench.engine import machine
    from pipelines.bench.models import format_table, run

    names = [n.strip() for n in nets.split(",") if n.strip()]
    if threads is not None and threads < 1 or repeats < 1:
        raise MedvitError(f"--threads and --repeats must be at least 1, got {threads} and {repeats}")
    check_output_file(json_out, [])
    write = json_writer(json_out)
    res = run(names or None, repeats=repeats, threads=threads, on_row=write)
    res["machine"] = machine()
    write(res)
    typer.echo(f"machine: {res['machine']}")
    typer.echo(format_table(res))


@bench_app.command("lidar")
def bench_lidar(
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    data: Annotated[Optional[Path], typer.Option(help="The shared data folder (default MEDVIT_TEST_DATA or ../shared/data).")] = None,
    sizes: Annotated[str, typer.Option(help="Synthetic map sizes for the memory-vs-size check.")] = "1000000,4000000,10000000",
    tile: Annotated[float, typer.Option(help="Tile size in metres.")] = 50.0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the measurements as JSON.")] = None,
) -> None:
    """Backbones at equal width on real scans and a 1M-point map; scene memory against scene size."""
    import os

    from pipelines.bench.engine import machine
    from pipelines.bench.lidar import format_result, run

    folder = data or Path(os.environ.get("MEDVIT_TEST_DATA", "../shared/data"))
    if not folder.is_dir():
        raise MedvitError(f"{folder}: no such data folder (the shared data with mmdet3d/ and friends; give --data)")
    try:
        n = tuple(int(v) for v in sizes.split(","))
    except ValueError:
        raise MedvitError(f"--sizes must be comma-separated point counts, got {sizes!r}") from None
    if min(n) < 1 or not tile > 0 or not math.isfinite(tile):
        raise MedvitError(f"--sizes and --tile must be positive, got {sizes!r} and {tile}")
    device = pick_device(device)
    check_output_file(json_out, [folder / "mmdet3d" / "demo" / "data"])  # the scans it reads
    write = json_writer(json_out)
    res = run(folder, device=device, sizes=n, tile=tile, on_row=write)
    res["machine"] = machine()  # at the end, as bench engine: naming the GPU starts CUDA in this process
    write(res)
    typer.echo(f"machine: {res['machine']}")
    typer.echo(format_result(res))


