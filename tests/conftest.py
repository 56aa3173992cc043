"""Shared test settings: where the real sample data lives, and small helpers."""

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
