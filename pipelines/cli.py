"""The ``medvit`` command line.

Errors the user caused (a bad file, folder, config or checkpoint) print one line on
stderr and exit with status 2; anything else is a bug and keeps its traceback. Heavy
imports happen inside the commands so ``medvit --help`` stays quick.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from medvit.errors import InputError, MedvitError

app = typer.Typer(
    name="medvit",
    help="Segment CT/MRI volumes with local/global-attention transformers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        import medvit

        typer.echo(f"medvit {medvit.__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print medvit's version and exit.")] = False,
) -> None:
    """Segment CT/MRI volumes with local/global-attention transformers."""


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


def _override_train(cfg, config: Path, **overrides) -> None:
    """Apply --output-dir/--datalist/--data-root to a config's train section."""
    if cfg.train is None:
        raise MedvitError(f"{config}: no 'train' section")
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg.train, key, value)


@contextlib.contextmanager
def _naming_config(config: Path):
    """A config error raised past loading (the net's own checks of model.*) names the config file too."""
    from medvit.errors import ConfigError

    try:
        yield
    except ConfigError as e:
        if str(e).startswith(str(config)):
            raise
        raise ConfigError(f"{config}: {e}") from None


def _check_overlap(overlap: float | None) -> None:
    if overlap is not None and not 0 <= overlap < 1:
        raise MedvitError(f"--overlap must lie in [0, 1), got {overlap}")


def _check_hu(skip_below_hu: float | None) -> None:
    if skip_below_hu is not None and not math.isfinite(skip_below_hu):  # nan skipped every window, silently
        raise MedvitError(f"--skip-below-hu must be a finite HU value such as -500, got {skip_below_hu}")


def _echo_trained(res, metric: str) -> None:
    best = "-" if res.best_metric is None else f"{res.best_metric:.4f} (epoch {res.best_epoch})"
    typer.echo(f"trained {res.epochs_run} epochs, {res.global_step} steps; best validation {metric} {best}")
    names = (["best.safetensors"] if res.best_metric is not None else []) + ["last.safetensors"]  # no validation: no best
    typer.echo("checkpoints: " + ", ".join(str(res.output_dir / n) for n in names))


def _device(device: str | None) -> str:
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


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config with a 'train' section.")],
    resume: Annotated[bool, typer.Option(help="Continue from the last resume checkpoint in the output folder.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when available.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Overrides train.output_dir.")] = None,
    datalist: Annotated[Optional[Path], typer.Option(help="Overrides train.datalist.")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Folder the datalist's relative paths start from.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a net from CONFIG; checkpoints and metrics.jsonl go to the output folder.
    Under torchrun --nproc_per_node=N it trains on N processes (DDP; batch_size per process)."""
    from medvit.config import load_config
    from pipelines.ddp import distributed
    from pipelines.train import train as run_train

    cfg = load_config(config)
    _override_train(cfg, config, output_dir=output_dir, datalist=datalist, data_root=data_root)
    with _naming_config(config), distributed(_device(device)) as (world, dev):
        res = run_train(cfg, device=dev, resume=resume, progress=progress and world.main)
        if world.main:
            _echo_trained(res, "mean Dice")


@app.command()
def pretrain(
    config: Annotated[Path, typer.Argument(help="YAML config with a 'pretrain' section.")],
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N; default cuda when available.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Overrides pretrain.output_dir.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Pretrain a net's encoder on unlabelled images (inpainting, rotation, contrast); the encoder
    checkpoint goes to the output folder, for model.pretrained in a training config."""
    from medvit.config import load_config
    from pipelines.ddp import world_from_env
    from pipelines.pretrain import pretrain as run_pretrain

    if world_from_env().size > 1:  # N copies would each pretrain alone and write the same files
        raise MedvitError("pretrain runs in one process; start it without torchrun (train and lidar train take torchrun)")
    cfg = load_config(config)
    if cfg.pretrain is None:
        raise MedvitError(f"{config}: no 'pretrain' section")
    if output_dir is not None:
        cfg.pretrain.output_dir = output_dir
    with _naming_config(config):
        path = run_pretrain(cfg, device=_device(device), progress=progress)
    typer.echo(f"pretrained encoder: {path}")


@app.command()
def segment(
    inputs: Annotated[list[str], typer.Argument(help="NIfTI/NRRD/MHA files or DICOM folders; 'a.nii.gz,b.nii.gz' is one case with one channel per file.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")],
    checkpoint: CheckpointOpt,
    config: ConfigOpt = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N.")] = None,
    overlap: OverlapOpt = None,
    batch_size: BatchSizeOpt = None,
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to read from a folder holding several.")] = None,
    stats: Annotated[bool, typer.Option(help="Write per-label voxel count, volume (mm³) and mean intensity (CSV, JSON).")] = False,
    preview: Annotated[bool, typer.Option(help="Write a PNG of three orthogonal slices with the labels.")] = False,
    nonfinite: NonFiniteOpt = NonFinite.error,
    resample: ResampleOpt = Resample.auto,
    skip_below_hu: SkipBelowHuOpt = None,
    tta: TtaOpt = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace outputs an earlier run left in OUT (refused otherwise).")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse an input whose DICOM Modality or intensities do not fit the checkpoint's CT/MRI (else a warning).")] = False,
    tilt: Annotated[Tilt, typer.Option(help="A gantry-tilted DICOM series: resample onto an orthogonal grid (outputs on it), keep its sheared grid, or refuse.")] = Tilt.resample,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="Also write NAME_seg.dcm, a DICOM SEG on the source slices (DICOM series input only).")] = False,
    seg_type: Annotated[Optional[SegType], typer.Option("--seg-type", help="With --dicom-seg: binary (default; read by most viewers) or labelmap (the 2024 Label Map SEG class).")] = None,
    rtstruct: Annotated[bool, typer.Option("--rtstruct", help="Also write NAME_rtstruct.dcm, a DICOM RT Structure Set with one ROI per label found (DICOM series input).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over windows.")] = True,
) -> None:
    """Segment INPUTS; writes NAME_seg.nii.gz label maps in each input's geometry, each with a NAME_seg.json of its provenance."""
    from medvit.checkpoint import load_checkpoint
    from medvit.config import load_config
    from pipelines.volume import segment_inputs

    if batch_size is not None and batch_size < 1:
        raise MedvitError(f"--batch-size must be at least 1, got {batch_size}")
    _check_overlap(overlap)
    _check_hu(skip_below_hu)
    if seg_type is not None and not dicom_seg:
        raise MedvitError("--seg-type chooses the DICOM SEG's type; it needs --dicom-seg")
    dev = _device(device)
    cfg = load_config(config) if config is not None else None
    model = load_checkpoint(checkpoint, config=cfg, device=dev)
    kw = dict(device=dev, overlap=overlap, batch_size=batch_size, series=series, nonfinite=nonfinite.value,
              stats=stats, preview=preview, resample=resample.value, skip_below_hu=skip_below_hu, tta=tta,
              progress=progress, strict=strict, tilt=tilt.value, dicom_seg=dicom_seg,
              seg_type=(seg_type or SegType.binary).value, rtstruct=rtstruct)
    results = segment_inputs([i.split(",") for i in inputs], model, out, overwrite=overwrite,
                             record={"config": str(config.resolve()) if config is not None else None}, **kw)
    for r in results:
        extra = [str(p) for p in (r.dicom_seg_path, r.rtstruct_path, r.sidecar_path, *r.stats_paths, r.preview_path)
                 if p]
        e = r.engine
        run = f"; {e.windows_run} windows run, {e.windows_skipped} skipped as empty, {e.seconds:.1f} s" if e else ""
        run += _notes(e) if e else ""
        typer.echo(f"{', '.join(r.input)} -> {r.labels_path}" + (f" ({', '.join(extra)})" if extra else "") + run)


@app.command()
def batch(
    source: Annotated[Path, typer.Argument(metavar="INPUT", help="A folder of cases (each NIfTI/NRRD/MHA file, each DICOM series subfolder), a MONAI datalist JSON, or a data_manifests/ manifest with --root.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder: OUT/<case id>/, cohort.csv, cohort.parquet, cases.csv.")],
    checkpoint: CheckpointOpt,
    config: ConfigOpt = None,
    root: Annotated[Optional[Path], typer.Option(help="The dataset's folder, for a manifest INPUT.")] = None,
    split: Annotated[Optional[str], typer.Option(help="The datalist's list to segment (default test); a manifest's training or validation (default both).")] = None,
    workers: Annotated[int, typer.Option(help="Ray workers, each holding the model once.")] = 1,
    address: Annotated[Optional[str], typer.Option(help="HOST:PORT of a running Ray cluster's head (default: a local Ray instance).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Torch threads (and Ray CPUs) per worker; default the CPUs divided among the workers.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N, on each worker (cuda: one GPU per worker).")] = None,
    overlap: OverlapOpt = None,
    batch_size: BatchSizeOpt = None,
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID to read where a case folder holds several.")] = None,
    stats: Annotated[bool, typer.Option(help="Also keep each case's NAME_stats.csv/json (the cohort table has them either way).")] = False,
    preview: Annotated[bool, typer.Option(help="Write a PNG of three orthogonal slices with the labels per case.")] = False,
    nonfinite: NonFiniteOpt = NonFinite.error,
    resample: ResampleOpt = Resample.auto,
    skip_below_hu: SkipBelowHuOpt = None,
    tta: TtaOpt = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail a case whose DICOM Modality or intensities do not fit the checkpoint (else a warning).")] = False,
    tilt: Annotated[Tilt, typer.Option(help="A gantry-tilted DICOM series: resample, keep its sheared grid, or fail the case.")] = Tilt.resample,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="Also write a DICOM SEG per case (a case that is not a DICOM series fails).")] = False,
    seg_type: Annotated[Optional[SegType], typer.Option("--seg-type", help="With --dicom-seg: binary (default) or labelmap.")] = None,
    rtstruct: Annotated[bool, typer.Option("--rtstruct", help="Also write a DICOM RTSTRUCT per case (DICOM series cases).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over cases.")] = True,
) -> int:
    """Segment a cohort on Ray: one folder per case id, a cohort table, reruns skip the cases done.
    Exit status 0 when every case is done, 10 + the number of failed cases (at most 109) otherwise."""
    from pipelines.batch import exit_status, run_batch

    if batch_size is not None and batch_size < 1:
        raise MedvitError(f"--batch-size must be at least 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise MedvitError(f"--threads must be at least 1, got {threads}")
    _check_overlap(overlap)
    _check_hu(skip_below_hu)
    if seg_type is not None and not dicom_seg:
        raise MedvitError("--seg-type chooses the DICOM SEG's type; it needs --dicom-seg")
    res = run_batch(source, out, checkpoint, config=config, root=root, split=split, workers=workers, address=address,
                    threads=threads, device=_device(device), progress=progress, overlap=overlap,
                    batch_size=batch_size, series=series, nonfinite=nonfinite.value, resample=resample.value,
                    skip_below_hu=skip_below_hu, tta=tta, strict=strict, tilt=tilt.value, dicom_seg=dicom_seg,
                    seg_type=(seg_type or SegType.binary).value if dicom_seg else None, rtstruct=rtstruct,
                    stats=stats, preview=preview)
    for case_id, message in sorted(res.failed.items()):
        typer.echo(f"medvit: case {case_id} failed: {message}", err=True)
    n = len(res.done) + len(res.skipped) + len(res.failed)
    typer.echo(f"{n} cases: {len(res.done)} segmented, {len(res.skipped)} already done (skipped), "
               f"{len(res.failed)} failed; {res.seconds:.1f} s"
               + (f" on {len(res.load_seconds)} Ray worker(s), each loading the checkpoint once "
                  f"({max(res.load_seconds):.1f} s)" if res.load_seconds else ""))
    typer.echo(f"tables: {res.tables[0]}, {res.tables[1]}; case ids -> sources: {res.cases_csv}")
    return exit_status(len(res.failed))


def _notes(report) -> str:
    """The engine's notes (out-of-memory fallbacks, taken or remembered) as "; note" parts."""
    return "".join(f"; {n}" for n in report.notes)


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Predicted label map.")],
    gt: Annotated[Path, typer.Argument(help="Reference label map on the same grid.")],
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Write the result as JSON here.")] = None,
    labels: Annotated[Optional[Path], typer.Option(help="JSON {id: name}, or a checkpoint's .json sidecar, for label names.")] = None,
    tolerance: Annotated[float, typer.Option(help="Surface Dice tolerance in mm.")] = 1.0,
    image: Annotated[Optional[Path], typer.Option("--image", help="The DICOM series a DICOM SEG or RTSTRUCT (PRED or GT) was drawn on; its labels are read onto it.")] = None,
) -> None:
    """Per-label Dice, HD95 and surface Dice of PRED against GT (label maps, DICOM SEG or RTSTRUCT)."""
    from pipelines.evaluate import evaluate_files, format_table, read_label_names, write_json

    # before the work: a bad -o should not cost the metrics' time
    _check_output_file(out, [pred, gt] + [p for p in (labels, image) if p is not None], "-o")
    names = read_label_names(labels) if labels is not None else None
    result = evaluate_files(pred, gt, labels=names, tolerance_mm=tolerance, image=image)
    typer.echo(format_table(result))
    if out is not None:
        write_json(result, out, protect=(pred, gt))
        typer.echo(f"written: {out}")


@app.command()
def series(folder: Annotated[Path, typer.Argument(help="A folder of DICOM files.")]) -> None:
    """List the DICOM series in FOLDER (UID, modality, file count, description; and the subfolder
    holding each, when series lie in subfolders)."""
    import os

    from medvit.io import list_dicom_series
    from medvit.io.dicom import no_series_found

    found = list_dicom_series(folder)
    if not found:
        raise MedvitError(f"{folder}: {no_series_found(Path(folder))}")
    root = folder if folder.is_dir() else folder.parent
    # the folder holding each series' files (their common one), relative to FOLDER
    where = [os.path.relpath(os.path.commonpath([str(f.parent) for f in s.files]), root) for s in found]
    nested = any(w != "." for w in where)
    for s, w in zip(found, where):
        typer.echo(f"{s.uid}\t{s.modality}\t{s.n_files} files\t{s.description}" + (f"\t{w}/" if nested else ""))


@app.command()
def datalist(
    manifest: Annotated[Path, typer.Argument(help="A file of data_manifests/, e.g. data_manifests/btcv.json.")],
    root: Annotated[Path, typer.Argument(help="Your local copy of the dataset.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Datalist JSON to write.")],
    fold: Annotated[Optional[int], typer.Option(help="Validation fold 0..4, for manifests split by folds (default 0).")] = None,
    sha256: Annotated[bool, typer.Option(help="Record each file's SHA-256.")] = False,
) -> None:
    """Build a MONAI datalist for a local copy of a public dataset, checking every file exists."""
    import json

    from medvit.data.manifest import build_datalist, datalist_files
    from medvit.io.writers import atomic_path, refuse_protected

    _check_output_file(out, [manifest], option="-o")  # before hashing a whole dataset
    dl = build_datalist(manifest, root, fold=fold, sha256=sha256)
    refuse_protected(out, datalist_files(dl))  # nor a file of the dataset
    with atomic_path(out) as tmp:
        Path(tmp).write_text(json.dumps(dl, indent=1))
    typer.echo(f"{out}: {len(dl['training'])} training and {len(dl['validation'])} validation cases of {dl['name']}")


@app.command()
def demo(
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder (default demo_out; demo_NET_out with --net NET; demo_lidar_out with --lidar).")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic data and the training run.")] = 0,
    net: Annotated[Optional[str], typer.Option("--net", help="The volume net to train (a registered name: unetr, swin_unetr, unet, ...; default unetr), in a small CPU configuration.")] = None,
    lidar: Annotated[bool, typer.Option("--lidar", help="The LiDAR demo instead: synthetic streets, FlatFormer, a 1M-point map.")] = False,
) -> None:
    """Make synthetic CT phantoms, train a small UNETR (or --net), segment held-out phantoms and a real CT (or --lidar)."""
    if lidar:
        if net is not None:
            raise MedvitError("--net picks the volume demo's net; the LiDAR demo (--lidar) trains FlatFormer")
        from pipelines.lidar_demo import run_lidar_demo

        from pipelines.engine.scene import bounded_onednn_cache

        with bounded_onednn_cache():  # before the first kernel, so validation and the map stay flat too
            run_lidar_demo(out or Path("demo_lidar_out"), device=_device(device), seed=seed)
        return
    from pipelines.demo import DEFAULT_NET, default_output, demo_config, run_demo

    net = net or DEFAULT_NET
    config = demo_config(net)  # an unknown net fails before the folder is made
    run_demo(out or default_output(net), device=_device(device), seed=seed, config=config)


def _parse_fill(items: list[str], features, checkpoint: Path) -> dict[str, float]:
    """``--fill`` values (``NAME=VALUE``, repeated or comma-separated) as name -> finite float, each a feature
    the checkpoint's net reads."""
    out: dict[str, float] = {}
    for item in (p.strip() for i in items for p in i.split(",")):
        name, sep, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name.strip() or not math.isfinite(number):
            raise MedvitError(f"--fill takes NAME=VALUE with a finite number, such as intensity=0.3, got {item!r}")
        if name.strip() not in features:
            raise MedvitError(f"--fill {item}: {checkpoint} reads no '{name.strip()}' (its features: "
                              f"{', '.join(features) or 'none'})")
        out[name.strip()] = number
    return out


lidar_app = typer.Typer(help="LiDAR scans and scenes: sparse-voxel point-cloud transformers.", no_args_is_help=True)
app.add_typer(lidar_app, name="lidar")


class LabelFormat(str, Enum):
    label = "label"
    npy = "npy"
    las = "las"


@lidar_app.command("segment")
def lidar_segment(
    scans: Annotated[list[str], typer.Argument(help="Scans: KITTI .bin, nuScenes .pcd.bin, .pcd, .ply, .las/.laz, .npy.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")],
    checkpoint: Annotated[Path, typer.Option(help="A LiDAR .safetensors checkpoint (with its .json sidecar).")],
    tile_size: Annotated[Optional[float], typer.Option(help="Tile edge in metres; default from the checkpoint.")] = None,
    overlap: Annotated[Optional[float], typer.Option(help="Tile overlap in [0, 1).")] = None,
    max_points: Annotated[Optional[int], typer.Option(help="Points budget per tile and per net call; denser tiles are split, sparse ones share a call.")] = None,
    format: Annotated[Optional[LabelFormat], typer.Option("--format", help="label (SemanticKITTI), npy, or las; default: las for LAS input, else label.")] = None,
    bin_columns: Annotated[Optional[int], typer.Option(help="float32 columns of .bin scans when not KITTI's 4 (nuScenes .pcd.bin: 5), e.g. 6 for mmdet3d's Waymo files: x, y, z, intensity, f4, f5.")] = None,
    z_offset: Annotated[float, typer.Option("--z-offset", help="Metres added to z before the net sees it (e.g. -407 for a survey at absolute heights against a sensor-frame net); the output keeps the file's coordinates.")] = 0.0,
    intensity_scale: Annotated[float, typer.Option("--intensity-scale", help="Multiplies intensity after it is normalised to the checkpoint's units.")] = 1.0,
    fill: Annotated[Optional[list[str]], typer.Option("--fill", help="NAME=VALUE: give every point of a scan that lacks feature NAME the constant VALUE (in the checkpoint's training units), at a loss of accuracy; repeat it or separate several with commas.")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Refuse a scan that lies outside the checkpoint's training ranges, or a .bin that another width reads far better, instead of warning.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over tiles.")] = True,
) -> None:
    """Per-point labels for each scan, in the scan's point order and count."""
    from pipelines.scene import check_scan_outputs, segment_scan
    from pointcloud.checkpoint import load_point_checkpoint

    _check_overlap(overlap)
    if tile_size is not None and not (math.isfinite(tile_size) and tile_size > 0):
        raise MedvitError(f"--tile-size must be a positive number of metres, got {tile_size}")
    if max_points is not None and max_points < 1:
        raise MedvitError(f"--max-points must be at least 1, got {max_points}")
    if bin_columns is not None and not 3 <= bin_columns <= 64:
        raise MedvitError(f"--bin-columns must be 3..64 (x, y, z and up to 61 more), got {bin_columns}")
    if not math.isfinite(z_offset):
        raise MedvitError(f"--z-offset must be a finite number of metres, got {z_offset}")
    if not (math.isfinite(intensity_scale) and intensity_scale > 0):
        raise MedvitError(f"--intensity-scale must be a positive number, got {intensity_scale}")
    label_format = format.value if format else None
    protect = check_scan_outputs(scans, out, label_format)
    dev = _device(device)
    model = load_point_checkpoint(checkpoint, device=dev)
    fills = _parse_fill(fill or [], model.config.features, checkpoint)
    if intensity_scale != 1.0 and "intensity" not in model.config.features:
        raise MedvitError(f"--intensity-scale: {checkpoint} reads no intensity (its features: "
                          f"{', '.join(model.config.features) or 'none'})")
    for s in scans:  # a scan that fails stops the run here; the earlier scans' outputs stay
        r = segment_scan(s, model, out, label_format=label_format, protect=protect, bin_columns=bin_columns,
                         z_offset=z_offset, intensity_scale=intensity_scale, strict=strict, fill=fills,
                         tile_size=tile_size, overlap=overlap, max_points=max_points, device=dev, progress=progress)
        extra = []
        if r.n_dropped:
            extra.append(f"{r.n_dropped:,} with NaN/inf coordinates")
        if r.n_bad_features:
            extra.append(f"{r.n_bad_features} with NaN/inf {'/'.join(model.config.features)}")
        if r.n_outside:
            extra.append(f"{r.n_outside} outside point_range")
        e = r.engine
        typer.echo(f"{s} -> {r.labels_path}: {r.n_points:,} points, {e.windows_run} tiles in {e.calls} calls, {e.seconds:.1f} s"
                   + _notes(e)
                   + (f" ({'; '.join(extra)}, labelled {r.unlabelled})" if extra else ""))


@lidar_app.command("train")
def lidar_train(
    config: Annotated[Path, typer.Argument(help="LiDAR YAML config with a 'train' section.")],
    resume: Annotated[bool, typer.Option(help="Continue from the last resume checkpoint.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Overrides train.output_dir.")] = None,
    datalist: Annotated[Optional[Path], typer.Option(help="Overrides train.datalist.")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="Folder the datalist's relative paths start from.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a point net (cross-entropy + Lovász-softmax, mIoU validation, atomic checkpoints, resume).
    Under torchrun --nproc_per_node=N it trains on N processes (DDP; batch_size per process)."""
    from pipelines.ddp import distributed
    from pipelines.scene import train_lidar
    from pointcloud.config import load_lidar_config

    cfg = load_lidar_config(config)
    _override_train(cfg, config, output_dir=output_dir, datalist=datalist, data_root=data_root)
    from pipelines.engine.scene import bounded_onednn_cache

    # training's varying crop shapes would fill oneDNN's cache as tiles do
    with bounded_onednn_cache(), _naming_config(config), distributed(_device(device)) as (world, dev):
        res = train_lidar(cfg, device=dev, resume=resume, progress=progress and world.main)
        if world.main:
            _echo_trained(res, "mIoU")


bench_app = typer.Typer(help="Benchmarks that measure us against the peer in the same run.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _triple(text: str, what: str, cast=int) -> tuple:
    try:
        vals = tuple(cast(v) for v in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3:
        raise MedvitError(f"{what} must be three comma-separated numbers, got {text!r}")
    return vals


def _check_output_file(path: Path | None, inputs: list[Path], option: str = "--json") -> None:
    """Before the work (a bench runs for minutes): ``option``'s file must be a writable file name
    that replaces no input (a folder input protects every file in it)."""
    if path is None:
        return
    from medvit.io.writers import check_output_folder, check_writable, refuse_protected

    if path.is_dir():
        raise InputError(path, f"is a folder; {option} takes a file name")
    check_output_folder(path.parent)
    protect = [f for p in inputs for f in (sorted(p.rglob("*")) if p.is_dir() else [p])]
    refuse_protected(path, protect)
    check_writable(path)


def _json_writer(path: Path | None):
    """A function that rewrites a bench result as JSON at ``path`` (through a temporary name; nothing
    when ``path`` is None). The benches call it after every run, so that a run cut short by a time
    limit (a GPU machine's) keeps what it measured."""

    def write(res: dict) -> None:
        if path is not None:
            from medvit.io.writers import atomic_path

            with atomic_path(path) as tmp:
                Path(tmp).write_text(json.dumps(res, indent=1))

    return write


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
    peer: Annotated[bool, typer.Option(help="Also run MONAI (off when its buffer cannot fit).")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the measurements as JSON.")] = None,
) -> None:
    """Our engine against MONAI's sliding_window_inference: time, model floor, windows, peak memory, agreement."""
    from pipelines.bench_engine import NETS, Case, compare, format_result, machine

    if model not in NETS:
        raise MedvitError(f"--model must be one of {', '.join(NETS)}, got {model!r}")
    if input is not None and not input.exists():
        raise MedvitError(f"{input}: no such file or DICOM folder")
    if output not in ("labels", "scores"):
        raise MedvitError(f"--output must be labels or scores, got {output!r}")
    _check_hu(skip_below_hu)
    if skip_below_hu is not None and input is None:
        raise MedvitError("--skip-below-hu needs --input (a CT in HU); random input has no HU")
    _check_overlap(overlap)
    if classes < 1:
        raise MedvitError(f"--classes must be at least 1, got {classes}")
    if batch < 1 or (our_batch is not None and our_batch < 1):
        raise MedvitError(f"--batch and --our-batch must be at least 1, got {batch} and {our_batch}")
    if output_device not in (None, "cpu", "cuda", "both"):
        raise MedvitError(f"--output-device must be cpu, cuda or both, got {output_device!r}")
    device = _device(device)
    if output_device in ("cuda", "both") and not device.startswith("cuda"):
        raise MedvitError(f"--output-device {output_device} needs --device cuda")
    _check_output_file(json_out, [input] if input else [])
    shape3, spacing3 = _triple(shape, "--shape"), _triple(spacing, "--spacing", float)
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
    outputs = ("cpu", "cuda") if output_device == "both" else (output_device,)
    if output_device == "both":
        output_device = None
    case = Case(model=model, shape=shape3, classes=classes, overlap=overlap, batch=batch, our_batch=our_batch,
                input=str(input) if input else None, spacing=spacing3,
                skip_below_hu=skip_below_hu, device=device, amp=amp, output_device=output_device, output=output,
                speedups=steps, fp32_reference=fp32_reference, batch_sweep=sweep)
    save = _json_writer(json_out)
    # the machine is named at the end: naming the GPU starts CUDA in this process, which
    # should not hold GPU memory while the workers are measured
    res = compare(case, peer=peer, peer_outputs=outputs, on_result=save)
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
    from pipelines.bench_engine import machine
    from pipelines.bench_models import format_table, run

    names = [n.strip() for n in nets.split(",") if n.strip()]
    if threads is not None and threads < 1 or repeats < 1:
        raise MedvitError(f"--threads and --repeats must be at least 1, got {threads} and {repeats}")
    _check_output_file(json_out, [])
    write = _json_writer(json_out)
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

    from pipelines.bench_engine import machine
    from pipelines.bench_lidar import format_result, run

    folder = data or Path(os.environ.get("MEDVIT_TEST_DATA", "../shared/data"))
    if not folder.is_dir():
        raise MedvitError(f"{folder}: no such data folder (the shared data with mmdet3d/ and friends; give --data)")
    try:
        n = tuple(int(v) for v in sizes.split(","))
    except ValueError:
        raise MedvitError(f"--sizes must be comma-separated point counts, got {sizes!r}") from None
    if min(n) < 1 or not tile > 0 or not math.isfinite(tile):
        raise MedvitError(f"--sizes and --tile must be positive, got {sizes!r} and {tile}")
    device = _device(device)
    _check_output_file(json_out, [folder / "mmdet3d" / "demo" / "data"])  # the scans it reads
    write = _json_writer(json_out)
    res = run(folder, device=device, sizes=n, tile=tile, on_row=write)
    res["machine"] = machine()  # at the end, as bench engine: naming the GPU starts CUDA in this process
    write(res)
    typer.echo(f"machine: {res['machine']}")
    typer.echo(format_result(res))


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors → one line on stderr and exit status 2."""
    import signal

    # SIGTERM (kill, a batch scheduler's time limit) unwinds like Ctrl-C, so temporary files are removed
    with contextlib.suppress(ValueError):  # (only the main thread may set it)
        signal.signal(signal.SIGTERM, _terminated)
    # click's exceptions, from whichever click typer runs on (newer typer vendors its own copy)
    click = sys.modules[typer.BadParameter.__module__]
    no_args_help = getattr(click, "NoArgsIsHelpError", ())
    try:
        rv = app(args=argv, prog_name="medvit", standalone_mode=False)
    except MedvitError as e:
        typer.echo(f"medvit: error: {e}", err=True)
        sys.exit(e.exit_code)
    except no_args_help as e:  # a bare command group: its help (already printed by typer), as click exits
        if e.format_message().strip():
            typer.echo(e.format_message(), err=True)
        sys.exit(e.exit_code)
    except click.UsageError as e:  # a bad or missing option: one line too, not click's boxed panel
        where = e.ctx.command_path if e.ctx is not None else "medvit"
        typer.echo(f"medvit: error: {' '.join(e.format_message().split())} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.ClickException as e:
        typer.echo(f"medvit: error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(e.exit_code)
    except (typer.Abort, getattr(click, "Abort", typer.Abort)):
        typer.echo("medvit: aborted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
