"""The command line: user errors exit 2 with one line and no traceback, and write nothing."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medvit.checkpoint import save_checkpoint
from medvit.config import parse_config
from medvit.data.phantom import LABELS
from medvit.nets import build_net
from tests.helpers import TINY, assert_user_error, run_cli


def test_segment_writes_labels_in_input_geometry(ckpt, phantom, tmp_path, capsys):
    out = tmp_path / "seg"
    code, stdout, err = run_cli(["segment", str(phantom), "-o", str(out), "--checkpoint", str(ckpt), "--stats", "--preview"], capsys)
    assert code == 0, err
    seg = nib.load(out / "case_seg.nii.gz")
    src = nib.load(phantom)
    assert seg.shape == src.shape
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)
    assert seg.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(seg.dataobj))) <= set(LABELS)
    rows = json.loads((out / "case_stats.json").read_text())
    assert all(r["volume_mm3"] == pytest.approx(r["voxels"] * 7 * 6 * 9) for r in rows)
    assert (out / "case_stats.csv").read_text().startswith("id,")
    assert (out / "case_preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "case_seg.nii.gz" in stdout


def test_segment_2d_nifti_keeps_its_shape(ckpt, phantom, tmp_path, capsys):
    """A 2D NIfTI (X, Y) runs as X x Y x 1; its label map came back (X, Y, 1)."""
    src = nib.load(phantom)
    nib.save(nib.Nifti1Image(np.asarray(src.dataobj)[:, :, 5], src.affine), tmp_path / "slice.nii.gz")
    code, _, err = run_cli(["segment", str(tmp_path / "slice.nii.gz"), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                            "--stats"], capsys)
    assert code == 0, err
    seg = nib.load(tmp_path / "o" / "slice_seg.nii.gz")
    assert seg.shape == src.shape[:2]
    np.testing.assert_allclose(seg.affine, src.affine, atol=1e-4)


def test_segment_dicom_folder_keeps_dicom_geometry(ckpt, data_dir, tmp_path, capsys):
    from medvit.io import read_image

    src = data_dir / "dcmqi" / "segmentations" / "ct-3slice"
    out = tmp_path / "seg"
    code, _, err = run_cli(["segment", str(src), "-o", str(out), "--checkpoint", str(ckpt)], capsys)
    assert code == 0, err
    seg = nib.load(out / "ct-3slice_seg.nii.gz")
    img = read_image(src)
    assert seg.shape == tuple(img.shape[1:]) == (512, 512, 3)
    np.testing.assert_allclose(seg.affine, np.asarray(img.affine), atol=1e-4)


def test_segment_refuses_to_overwrite_an_input(ckpt, phantom, tmp_path, capsys):
    """y.nii.gz would be written as y_seg.nii.gz, which is also an input of the same run."""
    shutil.copy(phantom, tmp_path / "y.nii.gz")
    victim = tmp_path / "y_seg.nii.gz"
    shutil.copy(phantom, victim)
    before = victim.read_bytes()
    assert_user_error(["segment", str(tmp_path / "y.nii.gz"), str(victim), "-o", str(tmp_path), "--checkpoint", str(ckpt)],
                      capsys, "y_seg.nii.gz", "overwritten")
    assert victim.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y.nii.gz", "y_seg.nii.gz"]


def test_grouped_channels_are_checked_like_single_inputs(ckpt, phantom, tmp_path, capsys):
    """A comma group (one case, a file per channel) was neither protected nor checked for name
    clashes (found by review: an input named x_seg.nii.gz was replaced by x,y's labels)."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for n in ("x", "y"):
            shutil.copy(phantom, tmp_path / sub / f"{n}.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    victim = out / "x_seg.nii.gz"
    shutil.copy(phantom, victim)
    before = victim.read_bytes()
    group = f"{tmp_path / 'a' / 'x.nii.gz'},{tmp_path / 'a' / 'y.nii.gz'}"
    assert_user_error(["segment", str(victim), group, "-o", str(out), "--checkpoint", str(ckpt)], capsys,
                      "x_seg.nii.gz: is an input and would be overwritten by the output of")
    assert victim.read_bytes() == before
    other = f"{tmp_path / 'b' / 'x.nii.gz'},{tmp_path / 'b' / 'y.nii.gz'}"
    assert_user_error(["segment", group, other, "-o", str(tmp_path / "o2"), "--checkpoint", str(ckpt)], capsys,
                      "would write the same output name 'x'", out_dir=tmp_path / "o2")
    assert_user_error(["segment", f"{phantom},", "-o", str(tmp_path / "o3"), "--checkpoint", str(ckpt)], capsys,
                      "has an empty path (a stray comma?)", out_dir=tmp_path / "o3")


def test_segment_output_that_is_a_file_or_cannot_be_made(ckpt, phantom, tmp_path, capsys):
    assert_user_error(["segment", str(phantom), "-o", str(phantom), "--checkpoint", str(ckpt)], capsys,
                      "case.nii.gz: is a file; the output must be a folder")
    assert_user_error(["segment", str(phantom), "-o", "/proc/medvit_cannot_be_made", "--checkpoint", str(ckpt),
                       "--no-progress"], capsys, "/proc/medvit_cannot_be_made/case_seg.nii.gz: cannot be written")  # before inference
    for hu in ("nan", "inf"):  # nan skipped every window and wrote all background
        assert_user_error(["segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                           "--skip-below-hu", hu], capsys, "--skip-below-hu must be a finite HU value", out_dir=tmp_path / "o")


@pytest.mark.parametrize("command", ["segment", "batch"])
@pytest.mark.parametrize("option, value, message", [
    ("--overlap", "1.5", "--overlap must lie in [0, 1), got 1.5"),
    ("--overlap", "-0.1", "--overlap must lie in [0, 1), got -0.1"),
    ("--batch-size", "0", "--batch-size must be at least 1, got 0"),
])
def test_bad_inference_options_name_the_option_before_the_checkpoint_is_read(command, option, value, message, phantom,
                                                                             tmp_path, capsys):
    """Checked before the checkpoint (here a file that does not exist) is loaded."""
    err = assert_user_error([command, str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "none"),
                             option, value], capsys, message, out_dir=tmp_path / "o")
    assert "none" not in err


def test_lidar_segment_names_a_bad_overlap_before_the_checkpoint_is_read(tmp_path, capsys):
    scan = tmp_path / "scan.npy"
    np.save(scan, np.zeros((4, 3), np.float32))
    assert_user_error(["lidar", "segment", str(scan), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "none"),
                       "--overlap", "1.0"], capsys, "--overlap must lie in [0, 1), got 1.0", out_dir=tmp_path / "o")


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, data_dir, phantom) -> dict[str, Path]:
    f = tmp_path_factory.mktemp("bad")
    raw = phantom.read_bytes()
    (f / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (f / "nodicom").mkdir()
    (f / "nodicom" / "readme.txt").write_text("not an image")
    corrupt = f / "corrupt_dicom"
    corrupt.mkdir()
    for src in sorted((data_dir / "dcmqi" / "segmentations" / "ct-3slice").glob("*.dcm")):
        b = src.read_bytes()
        (corrupt / src.name).write_bytes(b if src.name != "02.dcm" else b[: len(b) - 200_000])
    mixed = f / "mixed"
    mixed.mkdir()
    for src in (data_dir / "dcmqi" / "segmentations" / "ct-3slice").glob("*.dcm"):
        shutil.copy(src, mixed / f"a_{src.name}")
    for src in (data_dir / "totalsegmentator" / "example_ct_dicom").glob("*"):
        shutil.copy(src, mixed / f"b_{src.name}")
    seg = f / "seg"
    seg.mkdir()
    shutil.copy(data_dir / "dcmqi" / "segmentations" / "liver.dcm", seg / "liver.dcm")
    img = nib.load(phantom)
    two = np.stack([np.asarray(img.dataobj)] * 2, -1).astype(np.int16)
    nib.save(nib.Nifti1Image(two, img.affine), f / "twochannel.nii.gz")
    nan = np.asarray(img.dataobj).astype(np.float32)
    nan[3, 4, 5] = np.nan
    nan[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(nan, img.affine), f / "nan.nii.gz")
    huge = np.asarray(img.dataobj).astype(np.float64)
    huge[2, 2, 2] = 1e300  # past float32: inf once cast, and numpy's overflow warning must not add a line
    nib.save(nib.Nifti1Image(huge, img.affine), f / "huge.nii.gz")
    metres = img.affine.copy()
    metres[:3, :3] *= 1000.0  # spacing written in micrometres: a resample to a multi-TB grid
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), metres), f / "micrometres.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 0, 4), np.int16), img.affine), f / "novoxels.nii.gz")
    rgb = np.zeros((8, 8, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), f / "rgb.nii.gz")
    return {p.name: p for p in f.iterdir()}


@pytest.mark.parametrize(
    "name, needles",
    [
        ("missing.nii.gz", ["missing.nii.gz", "no such file"]),
        ("truncated.nii.gz", ["truncated.nii.gz"]),
        ("nodicom", ["nodicom", "no DICOM"]),
        ("corrupt_dicom", ["corrupt_dicom"]),
        ("mixed", ["mixed", "--series"]),
        ("seg", ["SEG"]),
        ("twochannel.nii.gz", ["twochannel.nii.gz", "2 channel", "takes 1"]),
        ("nan.nii.gz", ["nan.nii.gz", "2", "NaN"]),
        ("huge.nii.gz", ["huge.nii.gz", "1 voxels are NaN or infinite (or beyond float32)"]),
        ("micrometres.nii.gz", ["micrometres.nii.gz", "GiB), over half this machine's memory; is the header's spacing in mm?"]),
        ("rgb.nii.gz", ["rgb.nii.gz", "RGB"]),
        ("novoxels.nii.gz", ["novoxels.nii.gz", "holds no voxels: its header's shape is (5, 0, 4)"]),
    ],
)
def test_segment_bad_inputs(name, needles, bad_inputs, ckpt, tmp_path, capsys):
    path = bad_inputs.get(name, tmp_path / name)
    out = tmp_path / "out"
    assert_user_error(["segment", str(path), "-o", str(out), "--checkpoint", str(ckpt)], capsys, *needles, out_dir=out)


def test_mixed_series_lists_both_and_series_option_picks_one(bad_inputs, ckpt, tmp_path, capsys):
    from medvit.io import list_dicom_series

    uids = [s.uid for s in list_dicom_series(bad_inputs["mixed"])]
    err = assert_user_error(["segment", str(bad_inputs["mixed"]), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt)], capsys)
    assert all(u in err for u in uids) and len(uids) == 2
    one = next(s for s in list_dicom_series(bad_inputs["mixed"]) if s.n_files == 3)
    code, _, err = run_cli(["segment", str(bad_inputs["mixed"]), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt), "--series", one.uid], capsys)
    assert code == 0, err
    # named after the folder and the series read, so the other series' run would not replace it
    tag = f"series{one.series_number}" if one.series_number is not None else f"uid{one.uid.replace('.', '')[-8:]}"
    assert nib.load(tmp_path / "o" / f"mixed_{tag}_seg.nii.gz").shape == (512, 512, 3)
    # --series with a NIfTI among the inputs: refused before the DICOM case before it is written
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), nifti)
    assert_user_error(["segment", str(bad_inputs["mixed"]), str(nifti), "-o", str(tmp_path / "p"), "--checkpoint", str(ckpt),
                       "--series", one.uid], capsys, "ct.nii.gz", "is not DICOM", out_dir=tmp_path / "p")
    # a folder given as the checkpoint
    assert_user_error(["segment", str(nifti), "-o", str(tmp_path / "p"), "--checkpoint", str(tmp_path)], capsys,
                      "is a folder; give the checkpoint file in it", out_dir=tmp_path / "p")


def test_nonfinite_replace_is_reported(bad_inputs, ckpt, tmp_path, capsys, caplog):
    out = tmp_path / "o"
    code, _, err = run_cli(["segment", str(bad_inputs["nan.nii.gz"]), "-o", str(out), "--checkpoint", str(ckpt), "--nonfinite", "replace"], capsys)
    assert code == 0, err
    assert "2" in caplog.text + err and (out / "nan_seg.nii.gz").is_file()


def test_checkpoint_for_another_net(ckpt, phantom, tmp_path, capsys):
    other = dict(TINY, model={"name": "swin_unetr", "roi_size": [64, 64, 64], "options": {"feature_size": 12}})
    cfg_path = tmp_path / "swin.yaml"
    cfg_path.write_text(yaml.safe_dump(other))
    assert_user_error(["segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt), "--config", str(cfg_path)],
                      capsys, "unetr", "swin_unetr", out_dir=tmp_path / "o")
    # a .pt state dict of a unetr loaded as a swin_unetr
    pt = tmp_path / "model.pt"
    torch.save(build_net(parse_config(TINY).model).state_dict(), pt)
    assert_user_error(["segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(pt), "--config", str(cfg_path)],
                      capsys, "model.pt", out_dir=tmp_path / "o")


@pytest.mark.parametrize(
    "patch, needle",
    [({"colour": "blue"}, "unknown key 'colour'"), ({"train": {"datalist": "x.json", "epochs": "ten"}}, "train.epochs")],
)
def test_train_bad_config(patch, needle, tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({**TINY, **patch}))
    assert_user_error(["train", str(p)], capsys, str(p), needle)


def test_evaluate_prints_table_and_writes_json(tmp_path, capsys):
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:15, 5:15, 5:15] = 1
    pred = np.roll(lab, 1, axis=0)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(lab, aff), tmp_path / "gt.nii.gz")
    nib.save(nib.Nifti1Image(pred, aff), tmp_path / "pred.nii.gz")
    code, out, err = run_cli(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz"), "-o", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["labels"]["1"]["dice"] == pytest.approx(0.9) and r["labels"]["1"]["hd95_mm"] == pytest.approx(2.0)
    assert "0.900" in out
    before = (tmp_path / "gt.nii.gz").read_bytes()  # -o naming an input replaced it with JSON (review)
    assert_user_error(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz"), "-o", str(tmp_path / "gt.nii.gz")],
                      capsys, "refusing to overwrite the input file")
    assert (tmp_path / "gt.nii.gz").read_bytes() == before
    if Path("/proc/self").is_dir():  # nothing can be written there, not even by root: refused before the metrics
        code, out, err = run_cli(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz"), "-o",
                                  "/proc/medvit-nope/r.json"], capsys)
        assert code == 2 and "cannot be written" in err and out == ""
    for tol in ("-1", "nan"):
        assert_user_error(["evaluate", str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz"), "--tolerance", tol],
                          capsys, "surface Dice tolerance")


def test_series_lists_uids(data_dir, capsys):
    code, out, _ = run_cli(["series", str(data_dir / "dcmqi" / "segmentations" / "ct-3slice")], capsys)
    assert code == 0 and "3 files" in out


def test_series_on_a_folder_without_dicom_is_an_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not DICOM")
    assert_user_error(["series", str(tmp_path)], capsys, str(tmp_path), "no DICOM files found (1 file looked at)")
    (tmp_path / "slice1.dcm").write_bytes(b"garbage" * 50)  # skipped as not DICOM, but now named
    assert_user_error(["series", str(tmp_path)], capsys, "no DICOM files found (2 files looked at; slice1.dcm is "
                      "named like DICOM but is not a DICOM image)")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU message")
def test_bench_without_a_gpu_or_data_folder_fails_in_one_line(tmp_path, capsys):
    assert_user_error(["bench", "engine", "--model", "small", "--device", "cuda"], capsys, "no CUDA device")
    assert_user_error(["bench", "lidar", "--data", str(tmp_path / "none")], capsys, "none: no such data folder")
    assert_user_error(["bench", "lidar", "--data", str(tmp_path), "--device", "cuda"], capsys, "no CUDA device")
    assert_user_error(["bench", "lidar", "--data", str(tmp_path), "--sizes", "0"], capsys, "--sizes and --tile must be positive")


@pytest.mark.parametrize("device", ["foo", "CPU", "", "mps", "meta", "cudafoo", "cuda:-1"])
def test_bad_device_is_one_line(device, ckpt, phantom, tmp_path, capsys):
    assert_user_error(["segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt), "--device", device],
                      capsys, "--device", "expected cpu, cuda or cuda:N", out_dir=tmp_path / "o")


@pytest.mark.parametrize("args, needle", [
    (["segment"], "Missing argument"),
    (["segment", "x.nii.gz", "-o", "o"], "Missing option '--checkpoint'"),
    (["segment", "x.nii.gz", "-o", "o", "--checkpoint", "c", "--overlap", "abc"], "'--overlap'"),
    (["segment", "x.nii.gz", "-o", "o", "--checkpoint", "c", "--resample", "foo"], "'--resample'"),
    (["bogus"], "No such command 'bogus'"),
])
def test_usage_errors_are_one_line(args, needle, capsys):
    """click's own usage errors too: one line naming the option and where to look, not a boxed panel."""
    err = assert_user_error(args, capsys, needle)
    assert "--help" in err


def test_checkpoint_with_nan_weights_is_refused_at_load(phantom, tmp_path, capsys):
    cfg = parse_config(TINY)
    net = build_net(cfg.model)
    with torch.no_grad():
        next(net.parameters())[0] = float("nan")  # as saved by a run that diverged
    bad = save_checkpoint(net, tmp_path / "diverged.safetensors", config=cfg)
    assert_user_error(["segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(bad)], capsys,
                      "diverged.safetensors", "NaN or infinite", out_dir=tmp_path / "o")


def test_nan_from_the_net_names_the_case_and_the_checkpoint(ckpt, phantom, tmp_path, capsys, monkeypatch):
    import medvit.checkpoint

    load = medvit.checkpoint.load_checkpoint

    def nan_net(*args, **kwargs):  # finite weights whose outputs are not (as after a diverged run)
        loaded = load(*args, **kwargs)
        net = loaded.net
        loaded.net = lambda x: net(x) * float("nan")
        return loaded

    monkeypatch.setattr(medvit.checkpoint, "load_checkpoint", nan_net)
    assert_user_error(["segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt), "--no-progress"],
                      capsys, "case.nii.gz: the predictor returned NaN or inf", "checkpoint", "tiny.safetensors",
                      out_dir=tmp_path / "o")


def test_bench_engine_refuses_a_json_over_its_input_and_a_bad_input(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(b"not a NIfTI")
    assert_user_error(["bench", "engine", "--model", "small", "--input", str(ct), "--json", str(ct)], capsys,
                      "refusing to overwrite the input file")
    assert ct.read_bytes() == b"not a NIfTI"
    assert_user_error(["bench", "engine", "--model", "small", "--input", str(ct), "--json", str(tmp_path)], capsys,
                      "is a folder")
    # the input is read by the bench's worker process: its one-line error comes back as ours
    assert_user_error(["bench", "engine", "--model", "small", "--input", str(ct), "--no-peer"], capsys, "ct.nii.gz")


def test_console_script_exit_status(tmp_path):
    """The installed entry point itself: exit 2, one line on stderr, no traceback."""
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "segment", str(tmp_path / "none.nii.gz"), "-o", str(tmp_path / "o"),
                        "--checkpoint", str(tmp_path / "none.safetensors")], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


BROKEN_ENGINE = """
import sys

from pipelines.engine.dense import DenseGrid

DenseGrid.windows = lambda self: []  # the runner is handed no window of a grid that has windows to run
from pipelines.cli import main

main(sys.argv[1:])
"""


def test_a_broken_invariant_is_a_bug_with_a_traceback_not_a_user_error(ckpt, phantom, tmp_path):
    """Our own bug (an engine invariant broken, here by the wrapper script) exits 1 with its
    traceback; a user error through the same script still exits 2 with one line."""
    script = tmp_path / "broken_engine.py"
    script.write_text(BROKEN_ENGINE)
    root = str(Path(__file__).resolve().parents[1])  # this checkout's code, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    args = [sys.executable, str(script), "segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
            "--no-progress"]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    assert r.returncode == 1, r.stderr
    assert "Traceback" in r.stderr and "RuntimeError: finalize before any window was accumulated" in r.stderr
    assert "medvit: error" not in r.stderr
    assert not (tmp_path / "o" / "case_seg.nii.gz").exists()
    r = subprocess.run(args + ["--overlap", "1.5"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr == "medvit: error: --overlap must lie in [0, 1), got 1.5\n"


def test_skip_below_hu_and_tta(ckpt, phantom, tmp_path, capsys):
    out = tmp_path / "o"
    code, stdout, err = run_cli(["segment", str(phantom), "-o", str(out), "--checkpoint", str(ckpt), "--skip-below-hu", "5000"], capsys)
    assert code == 0, err
    assert "0 windows run" in stdout and "skipped as empty" in stdout
    assert int(np.asarray(nib.load(out / "case_seg.nii.gz").dataobj).max()) == 0  # nothing above 5000 HU
    code, stdout, err = run_cli(["segment", str(phantom), "-o", str(tmp_path / "t"), "--checkpoint", str(ckpt), "--tta",
                                 "--skip-below-hu", "-500"], capsys)
    assert code == 0, err
    assert " 0 skipped" in stdout or "skipped as empty" in stdout


def test_segment_says_when_it_runs_a_smaller_batch_after_out_of_memory(ckpt, phantom, tmp_path, capsys, monkeypatch):
    from pipelines.engine import runner

    # the command's engine has learnt, for every window shape on every device, that batch 1 fitted
    monkeypatch.setattr(runner.Engine, "learnt", lambda self, device, shape: runner._Learnt(batch=1))
    code, stdout, err = run_cli(["segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                                 "--batch-size", "2"], capsys)
    assert code == 0, err
    assert "; batch 1: remembered from an earlier out-of-memory error" in stdout


def test_skip_below_hu_outside_the_window_tests_hu_not_the_clipped_input(ckpt, phantom, tmp_path, capsys):
    """620 HU lies above the checkpoint's window (-1000..600), where the clipped input reads 1 for
    everything: the test must see HU, so the windows holding the phantom's 641 HU voxels run."""
    code, stdout, err = run_cli(["segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                                 "--skip-below-hu", "620"], capsys)
    assert code == 0, err
    assert "skipped as empty" in stdout and "; 0 windows run" not in stdout


@pytest.mark.parametrize("args, needle", [
    (["--model", "vit9"], "--model must be one of"),
    (["--input", "no/such.nii.gz"], "no such file or DICOM folder"),
    (["--skip-below-hu", "-500"], "--skip-below-hu needs --input"),
    (["--speedups", "sdpa,turbo"], "--speedups takes"),
    (["--speedups", "sdpa", "--batch-sweep", "8,x"], "--batch-sweep takes batch sizes"),
    (["--batch-sweep", "8"], "needs eager --speedups"),
    (["--speedups", "sdpa,compile", "--batch-sweep", "8"], "needs eager --speedups"),
    (["--overlap", "1.5"], "--overlap must lie in [0, 1)"),
    (["--batch", "0"], "--batch and --our-batch must be at least 1"),
    (["--classes", "0"], "--classes must be at least 1"),
    (["--output-device", "bogus"], "--output-device must be cpu, cuda or both"),
    (["--output-device", "cuda", "--no-peer"], "needs --device cuda"),
    (["--shape", "0,8,8"], "--shape and --spacing must be positive"),
    (["--input", __file__, "--spacing", "nan,1,1"], "--shape and --spacing must be positive"),
    (["--device", "foo"], "expected cpu, cuda or cuda:N"),
    (["--fp32-reference"], "needs --amp and --speedups"),
])
def test_bench_engine_bad_options(args, needle, capsys):
    """Bad bench options fail in one line before any worker starts."""
    assert_user_error(["bench", "engine", "--model", "small", *args], capsys, needle)
