import json
import re
from pathlib import Path

import pytest

from medvit.data.datalist import read_datalist
from medvit.data.manifest import build_datalist, read_manifest
from medvit.core.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _touch(root: Path, rel: str) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(b"x")


def test_read_datalist_resolves_and_checks(tmp_path):
    _touch(tmp_path, "img/a.nii.gz")
    _touch(tmp_path, "lab/a.nii.gz")
    _touch(tmp_path, "img/b1.nii.gz")
    _touch(tmp_path, "img/b2.nii.gz")
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [{"image": "img/a.nii.gz", "label": "lab/a.nii.gz"},
                                           {"image": ["img/b1.nii.gz", "img/b2.nii.gz"]}]}))
    items = read_datalist(dl)
    assert items[0]["image"] == str(tmp_path / "img/a.nii.gz")
    assert items[1]["image"] == [str(tmp_path / "img/b1.nii.gz"), str(tmp_path / "img/b2.nii.gz")]
    assert read_datalist(dl, "validation", required=False) == []
    with pytest.raises(InputError, match="no 'validation' list"):
        read_datalist(dl, "validation")


def test_read_datalist_names_missing_file(tmp_path):
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [{"image": "nope.nii.gz"}]}))
    with pytest.raises(InputError, match="does not exist: .*nope.nii.gz"):
        read_datalist(dl)
    dl.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_datalist(dl)


@pytest.mark.parametrize("entry, kwargs, needle", [
    ({"image": "a.nii.gz", "label": ["a.nii.gz", "a.nii.gz"]}, {}, "entry 0: 'label' is a list; a label map is one file"),
    ({"image": []}, {}, "entry 0: 'image' is an empty list"),
    ({"image": ["a.nii.gz"]}, {"one_image": True}, "entry 0: 'image' is a list; a scan is one file"),
])
def test_a_label_list_or_an_empty_image_list_names_the_entry(tmp_path, entry, kwargs, needle):
    """A label list reached LoadImage as a TypeError traceback; an empty image list named no file."""
    _touch(tmp_path, "a.nii.gz")
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [entry]}))
    with pytest.raises(InputError, match=re.escape(needle)) as e:
        read_datalist(dl, **kwargs)
    assert str(dl) in str(e.value)


@pytest.mark.parametrize("name", ["btcv.json", "msd_task09_spleen.json", "brats2021.json", "picai.json"])
def test_manifests_are_datalists_with_labels_and_spacing(name):
    m = read_manifest(REPO / "data_manifests" / name)
    assert m["labels"]["0"] == "background"
    assert len(m["spacing"]["target_mm"]) == 3
    assert "training" in m and "validation" in m


def test_spleen_manifest_split_and_build(tmp_path):
    m = read_manifest(REPO / "data_manifests" / "msd_task09_spleen.json")
    assert len(m["training"]) == 32 and len(m["validation"]) == 9
    with pytest.raises(InputError, match="82 file"):
        build_datalist(REPO / "data_manifests" / "msd_task09_spleen.json", tmp_path)
    for e in m["training"] + m["validation"]:
        _touch(tmp_path, e["image"])
        _touch(tmp_path, e["label"])
    dl = build_datalist(REPO / "data_manifests" / "msd_task09_spleen.json", tmp_path, sha256=True)
    assert len(dl["training"]) == 32 and Path(dl["training"][0]["image"]).is_absolute()
    assert len(dl["sha256"]) == 82


def test_brats_manifest_finds_cases_by_glob(tmp_path):
    for i in range(7):
        case = f"BraTS2021_{i:05d}"
        for suffix in ("flair", "t1", "t1ce", "t2", "seg"):
            _touch(tmp_path, f"{case}/{case}_{suffix}.nii.gz")
    dl = build_datalist(REPO / "data_manifests" / "brats2021.json", tmp_path, fold=1)
    assert len(dl["training"]) == 5 and len(dl["validation"]) == 2
    assert len(dl["validation"][0]["image"]) == 4 and dl["validation"][0]["image"][0].endswith("BraTS2021_00001_flair.nii.gz")
    with pytest.raises(InputError, match="no case folders"):
        build_datalist(REPO / "data_manifests" / "brats2021.json", tmp_path / "BraTS2021_00000")
    # ROOT may also be the folder holding the manifest's layout root (BraTS2021_Training_Data/),
    # which itself matches the case pattern BraTS2021_*
    outer = tmp_path.parent / (tmp_path.name + "_outer")
    (outer / "BraTS2021_Training_Data").mkdir(parents=True)
    for case in (tmp_path).iterdir():
        case.rename(outer / "BraTS2021_Training_Data" / case.name)
    dl2 = build_datalist(REPO / "data_manifests" / "brats2021.json", outer, fold=1)
    assert len(dl2["training"]) == 5 and dl2["validation"][0]["image"][0].endswith("BraTS2021_00001_flair.nii.gz")


def test_picai_manifest_finds_three_channel_cases_by_glob(tmp_path):
    for i in range(5):
        case = f"{10000 + i}_{1000000 + i}"  # {patient_id}_{study_id}
        for name in (f"{case}_t2w.mha", f"{case}_adc.mha", f"{case}_hbv.mha", f"{case}.nii.gz"):
            _touch(tmp_path, f"{case}/{name}")
    dl = build_datalist(REPO / "data_manifests" / "picai.json", tmp_path)
    assert len(dl["training"]) == 4 and len(dl["validation"]) == 1
    image = dl["validation"][0]["image"]
    assert [Path(p).name for p in image] == ["10000_1000000_t2w.mha", "10000_1000000_adc.mha", "10000_1000000_hbv.mha"]
    assert dl["validation"][0]["label"].endswith("10000_1000000/10000_1000000.nii.gz")
    assert dl["labels"] == {"0": "background", "1": "csPCa lesion (ISUP >= 2)"}


def _brats(tmp_path: Path, n: int = 3) -> Path:
    for i in range(n):
        case = f"BraTS2021_{i:05d}"
        for suffix in ("flair", "t1", "t1ce", "t2", "seg"):
            _touch(tmp_path, f"{case}/{case}_{suffix}.nii.gz")
    return tmp_path


def test_datalist_never_overwrites_its_manifest_or_a_dataset_file(tmp_path, capsys):
    from tests.helpers import assert_user_error

    root = _brats(tmp_path / "data")
    manifest = tmp_path / "man.json"
    manifest.write_text((REPO / "data_manifests" / "brats2021.json").read_text())
    before = manifest.read_text()
    assert_user_error(["datalist", str(manifest), str(root), "-o", str(manifest)], capsys, "man.json", "refusing to overwrite")
    assert manifest.read_text() == before
    seg = root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz"
    assert_user_error(["datalist", str(manifest), str(root), "-o", str(seg)], capsys, "refusing to overwrite")
    assert seg.read_bytes() == b"x"


@pytest.mark.parametrize("patch, needle", [
    ({"layout": "BraTS2021_*"}, "'layout' must be an object"),
    ({"layout": {"case_glob": "B*", "image": "{id}/x.nii.gz", "label": "{case}/s.nii.gz"}}, "may only use {case}"),
    ({"layout": {"case_glob": "B*", "label": "{case}/s.nii.gz"}}, "needs 'image'"),
    ({"layout": {"case_glob": "/abs/*", "image": "{case}/x", "label": "{case}/s"}}, "relative folder pattern"),
    ({"layout": {}, "training": "all"}, "'training' must be a list"),
    ({"layout": {}, "training": [{"image": 3, "label": "l.nii.gz"}]}, "'training[0].image' must be a relative path"),
])
def test_malformed_manifests_are_one_line_errors(patch, needle, tmp_path):
    m = {"name": "x", "labels": {"0": "background"}, "layout": {}, **patch}
    (tmp_path / "m.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match=re.escape(needle)):
        build_datalist(tmp_path / "m.json", tmp_path)


def test_fold_out_of_range_or_on_a_fixed_split_is_refused(tmp_path):
    root = _brats(tmp_path)
    with pytest.raises(InputError, match=r"--fold must be 0\.\.4"):
        build_datalist(REPO / "data_manifests" / "brats2021.json", root, fold=7)
    with pytest.raises(InputError, match="fixed training/validation split"):
        build_datalist(REPO / "data_manifests" / "msd_task09_spleen.json", root, fold=1)


def test_an_empty_split_is_warned_about(tmp_path, capsys, caplog):
    from tests.helpers import run_cli

    root = _brats(tmp_path / "data", n=3)  # five folds of three cases: folds 3 and 4 validate nothing
    with caplog.at_level("WARNING"):
        code, stdout, err = run_cli(["datalist", str(REPO / "data_manifests" / "brats2021.json"), str(root),
                                     "-o", str(tmp_path / "dl.json"), "--fold", "4"], capsys)
    assert code == 0, err
    assert "3 training and 0 validation cases" in stdout
    assert "fold 4: the validation split is empty (3 training cases)" in caplog.text
    assert "without validation" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        build_datalist(REPO / "data_manifests" / "brats2021.json", root, fold=1)
    assert "empty" not in caplog.text
