"""Volume commands: ``train``, ``pretrain``, ``segment``, ``batch``, ``evaluate``, ``series``,
``datalist``, ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medvit.core.errors import MedvitError
from pipelines.cli.app import app
from pipelines.cli.options import (
    BatchSizeOpt,
    CheckpointOpt,
    ConfigOpt,
    DatalistOpt,
    DataRootOpt,
    NonFinite,
    NonFiniteOpt,
    OutputDirOpt,
    OverlapOpt,
    Resample,
    ResampleOpt,
    ResumeOpt,
    Runtime,
    RuntimeOpt,
    SegType,
    SkipBelowHuOpt,
    Tilt,
    TrainDeviceOpt,
    TtaOpt,
    check_output_file,
    naming_config,
    notes_line,
    pick_device,
    run_training,
    runtime_device,
)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config with a 'train' section.")],
    resume: ResumeOpt = False,
    device: TrainDeviceOpt = None,
    output_dir: OutputDirOpt = None,
    datalist: DatalistOpt = None,
    data_root: DataRootOpt = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a net from CONFIG; checkpoints and metrics.jsonl go to the output folder.
    Under torchrun --nproc_per_node=N it trains on N processes (DDP; batch_size per process)."""
    from medvit.config import load_config
    from pipelines.volume.train import train as run_train

    run_training(run_train, load_config(config), config, device=device, resume=resume, progress=progress,
                 metric="mean Dice", output_dir=output_dir, datalist=datalist, data_root=data_root)


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
    from pipelines.volume.pretrain import pretrain as run_pretrain

    if world_from_env().size > 1:  # N copies would each pretrain alone and write the same files
        raise MedvitError("pretrain runs in one process; start it without torchrun (train and lidar train take torchrun)")
    cfg = load_config(config)
    if cfg.pretrain is None:
        raise MedvitError(f"{config}: no 'pretrain' section")
    if output_dir is not None:
        cfg.pretrain.output_dir = output_dir
    with naming_config(config):
        path = run_pretrain(cfg, device=pick_device(device), progress=progress)
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
    runtime: RuntimeOpt = Runtime.torch,
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
    from pipelines.engine import Engine, check_options
    from pipelines.volume.segment import segment_inputs, volume_settings

    check_options(batch_size=batch_size, overlap=overlap, skip_below_hu=skip_below_hu)  # before a slow load
    if seg_type is not None and not dicom_seg:
        raise MedvitError("--seg-type chooses the DICOM SEG's type; it needs --dicom-seg")
    dev = runtime_device(runtime.value, device)
    cfg = load_config(config) if config is not None else None
    model = load_checkpoint(checkpoint, config=cfg, device=dev)
    engine = Engine(volume_settings(model.config, device=dev, overlap=overlap, batch_size=batch_size,
                                    skip_below_hu=skip_below_hu, tta=tta, runtime=runtime.value))
    kw = dict(engine=engine, series=series, nonfinite=nonfinite.value, stats=stats, preview=preview,
              resample=resample.value, progress=progress, strict=strict, tilt=tilt.value, dicom_seg=dicom_seg,
              seg_type=(seg_type or SegType.binary).value, rtstruct=rtstruct)
    results = segment_inputs([i.split(",") for i in inputs], model, out, overwrite=overwrite,
                             record={"config": str(config.resolve()) if config is not None else None}, **kw)
    for r in results:
        extra = [str(p) for p in (r.dicom_seg_path, r.rtstruct_path, r.sidecar_path, *r.stats_paths, r.preview_path)
                 if p]
        e = r.engine
        run = f"; {e.windows_run} windows run, {e.windows_skipped} skipped as empty, {e.seconds:.1f} s" if e else ""
        run += notes_line(e) if e else ""
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
    runtime: RuntimeOpt = Runtime.torch,
    strict: Annotated[bool, typer.Option("--strict", help="Fail a case whose DICOM Modality or intensities do not fit the checkpoint (else a warning).")] = False,
    tilt: Annotated[Tilt, typer.Option(help="A gantry-tilted DICOM series: resample, keep its sheared grid, or fail the case.")] = Tilt.resample,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="Also write a DICOM SEG per case (a case that is not a DICOM series fails).")] = False,
    seg_type: Annotated[Optional[SegType], typer.Option("--seg-type", help="With --dicom-seg: binary (default) or labelmap.")] = None,
    rtstruct: Annotated[bool, typer.Option("--rtstruct", help="Also write a DICOM RTSTRUCT per case (DICOM series cases).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over cases.")] = True,
) -> int:
    """Segment a cohort on Ray: one folder per case id, a cohort table, reruns skip the cases done.
    Exit status 0 when every case is done, 10 + the number of failed cases (at most 109) otherwise."""
    from pipelines.engine import check_options
    from pipelines.volume.batch import exit_status, run_batch

    check_options(batch_size=batch_size)
    if threads is not None and threads < 1:
        raise MedvitError(f"--threads must be at least 1, got {threads}")
    check_options(overlap=overlap, skip_below_hu=skip_below_hu)
    if seg_type is not None and not dicom_seg:
        raise MedvitError("--seg-type chooses the DICOM SEG's type; it needs --dicom-seg")
    dev = runtime_device(runtime.value, device)
    res = run_batch(source, out, checkpoint, config=config, root=root, split=split, workers=workers, address=address,
                    threads=threads, device=dev, progress=progress, overlap=overlap,
                    batch_size=batch_size, runtime=runtime.value, series=series, nonfinite=nonfinite.value, resample=resample.value,
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
    from pipelines.volume.evaluate import (
        evaluate_files,
        format_table,
        read_label_names,
        write_json,
    )

    # before the work: a bad -o should not cost the metrics' time
    check_output_file(out, [pred, gt] + [p for p in (labels, image) if p is not None], "-o")
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

    from medvit.core.files import atomic_path, refuse_protected
    from medvit.data.manifest import build_datalist, datalist_files

    check_output_file(out, [manifest], option="-o")  # before hashing a whole dataset
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
        from pipelines.engine.points import bounded_onednn_cache
        from pipelines.lidar.demo import run_lidar_demo

        with bounded_onednn_cache():  # before the first kernel, so validation and the map stay flat too
            run_lidar_demo(out or Path("demo_lidar_out"), device=pick_device(device), seed=seed)
        return
    from pipelines.volume.demo import DEFAULT_NET, default_output, demo_config, run_demo

    net = net or DEFAULT_NET
    config = demo_config(net)  # an unknown net fails before the folder is made
    run_demo(out or default_output(net), device=pick_device(device), seed=seed, config=config)


