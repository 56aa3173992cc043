"""Shared test settings and fixtures: where the real sample data lives, a tiny volume checkpoint
and phantom, one torch thread. Plain helpers live in ``helpers.py``/``helpers_dicom.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDVIT_TEST_DATA", REPO.parent / "shared" / "data"))

# Tests size their work for two cores; more threads only add contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real-data folder (MEDVIT_TEST_DATA, default ../shared/data); skips when absent."""
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA} (set MEDVIT_TEST_DATA)")
    return DATA


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """An untrained tiny UNETR checkpoint (:data:`tests.helpers.TINY`): enough to test geometry and
    errors, not labels. A module that needs another checkpoint defines its own ``ckpt``."""
    from medvit.checkpoint import save_checkpoint
    from medvit.config import parse_config
    from medvit.nets import build_net
    from tests.helpers import TINY

    folder = tmp_path_factory.mktemp("ckpt")
    cfg = parse_config(TINY)
    torch.manual_seed(0)
    return save_checkpoint(build_net(cfg.model), folder / "tiny.safetensors", config=cfg)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    """A CT phantom NIfTI (int16, LPS axes, 7 x 6 x 9 mm voxels)."""
    import nibabel as nib
    import numpy as np

    from medvit.data.phantom import make_phantom

    folder = tmp_path_factory.mktemp("ph")
    p = make_phantom(np.random.default_rng(5), spacing=(7.0, 6.0, 9.0), axcodes="LPS")
    path = folder / "case.nii.gz"
    nib.save(nib.Nifti1Image(p.image.astype(np.int16), p.affine), path)
    return path


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    sparse ops on two threads crawl when the other core is busy; one is steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def exports(monkeypatch):
    """Counts the ONNX exports ``medvit.runtimes`` makes (the expensive step its cache saves)."""
    from medvit.runtimes import backends

    made = []
    real = backends.export_onnx

    def counting(net, example, path):
        made.append(path)
        real(net, example, path)

    monkeypatch.setattr(backends, "export_onnx", counting)
    return made
