"""medvit demo --lidar: the tiny path in every run, the full demo against its bar."""

import json
import os

import numpy as np
import pytest
import torch

from pipelines.lidar.demo import DEMO_LIDAR_CONFIG, run_lidar_demo


def test_lidar_demo_path_on_a_tiny_set(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = json.loads(json.dumps(DEMO_LIDAR_CONFIG))
        cfg["train"].update(epochs=1, val_every=1)
        cfg["augment"].update(samples_per_scan=1, crop_points=4000)
        s = run_lidar_demo(tmp_path, config=cfg, scene_sizes=(1, 40_000, 60_000))
    finally:
        torch.set_num_threads(n)
    lab = np.fromfile(s["labels"], dtype=np.uint32)
    assert len(lab) == s["points"] >= 60_000
    assert open(s["bev_png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert set(s["iou"]) == {"ground", "building", "car", "pole", "vegetation"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEDVIT_SKIP_FULL_DEMO") == "1", reason="MEDVIT_SKIP_FULL_DEMO=1")
def test_full_lidar_demo_reaches_target(tmp_path):
    """The issue's bar: a held-out scene of at least 1M points through tiling, mIoU >= 0.80. (Its
    time is printed by the demo and reported in the README, not asserted: this machine is shared.)"""
    s = run_lidar_demo(tmp_path)
    assert s["points"] >= 1_000_000 and s["miou"] >= 0.80, s["iou"]
