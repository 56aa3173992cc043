"""What a clinic sends to ``segment``: series of another modality, several series in one folder,
a second run into the same folder; provenance of every output."""

from __future__ import annotations

import copy
import json
import logging
from datetime import datetime
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvit.config import parse_config
from medvit.data.phantom import make_phantom
from tests.helpers import TINY, assert_user_error, run_cli, tiny_checkpoint
from tests.helpers_dicom import write_body_series


@pytest.fixture(scope="module")
def ct_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ct"), "ct")


@pytest.fixture(scope="module")
def mr_ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("mr"), "mri")


@pytest.fixture(scope="module")
def ct_phantom(tmp_path_factory) -> Path:
    p = make_phantom(np.random.default_rng(3), spacing=(8.0, 8.0, 8.0))
    path = tmp_path_factory.mktemp("ph") / "case.nii.gz"
    nib.save(nib.Nifti1Image(p.image.astype(np.int16), p.affine), path)
    return path


# ---------------------------------------------------------------- modality check


def test_mr_series_through_a_ct_checkpoint_warns_and_strict_refuses(ct_ckpt, tmp_path, capsys, caplog):
    write_body_series(tmp_path / "mr", modality="MR")
    args = ["segment", str(tmp_path / "mr"), "--checkpoint", str(ct_ckpt), "--no-progress"]
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(args + ["-o", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "DICOM Modality is MR" in caplog.text and f"{ct_ckpt} is for CT (window -1000..600 HU)" in caplog.text
    assert (tmp_path / "o" / "mr_seg.nii.gz").is_file()
    # --strict: one line, exit 2, before anything runs or is written
    assert_user_error(args + ["-o", str(tmp_path / "s"), "--strict"], capsys, "DICOM Modality is MR", str(ct_ckpt),
                      "--strict", out_dir=tmp_path / "s")


def test_z_scored_nifti_through_a_ct_checkpoint_warns_and_strict_refuses(ct_ckpt, ct_phantom, tmp_path, capsys, caplog):
    img = nib.load(ct_phantom)
    x = np.asarray(img.dataobj, dtype=np.float32)
    nib.save(nib.Nifti1Image((x - x.mean()) / x.std(), img.affine), tmp_path / "z.nii.gz")
    args = ["segment", str(tmp_path / "z.nii.gz"), "--checkpoint", str(ct_ckpt), "--no-progress"]
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(args + ["-o", str(tmp_path / "o")], capsys)
    assert code == 0, err
    assert "too narrow for Hounsfield units" in caplog.text and f"{ct_ckpt} is for CT" in caplog.text
    assert_user_error(args + ["-o", str(tmp_path / "s"), "--strict"], capsys, "z.nii.gz", "too narrow for Hounsfield",
                      str(ct_ckpt), out_dir=tmp_path / "s")
    # an MR-like 0..4095 image: no air
    nib.save(nib.Nifti1Image(np.clip(x + 1000, 0, 4095).astype(np.int16), img.affine), tmp_path / "mr.nii.gz")
    assert_user_error(["segment", str(tmp_path / "mr.nii.gz"), "-o", str(tmp_path / "s"), "--checkpoint", str(ct_ckpt),
                       "--strict"], capsys, "nothing as dark as air or fat", out_dir=tmp_path / "s")


def test_ct_through_an_mr_checkpoint_warns(mr_ckpt, ct_phantom, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(["segment", str(ct_phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(mr_ckpt),
                                "--no-progress"], capsys)
    assert code == 0, err
    assert "lie at or below -500 (air in Hounsfield units): a CT?" in caplog.text and "is for MRI" in caplog.text
    write_body_series(tmp_path / "ct", modality="CT")
    assert_user_error(["segment", str(tmp_path / "ct"), "-o", str(tmp_path / "s"), "--checkpoint", str(mr_ckpt),
                       "--strict"], capsys, "DICOM Modality is CT", "is for MRI", out_dir=tmp_path / "s")


def test_ct_through_a_ct_checkpoint_is_quiet(ct_ckpt, ct_phantom, tmp_path, capsys, caplog):
    write_body_series(tmp_path / "ct", modality="CT")
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(["segment", str(ct_phantom), str(tmp_path / "ct"), "-o", str(tmp_path / "o"),
                                "--checkpoint", str(ct_ckpt), "--no-progress", "--strict"], capsys)
    assert code == 0, err
    assert "Hounsfield" not in caplog.text and "Modality" not in caplog.text


@pytest.mark.parametrize("name", ["totalsegmentator/example_ct.nii.gz", "totalsegmentator/example_ct_dicom",
                                  "dcmqi/segmentations/ct-3slice", "pydicom/CT_small.dcm"])
def test_real_cts_pass_the_ct_check_and_fail_the_mr_one(name, data_dir):
    from types import SimpleNamespace

    from medvit.io import read_image
    from pipelines.volume.segment import check_modality

    image = read_image(data_dir / name)
    mr_cfg = copy.deepcopy(TINY)
    mr_cfg["preprocess"]["intensity"] = {"modality": "mri"}
    ct = SimpleNamespace(config=parse_config(TINY), meta={"checkpoint": "ct.safetensors"})
    mr = SimpleNamespace(config=parse_config(mr_cfg), meta={"checkpoint": "mr.safetensors"})
    assert check_modality(image, [name], ct) is None
    assert "is for MRI" in check_modality(image, [name], mr)


@pytest.mark.parametrize("name", ["totalsegmentator/example_mr_sm.nii.gz", "pydicom/MR_small.dcm", "nibabel/anatomical.nii"])
def test_real_mrs_fail_the_ct_check(name, data_dir):
    from types import SimpleNamespace

    from medvit.io import read_image
    from pipelines.volume.segment import check_modality

    ct = SimpleNamespace(config=parse_config(TINY), meta={"checkpoint": "ct.safetensors"})
    assert "is for CT" in check_modality(read_image(data_dir / name), [name], ct)


# ---------------------------------------------------------------- names, overwrite, provenance


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_series_of_one_folder_get_their_own_outputs(ct_ckpt, tmp_path, capsys):
    study = tmp_path / "study"
    a = write_body_series(study / "a", number=3)
    b = write_body_series(study / "b", number=7, offset=100.0, seed=1)
    out = tmp_path / "o"
    for uid in (a, b):
        code, stdout, err = run_cli(["segment", str(study), "-o", str(out), "--checkpoint", str(ct_ckpt), "--series", uid,
                                     "--no-progress"], capsys)
        assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["study_series3_seg.json", "study_series3_seg.nii.gz",
                                                     "study_series7_seg.json", "study_series7_seg.nii.gz"]
    for n, uid in (("3", a), ("7", b)):
        side = json.loads((out / f"study_series{n}_seg.json").read_text())
        assert side["source"]["series_uid"] == uid and side["source"]["series_number"] == n
        assert side["source"]["modality"] == "CT" and side["options"]["series"] == uid
    # the second series sits 100 mm higher: its own geometry, not the first's
    assert nib.load(out / "study_series7_seg.nii.gz").affine[2, 3] == pytest.approx(100.0)


def test_series_without_a_number_are_named_by_their_uid(ct_ckpt, tmp_path, capsys):
    study = tmp_path / "study"
    a = write_body_series(study / "a", number=None, uid="1.2.826.0.1.3680043.8.498.11112222")
    write_body_series(study / "b", number=None, uid="1.2.826.0.1.3680043.8.498.33334444", offset=100.0)
    code, _, err = run_cli(["segment", str(study), "-o", str(tmp_path / "o"), "--checkpoint", str(ct_ckpt),
                            "--series", a, "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "study_uid11112222_seg.nii.gz").is_file()


def test_an_earlier_output_is_kept_unless_overwrite(ct_ckpt, ct_phantom, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["segment", str(ct_phantom), "-o", str(out), "--checkpoint", str(ct_ckpt), "--no-progress"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    err = assert_user_error(args, capsys, str(out / "case_seg.nii.gz"), "exists", "pass --overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # every output counts: a stale preview alone is refused before the net runs
    (out / "case_seg.nii.gz").unlink()
    (out / "case_seg.json").unlink()
    (out / "case_preview.png").write_bytes(b"old")
    assert_user_error(args + ["--preview"], capsys, "case_preview.png", "pass --overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["case_preview.png"]
    code, _, err = run_cli(args + ["--preview", "--stats", "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "case_preview.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "case_seg.json").read_text())["options"]["overwrite"] is True


def test_provenance_in_header_and_sidecar(ct_ckpt, ct_phantom, tmp_path, capsys):
    import medvit

    out = tmp_path / "o"
    code, stdout, err = run_cli(["segment", str(ct_phantom), "-o", str(out), "--checkpoint", str(ct_ckpt),
                                 "--overlap", "0.5", "--stats", "--no-progress"], capsys)
    assert code == 0, err
    assert str(out / "case_seg.json") in stdout
    sha = _sha256(ct_ckpt)
    descrip = nib.load(out / "case_seg.nii.gz").header["descrip"].item().decode()
    assert descrip == f"medvit {medvit.__version__} unetr {sha[:12]}"
    side = json.loads((out / "case_seg.json").read_text())
    assert side["checkpoint"]["sha256"] == sha and side["checkpoint"]["path"] == str(ct_ckpt.resolve())
    assert side["checkpoint"]["sidecar_sha256"] == _sha256(ct_ckpt.with_suffix(".json"))
    assert side["source"] == {"paths": [str(ct_phantom.resolve())], "format": "nifti"}
    assert side["medvit_version"] == medvit.__version__ and side["label_map"] == "case_seg.nii.gz"
    assert side["options"]["overlap"] == 0.5 and side["options"]["batch_size"] == 1 and side["options"]["stats"] is True
    assert side["outputs"] == ["case_stats.csv", "case_stats.json"] and side["warnings"] == []
    assert datetime.fromisoformat(side["created"]).tzinfo is not None


def test_version_is_the_package_version(capsys):
    import medvit

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    code, stdout, _ = run_cli(["--version"], capsys)
    assert code == 0 and stdout == f"medvit {medvit.__version__}\n"
    assert tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["version"] == medvit.__version__


def test_mr_preview_uses_the_image_range_not_a_ct_window(mr_ckpt, tmp_path, capsys, monkeypatch):
    import pipelines.volume.report as report

    x = np.zeros((24, 24, 12), np.float32)
    x[4:20, 4:20, 2:10] = 300.0
    x[0, 0, 0] = -600.0  # one stray dark voxel made the preview pick a HU window
    nib.save(nib.Nifti1Image(x, np.diag([8.0, 8.0, 8.0, 1.0])), tmp_path / "t1.nii.gz")
    seen = {}
    real = report.write_preview

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "write_preview", spy)
    code, _, err = run_cli(["segment", str(tmp_path / "t1.nii.gz"), "-o", str(tmp_path / "o"), "--checkpoint", str(mr_ckpt),
                            "--preview", "--no-progress"], capsys)
    assert code == 0, err
    assert seen["window"] == pytest.approx((0.0, 300.0)) and seen["names"][1] == "liver"
    assert (tmp_path / "o" / "t1_preview.png").is_file()


def test_series_lists_the_subfolder_of_each_series(tmp_path, capsys):
    a = write_body_series(tmp_path / "study" / "t1", number=3)
    b = write_body_series(tmp_path / "study" / "ct" / "axial", number=7, offset=100.0)
    code, stdout, err = run_cli(["series", str(tmp_path / "study")], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith(a) and lines[0].endswith("\tt1/")
    assert lines[1].startswith(b) and lines[1].endswith("\tct/axial/")
    # a folder holding its series' files itself: no folder column
    code, stdout, _ = run_cli(["series", str(tmp_path / "study" / "t1")], capsys)
    assert stdout == f"{a}\tCT\t4 files\t\n"
