"""Options and checks the commands share: typer option types, the device check. The inference
options (``--overlap``, ``--batch-size``, ``--skip-below-hu``, ``--runtime``) are checked by
:func:`pipelines.engine.checks.check_options`."""

from __future__ import annotations

import contextlib
import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from medvit.core.errors import InputError, MedvitError
from pipelines.engine.checks import RUNTIMES


class NonFinite(str, Enum):
    error = "error"
    replace = "replace"


class Tilt(str, Enum):
    resample = "resample"
    keep = "keep"
    error = "error"


class SegType(str, Enum):
    binary = "binary"
    labelmap = "labelmap"


class Resample(str, Enum):
    auto = "auto"
    probs = "probs"
    labels = "labels"


# Options `segment` and `batch` share, spelled once
CheckpointOpt = Annotated[Path, typer.Option(help="Our .safetensors (with its .json sidecar) or a MONAI bundle model.pt.")]
ConfigOpt = Annotated[Optional[Path], typer.Option(help="Config naming the net; required for a .pt state dict.")]
OverlapOpt = Annotated[Optional[float], typer.Option(help="Window overlap in [0, 1); default from the checkpoint.")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(help="Windows per forward pass.")]
NonFiniteOpt = Annotated[NonFinite, typer.Option(help="NaN/inf voxels: refuse, or replace by the minimum and report.")]
ResampleOpt = Annotated[Resample, typer.Option(help="Back to the input grid: class scores (probs), nearest labels, or auto by size.")]
SkipBelowHuOpt = Annotated[Optional[float], typer.Option("--skip-below-hu", help="Skip windows with no voxel above this HU (CT); they become background.")]
TtaOpt = Annotated[bool, typer.Option(help="Mirror test-time augmentation over the three axes (8 passes).")]
# the options `train` and `lidar train` share
ResumeOpt = Annotated[bool, typer.Option(help="Continue from the last resume checkpoint in the output folder.")]
TrainDeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when available.")]
OutputDirOpt = Annotated[Optional[Path], typer.Option("--output-dir", help="Overrides train.output_dir.")]
DatalistOpt = Annotated[Optional[Path], typer.Option(help="Overrides train.datalist.")]
DataRootOpt = Annotated[Optional[Path], typer.Option("--data-root", help="Folder the datalist's relative paths start from.")]


Runtime = Enum("Runtime", {r: r for r in RUNTIMES}, type=str)
"""``--runtime``'s choices: the engine's own list, so the option offers exactly what it accepts."""


RuntimeOpt = Annotated[Runtime, typer.Option(help="What runs the net: torch, or its export (converted once, cached) on "
                                                  "OpenVINO or ONNX Runtime (CPU only), or auto (the fastest that matches torch).")]


def runtime_device(runtime: str, device: str | None) -> str:
    """``--device`` for ``--runtime``: a CPU-only runtime without ``--device`` runs on the CPU (not on
    a GPU it cannot use); with ``--device cuda`` it is a MedvitError naming both options. Also refuses,
    before any slow load, a runtime whose package is not installed (saying how to install it)."""
    from pipelines.engine import check_options
    from pipelines.engine.checks import CPU_ONLY_RUNTIMES

    if runtime in CPU_ONLY_RUNTIMES:
        from medvit.runtimes.backends import require

        check_options(runtime=runtime, device=device)
        require(runtime)
        if device is None:
            return "cpu"
    return pick_device(device)


def override_train(cfg, config: Path, **overrides) -> None:
    """Apply --output-dir/--datalist/--data-root to a config's train section."""
    if cfg.train is None:
        raise MedvitError(f"{config}: no 'train' section")
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg.train, key, value)


@contextlib.contextmanager
def naming_config(config: Path):
    """A config error raised past loading (the net's own checks of model.*) names the config file too."""
    from medvit.core.errors import ConfigError

    try:
        yield
    except ConfigError as e:
        if str(e).startswith(str(config)):
            raise
        raise ConfigError(f"{config}: {e}") from None


def echo_trained(res, metric: str) -> None:
    best = "-" if res.best_metric is None else f"{res.best_metric:.4f} (epoch {res.best_epoch})"
    typer.echo(f"trained {res.epochs_run} epochs, {res.global_step} steps; best validation {metric} {best}")
    names = (["best.safetensors"] if res.best_metric is not None else []) + ["last.safetensors"]  # no validation: no best
    typer.echo("checkpoints: " + ", ".join(str(res.output_dir / n) for n in names))


def run_training(train_fn, cfg, config: Path, *, device: str | None, resume: bool, progress: bool, metric: str,
                 **overrides) -> None:
    """Shared by ``train`` and ``lidar train``: the CLI's ``--output-dir``/``--datalist``/``--data-root``
    into ``cfg.train``, then ``train_fn(cfg, device=, resume=, progress=)`` on every torchrun rank
    (one process without torchrun), rank 0 reporting the checkpoints; a config error names ``config``."""
    from pipelines.ddp import distributed

    override_train(cfg, config, **overrides)
    with naming_config(config), distributed(pick_device(device)) as (world, dev):
        res = train_fn(cfg, device=dev, resume=resume, progress=progress and world.main)
        if world.main:
            echo_trained(res, metric)


def pick_device(device: str | None) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise MedvitError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MedvitError(f"--device {device}: no CUDA device is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MedvitError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    return str(dev)

def notes_line(report) -> str:
    """The engine's notes (out-of-memory fallbacks, taken or remembered) as "; note" parts."""
    return "".join(f"; {n}" for n in report.notes)


def parse_triple(text: str, what: str, cast=int) -> tuple:
    try:
        vals = tuple(cast(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise MedvitError(f"{what} must be three comma-separated numbers, got {text!r}")
    return vals


def check_output_file(path: Path | None, inputs: list[Path], option: str = "--json") -> None:
    """Before the work (a bench runs for minutes): ``option``'s file must be a writable file name
    that replaces no input (a folder input protects every file in it)."""
    if path is None:
        return
    from medvit.core.files import check_output_folder, check_writable, refuse_protected

    if path.is_dir():
        raise InputError(path, f"is a folder; {option} takes a file name")
    check_output_folder(path.parent)
    protect = [f for p in inputs for f in (sorted(p.rglob("*")) if p.is_dir() else [p])]
    refuse_protected(path, protect)
    check_writable(path)


def json_writer(path: Path | None):
    """A function that rewrites a bench result as JSON at ``path`` (through a temporary name; nothing
    when ``path`` is None). The benches call it after every run, so that a run cut short by a time
    limit (a GPU machine's) keeps what it measured."""

    def write(res: dict) -> None:
        if path is not None:
            from medvit.core.files import atomic_path

            with atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps(res, indent=1))

    return write


