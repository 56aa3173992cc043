"""The engine and LiDAR benches keep what they measured when a time limit stops them part-way."""

import json

import numpy as np
import pytest

from pipelines.bench import engine as bench_engine
from pipelines.bench.engine import Case, compare


def test_compare_reports_after_every_run(monkeypatch):
    calls = []

    def fake_spawn(impl, case, out):  # a worker: writes its labels, returns its measurements
        calls.append((impl, case.output_device))
        np.save(out, np.zeros((4, 4, 4), np.uint8) + (impl == "monai" and case.output_device == "cpu"))
        return {"impl": impl, "seconds": 1.0, "output_device": case.output_device}

    monkeypatch.setattr(bench_engine, "_spawn", fake_spawn)
    seen = []
    res = compare(Case(model="small", shape=(4, 4, 4), classes=2), peer_outputs=("cuda", "cpu"),
                  on_result=lambda r: seen.append([m["output_device"] for m in r.get("monai_runs", [])]))
    assert calls == [("ours", None), ("monai", "cuda"), ("monai", "cpu")]
    # ours alone, then each MONAI run as it finishes
    assert seen == [[], ["cuda"], ["cuda", "cpu"]]
    assert [m["labels_equal"] for m in res["monai_runs"]] == [1.0, 0.0]


def test_bench_lidar_writes_json_after_every_row_and_names_the_machine_last(monkeypatch, tmp_path):
    from pipelines.bench import lidar as bench_lidar
    from pipelines.cli import main

    events = []
    out = tmp_path / "lidar.json"

    def fake_run(folder, *, device, sizes, tile, on_row):  # the workers: two rows, each reported
        res = {"backbones": [], "scaling": [], "width": 24, "voxel": 0.1, "tile": tile}
        for b in ("sparse_unet", "flatformer"):
            res["backbones"].append({"input": "scan", "backbone": b, "error": "stub"})
            on_row(res)
            events.append(("row", sorted(json.loads(out.read_text()))))
        return res

    monkeypatch.setattr(bench_lidar, "run", fake_run)
    monkeypatch.setattr(bench_engine, "machine", lambda: events.append(("machine",)) or "test box")
    with pytest.raises(SystemExit) as done:
        main(["bench", "lidar", "--data", str(tmp_path), "--json", str(out)])
    assert done.value.code == 0
    assert [e[0] for e in events] == ["row", "row", "machine"]
    assert "machine" not in events[0][1]
    assert json.loads(out.read_text())["machine"] == "test box"
