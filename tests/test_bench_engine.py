"""The engine bench keeps what it measured when a time limit stops it part-way."""

import numpy as np

from pipelines import bench_engine
from pipelines.bench_engine import Case, compare


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
