"""Bad training data, configs and output folders: one line naming the file, exit 2, before training."""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from tests.helpers import assert_user_error, run_cli, tiny_config, write_tiny_set


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return write_tiny_set(tmp_path_factory.mktemp("phantoms"), n_train=2)


def _copy_set(tiny_set: Path, folder: Path) -> Path:
    dst = folder / "data"
    shutil.copytree(tiny_set.parent, dst)
    return dst / tiny_set.name


def _edit_nifti(path: Path, *, data=None, affine=None) -> None:
    img = nib.load(path)
    arr = np.asarray(img.dataobj) if data is None else data
    nib.save(nib.Nifti1Image(arr, img.affine if affine is None else affine), path)


def _no_run_written(out: Path) -> None:
    assert not out.exists(), list(out.iterdir())  # the folder made for the run is removed again


def _label(dl: Path, split: str = "training") -> Path:
    return dl.parent / json.loads(dl.read_text())[split][0]["label"]


@pytest.mark.parametrize("case, needles", [
    ("label_out_of_range", ["training_0_label.nii.gz", "label values 0..9", "6 classes"]),
    ("label_negative", ["training_0_label.nii.gz", "label values -1.."]),
    ("label_other_shape", ["training_0_label.nii.gz", "differs from its image"]),
    ("label_shifted", ["training_0_label.nii.gz", "mm from its image's grid"]),
    ("image_nan", ["training_0.nii.gz", "NaN or infinite"]),
    ("val_label_out_of_range", ["validation_0_label.nii.gz", "label values"]),
    ("no_label", ["datalist.json", "has no 'label'"]),
    ("empty_training", ["datalist.json", "'training' list is empty"]),
    ("manifest", ["is a dataset manifest with no 'training' files listed", "medvit datalist"]),
])
def test_bad_training_data_fails_before_training(case, needles, tiny_set, tmp_path, capsys):
    dl = _copy_set(tiny_set, tmp_path)
    lab = _label(dl)
    arr = np.asarray(nib.load(lab).dataobj).astype(np.int16)
    if case == "label_out_of_range":
        arr[0, 0, 0] = 9
        _edit_nifti(lab, data=arr)
    elif case == "label_negative":
        arr[0, 0, 0] = -1
        _edit_nifti(lab, data=arr)
    elif case == "label_other_shape":
        _edit_nifti(lab, data=arr[:-3])
    elif case == "label_shifted":
        aff = nib.load(lab).affine.copy()
        aff[0, 3] += 50.0
        _edit_nifti(lab, affine=aff)
    elif case == "image_nan":
        img = dl.parent / "training_0.nii.gz"
        a = np.asarray(nib.load(img).dataobj).astype(np.float32)
        a[3, 3, 3] = np.nan
        _edit_nifti(img, data=a)
    elif case == "val_label_out_of_range":
        v = _label(dl, "validation")
        a = np.asarray(nib.load(v).dataobj).astype(np.int16)
        a[1, 1, 1] = 7
        _edit_nifti(v, data=a)
    elif case == "no_label":
        d = json.loads(dl.read_text())
        del d["training"][0]["label"]
        dl.write_text(json.dumps(d))
    elif case == "empty_training":
        dl.write_text(json.dumps({"training": [], "validation": json.loads(dl.read_text())["validation"]}))
    elif case == "manifest":
        shutil.copy(Path(__file__).resolve().parents[1] / "data_manifests" / "brats2021.json", dl)
    cfg = tiny_config(tmp_path, dl)
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, *needles)
    _no_run_written(tmp_path / "run")


def test_folders_made_for_a_failed_run_are_removed_and_a_tiny_label_offset_is_accepted(tiny_set, tmp_path, capsys):
    dl = _copy_set(tiny_set, tmp_path)
    lab = _label(dl)
    aff = nib.load(lab).affine.copy()
    aff[0, 3] += 0.2  # 0.2 mm on 8 mm voxels: rounding in a header, not a shift (the limit is 5 % of a voxel)
    _edit_nifti(lab, affine=aff)
    d = yaml.safe_load(tiny_config(tmp_path, dl, epochs=1).read_text())
    d["train"]["output_dir"] = str(tmp_path / "new" / "sub" / "run")
    d["train"]["datalist"] = str(tmp_path / "missing.json")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, "missing.json")
    assert not (tmp_path / "new").exists()  # the folders it made are gone again, parents too
    d["train"]["datalist"] = str(dl)
    cfg.write_text(yaml.safe_dump(d))
    code, _, err = run_cli(["train", str(cfg), "--no-progress"], capsys)
    assert code == 0, err


def test_image_channels_must_match_the_config(tiny_set, tmp_path, capsys):
    cfg = tiny_config(tmp_path, tiny_set)
    d = yaml.safe_load(cfg.read_text())
    d["model"]["in_channels"] = 2
    cfg.write_text(yaml.safe_dump(d))
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, "training_0.nii.gz", "1 channel(s)", "takes 2")


def test_resume_into_a_missing_folder_creates_nothing(tiny_set, tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    cfg = tiny_config(tmp_path, tiny_set, out="runs/a")
    assert_user_error(["train", str(cfg), "--resume", "--no-progress"], capsys, "last_state.pt",
                      "nothing to resume: the output folder does not exist")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a.yaml"]


def test_resume_checks_and_a_second_run_without_resume(tiny_set, tmp_path, capsys, caplog):
    cfg = tiny_config(tmp_path, tiny_set, epochs=1)
    code, out, err = run_cli(["train", str(cfg), "--no-progress"], capsys)
    assert code == 0, err
    run = tmp_path / "run"
    log = (run / "metrics.jsonl").read_text()
    # a second run into the same folder would mix its log and checkpoints with the first's
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, "already holds a training run", "--resume")
    assert (run / "metrics.jsonl").read_text() == log
    # a resume checkpoint for another net (other classes)
    d = yaml.safe_load(cfg.read_text())
    d["labels"] = {**d["labels"], 6: "extra"}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(d))
    assert_user_error(["train", str(other), "--resume", "--no-progress"], capsys, "last_state.pt", "shape")
    # a changed learning rate does not reach a resumed run: its saved schedule does, and it says so
    d = yaml.safe_load(cfg.read_text())
    d["train"]["lr"] = 0.5
    faster = tmp_path / "faster.yaml"
    faster.write_text(yaml.safe_dump(d))
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(["train", str(faster), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert "saved run's learning rate 0.001" in caplog.text
    # damaged and foreign resume checkpoints
    state = run / "last_state.pt"
    good = state.read_bytes()
    state.write_bytes(good[: len(good) // 2])
    assert_user_error(["train", str(cfg), "--resume", "--no-progress"], capsys, "last_state.pt", "not a readable torch checkpoint")
    torch.save({"weights": torch.zeros(2)}, state)
    assert_user_error(["train", str(cfg), "--resume", "--no-progress"], capsys, "last_state.pt", "not a resume checkpoint")


def test_diverging_training_names_the_learning_rate(tiny_set, tmp_path, capsys):
    cfg = tiny_config(tmp_path, tiny_set, epochs=2, lr=1e12)
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, "training diverged", "train.lr")


def test_unwritable_output_folder_fails_before_training(tiny_set, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tiny_config(tmp_path, tiny_set, output_dir=str(blocker / "run"))
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, "file")


@pytest.mark.parametrize("patch, needle", [
    ({"augment": {"num_samples": 1, "pos": 0, "neg": 0}}, "pos and neg"),
    ({"train": {"lr": float("inf")}}, "train.lr"),
    ({"train": {"seed": 2**70}}, "train.seed"),
    ({"model": {"roi_size": [24, 24, 24]}}, "model.roi_size"),
])
def test_bad_training_configs_name_the_file(patch, needle, tiny_set, tmp_path, capsys):
    cfg = tiny_config(tmp_path, tiny_set)
    d = yaml.safe_load(cfg.read_text())
    for k, v in patch.items():
        d[k] = {**d.get(k, {}), **v}
    cfg.write_text(yaml.safe_dump(d))
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, str(cfg), needle)


def test_label_ids_the_config_does_not_name_are_refused(tiny_set, tmp_path, capsys):
    """Labels {0, 1, 2, 4, 5} on data holding 3 too trained 3 as a class no output names."""
    d = yaml.safe_load(tiny_config(tmp_path, tiny_set).read_text())
    assert 3 in d["labels"]
    del d["labels"][3]
    cfg = tmp_path / "gap.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, "_label.nii.gz", "holds label values 3 that the "
                      "config's labels do not name (it names 0, 1, 2, 4, 5)")
    _no_run_written(tmp_path / "run")


def test_sparse_label_ids_warn_of_the_channels_they_cost(tiny_set, tmp_path, capsys, caplog):
    """Labels {0..5, 40}: one output channel per id up to 40, 34 of them for no label; the data
    (ids 0..5) trains, and the warning says so before any case is read."""
    d = yaml.safe_load(tiny_config(tmp_path, tiny_set).read_text())
    d["labels"][40] = "extra"
    d["train"]["datalist"] = str(tmp_path / "missing.json")  # stop right after the warning
    cfg = tmp_path / "sparse.yaml"
    cfg.write_text(yaml.safe_dump(d))
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, "missing.json")
    assert "labels name 7 ids up to 40: the net gets an output channel for each id 0..40, 34 of them for ids no " \
           "label has" in caplog.text


def test_a_bad_model_option_fails_before_the_data_is_read(tiny_set, tmp_path, capsys):
    # the net is built first: a typo in model.options does not wait for every case to be checked
    dl = _copy_set(tiny_set, tmp_path)
    _edit_nifti(_label(dl), data=np.full((4, 4, 4), 9, np.int16))  # would fail the data checks
    cfg = tiny_config(tmp_path, dl)
    d = yaml.safe_load(cfg.read_text())
    d["model"]["options"]["no_such_option"] = 1
    cfg.write_text(yaml.safe_dump(d))
    assert_user_error(["train", str(cfg), "--no-progress"], capsys, "model.options.no_such_option")
    _no_run_written(Path(d["train"]["output_dir"]))
