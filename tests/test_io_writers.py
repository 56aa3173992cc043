"""NIfTI writers: exact affines, label dtypes, protected inputs and atomic renames."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medvit.core.errors import InputError
from medvit.core.files import atomic_path
from medvit.io import read_image, read_label, write_image, write_label_map

DATA = Path(os.environ.get("MEDVIT_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="module")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (set MEDVIT_TEST_DATA)")
    return DATA


@pytest.mark.parametrize("name", ["monai/anatomical_label.nii.gz", "totalsegmentator/example_seg_mr.nii.gz",
                                  "dcmqi/segmentations/liver_seg.nrrd"])
def test_label_round_trip(data, tmp_path, name):
    lab = read_label(data / name)
    out = write_label_map(lab[0], lab.affine, tmp_path / "out.nii.gz")
    back = nib.load(out)
    assert back.get_data_dtype() == np.uint8
    assert back.header["sform_code"] > 0 and back.header["qform_code"] > 0
    np.testing.assert_allclose(back.affine, lab.affine.numpy(), atol=1e-4)
    np.testing.assert_allclose(back.header.get_qform(), lab.affine.numpy(), atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), lab[0].numpy())
    again = read_label(out)
    np.testing.assert_array_equal(again.numpy(), lab.numpy())


def test_image_round_trip_oblique(tmp_path):
    """A rotated, anisotropic affine with awkward offsets survives to float32 precision."""
    rot = np.array([[0.8, -0.6, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, -1.0]])
    aff = np.eye(4)
    aff[:3, :3] = rot * [0.81, 1.7, 3.3]
    aff[:3, 3] = [-235.199997, 226.800003, -128.690002]
    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    write_image(torch.from_numpy(arr), aff, tmp_path / "img.nii")
    back = nib.load(tmp_path / "img.nii")
    assert back.get_data_dtype() == np.float32
    np.testing.assert_allclose(back.affine, aff, atol=1e-4)
    np.testing.assert_allclose(back.header.get_qform(), aff, atol=1e-4)
    img = read_image(tmp_path / "img.nii")
    np.testing.assert_array_equal(img[0].numpy(), arr)


def test_write_image_dtype_rounds_and_checks_range(tmp_path):
    arr = np.array([[[-1.6, 0.4], [2.5, 1000.2]]])
    write_image(arr, np.eye(4), tmp_path / "i.nii.gz", dtype=np.int16)
    back = nib.load(tmp_path / "i.nii.gz")
    assert back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), [[[-2, 0], [2, 1000]]])
    with pytest.raises(ValueError, match="do not fit"):
        write_image(arr * 100, np.eye(4), tmp_path / "j.nii.gz", dtype=np.int16)


def test_uint8_or_uint16(tmp_path):
    lab = np.zeros((3, 3, 3), dtype=np.int64)
    lab[1, 1, 1] = 255
    assert nib.load(write_label_map(lab, np.eye(4), tmp_path / "a.nii.gz")).get_data_dtype() == np.uint8
    lab[0, 0, 0] = 256
    b = nib.load(write_label_map(torch.from_numpy(lab), np.eye(4), tmp_path / "b.nii.gz"))
    assert b.get_data_dtype() == np.uint16 and np.asanyarray(b.dataobj)[0, 0, 0] == 256
    lab[0, 0, 0] = 65536
    with pytest.raises(ValueError, match="0..65535"):
        write_label_map(lab, np.eye(4), tmp_path / "c.nii.gz")
    with pytest.raises(TypeError, match="integer"):
        write_label_map(lab.astype(np.float32), np.eye(4), tmp_path / "d.nii.gz")
    assert not (tmp_path / "c.nii.gz").exists() and not (tmp_path / "d.nii.gz").exists()
    with pytest.raises(InputError, match="must be named .nii or .nii.gz"):
        write_label_map(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "e.nrrd")


def test_refuses_to_overwrite_protected_input(tmp_path):
    src = write_label_map(np.ones((2, 2, 2), np.uint8), np.eye(4), tmp_path / "in.nii.gz")
    before = src.read_bytes()
    link = tmp_path / "link.nii.gz"
    link.symlink_to(src)
    for target in (src, tmp_path / "." / "in.nii.gz", link):
        with pytest.raises(InputError, match="refusing to overwrite the input file"):
            write_label_map(np.zeros((2, 2, 2), np.uint8), np.eye(4), target, protect=[src])
    assert src.read_bytes() == before
    write_label_map(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "out.nii.gz", protect=[src])


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    old = tmp_path / "seg.nii.gz"
    old.write_bytes(b"previous")

    def broken_save(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_label_map(np.zeros((2, 2, 2), np.uint8), np.eye(4), old)
    with pytest.raises(OSError, match="disk full"):
        write_label_map(np.zeros((2, 2, 2), np.uint8), np.eye(4), tmp_path / "new.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]
    assert old.read_bytes() == b"previous"


def test_atomic_path(tmp_path):
    target = tmp_path / "sub" / "stats.csv"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".csv") and tmp != target
        tmp.write_text("a,b\n")
        assert not target.exists()
    assert target.read_text() == "a,b\n"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "a,b\n"
    assert [p.name for p in target.parent.iterdir()] == ["stats.csv"]
    with atomic_path(tmp_path / "x.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz")
        tmp.write_bytes(b"")
