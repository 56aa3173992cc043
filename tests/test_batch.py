"""``medvit batch`` (issue 21): a cohort on Ray, crash-safe reruns, error rows, no patient data."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medvit.checkpoint import save_checkpoint
from medvit.config import parse_config
from medvit.data.phantom import LABELS, make_phantom
from medvit.core.errors import InputError
from medvit.nets import build_net
from medvit.runtimes import missing_packages
from pipelines.volume.cohort import hashed_id, list_cases
from tests.helpers import TINY, run_cli
from tests.helpers_dicom import CANARIES, find_canaries, write_canary_series

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance of 2 CPUs for the in-process runs of this file (``batch`` uses a
    session its process already holds), shut down at the end."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             object_store_memory=100 << 20)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = parse_config(TINY)
    torch.manual_seed(0)
    return save_checkpoint(build_net(cfg.model), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", config=cfg)


def _phantoms(folder: Path, n: int, seed: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = make_phantom(rng, spacing=(8.0, 8.0, 8.0), axcodes="LPS" if i % 2 else "RAS")
        paths.append(folder / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(p.image.astype(np.int16), p.affine), paths[-1])
    return paths


def _table(out: Path) -> list[dict]:
    with open(out / "cohort.csv") as f:
        return list(csv.DictReader(f))


def _files(out: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (inode, mtime_ns) of every file under ``out``'s case folders."""
    return {p.relative_to(out).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*/*")}


def test_cohort_on_two_workers_writes_case_folders_and_table(ray_session, ckpt, tmp_path, capfd):
    """Four cases on two workers: each case id's folder holds the label map ``segment`` writes for
    that input (same voxels, same geometry), the cohort table one row per case and label with the
    map's voxel count and volume, in CSV and Parquet alike; a rerun skips every case."""
    import pyarrow.parquet as pq

    paths = _phantoms(tmp_path / "cases", 4)
    out = tmp_path / "out"
    args = ["batch", str(tmp_path / "cases"), "-o", str(out), "--checkpoint", str(ckpt), "--workers", "2", "--stats"]
    code, stdout, err = run_cli(args, capfd)
    assert code == 0, err
    assert "4 cases: 4 segmented, 0 already done (skipped), 0 failed" in stdout and " on 2 Ray worker(s)" in stdout
    ids = [hashed_id([str(p)]) for p in paths]
    with open(out / "cases.csv") as f:
        assert {r["case_id"]: r["source"] for r in csv.DictReader(f)} == {i: str(p) for i, p in zip(ids, paths)}
    code, _, err = run_cli(["segment", str(paths[1]), "-o", str(tmp_path / "one"), "--checkpoint", str(ckpt)], capfd)
    assert code == 0, err
    alone, batched = nib.load(tmp_path / "one" / "case1_seg.nii.gz"), nib.load(out / ids[1] / f"{ids[1]}_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(batched.dataobj), np.asarray(alone.dataobj))
    np.testing.assert_allclose(batched.affine, alone.affine)
    assert sorted(p.name for p in (out / ids[1]).iterdir()) == sorted(
        ["done.json", f"{ids[1]}_seg.nii.gz", f"{ids[1]}_seg.json", f"{ids[1]}_stats.csv", f"{ids[1]}_stats.json"])
    sidecar = json.loads((out / ids[1] / f"{ids[1]}_seg.json").read_text())
    assert sidecar["source"]["case_id"] == ids[1] and "paths" not in sidecar["source"]
    assert sorted(sidecar["outputs"]) == [f"{ids[1]}_stats.csv", f"{ids[1]}_stats.json"]

    rows = _table(out)
    assert len(rows) == 4 * (len(LABELS) - 1) and {r["status"] for r in rows} == {"ok"}  # LABELS has background
    for i in ids:
        labels = np.asarray(nib.load(out / i / f"{i}_seg.nii.gz").dataobj)
        for r in (r for r in rows if r["case_id"] == i):
            assert int(r["voxels"]) == int((labels == int(r["label_id"])).sum())
            assert float(r["volume_mm3"]) == pytest.approx(int(r["voxels"]) * 8.0 ** 3)
            assert r["label_name"] == LABELS[int(r["label_id"])]
    parquet = pq.read_table(out / "cohort.parquet").to_pylist()
    assert [(r["case_id"], r["label_id"], r["voxels"]) for r in parquet] == \
        [(r["case_id"], int(r["label_id"]), int(r["voxels"])) for r in rows]

    before = _files(out)
    code, stdout, err = run_cli(args, capfd)
    assert code == 0, err
    assert "4 cases: 0 segmented, 4 already done (skipped), 0 failed" in stdout
    assert _files(out) == before  # nothing rewritten


def _session_pids(sid: int) -> list[int]:
    """The live (not zombie) processes of session ``sid``, from /proc/PID/stat."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[3]) == sid:
                pids.append(int(d.name))
    return pids


def _kill_session(sid: int) -> None:
    """SIGKILL every process of the session the test started (the batch, its Ray processes)."""
    deadline = time.monotonic() + 60
    while (pids := _session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.2)
    assert not _session_pids(sid)


def test_kill_9_mid_batch_then_rerun_skips_finished_cases(ray_session, ckpt, tmp_path, capfd):
    """A batch killed with SIGKILL (with its whole Ray session) after its first case: the rerun
    skips exactly the cases whose done record and outputs agree (untouched files), redoes the
    rest and a case whose label map was damaged, removes the temporary folders, and ends with
    label maps byte-equal to an uninterrupted run's."""
    _phantoms(tmp_path / "cases", 5)
    out, whole = tmp_path / "out", tmp_path / "whole"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "batch", str(tmp_path / "cases"), "-o", str(out),
                             "--checkpoint", str(ckpt), "--no-progress"], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(out.glob("*/done.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    _kill_session(proc.pid)
    proc.wait()
    finished = sorted(p.parent.name for p in out.glob("*/done.json"))
    assert 1 <= len(finished) < 5, finished
    (out / ".c0000000000.tmp-dead").mkdir()  # a kill inside a case leaves such a folder
    (out / ".c0000000000.tmp-dead" / "half_seg.nii.gz").write_bytes(b"\x1f\x8b half")
    kept = {k: v for k, v in _files(out).items() if k.split("/")[0] in finished}
    damaged = None
    if len(finished) > 1:  # a finished case whose label map was damaged since: redone
        damaged = finished.pop()
        (out / damaged / f"{damaged}_seg.nii.gz").write_bytes(b"\x1f\x8b damaged")
        kept = {k: v for k, v in kept.items() if not k.startswith(damaged)}

    code, stdout, err = run_cli(["batch", str(tmp_path / "cases"), "-o", str(out), "--checkpoint", str(ckpt)], capfd)
    assert code == 0, err
    assert f"5 cases: {5 - len(finished)} segmented, {len(finished)} already done (skipped), 0 failed" in stdout
    assert {k: v for k, v in _files(out).items() if k in kept} == kept  # the skipped cases' files untouched
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    code, _, err = run_cli(["batch", str(tmp_path / "cases"), "-o", str(whole), "--checkpoint", str(ckpt)], capfd)
    assert code == 0, err
    maps = sorted(p.relative_to(whole) for p in whole.glob("*/*_seg.nii.gz"))
    assert len(maps) == 5 and sorted(p.relative_to(out) for p in out.glob("*/*_seg.nii.gz")) == maps
    for rel in maps:
        assert (out / rel).read_bytes() == (whole / rel).read_bytes(), rel
    assert (out / "cohort.csv").read_text() == (whole / "cohort.csv").read_text()


def test_failed_cases_are_error_rows_and_the_exit_status_counts_them(ray_session, ckpt, data_dir, tmp_path, capfd):
    """A corrupt NIfTI and a folder of two series among good cases: each failed case is one error
    row with its one-line message (and one stderr line), leaves no folder, the good cases finish,
    and the exit status is 10 + 2."""
    cases = tmp_path / "cases"
    good = _phantoms(cases, 2)
    (cases / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 this is no image")
    write_canary_series(data_dir / "dcmqi/segmentations/ct-3slice", cases / "study" / "a", new_series=True)
    write_canary_series(data_dir / "dcmqi/segmentations/ct-3slice", cases / "study" / "b", new_series=True)
    out = tmp_path / "out"
    code, stdout, err = run_cli(["batch", str(cases), "-o", str(out), "--checkpoint", str(ckpt), "--workers", "2"], capfd)
    assert code == 12, (code, stdout, err)
    assert "4 cases: 2 segmented, 0 already done (skipped), 2 failed" in stdout
    bad, study = hashed_id([str(cases / "corrupt.nii.gz")]), hashed_id([str(cases / "study")])
    rows = _table(out)
    errors = {r["case_id"]: r["message"] for r in rows if r["status"] == "error"}
    assert set(errors) == {bad, study}
    assert errors[bad].startswith(f"{bad}: ") and "NIfTI" in errors[bad]
    assert "holds 2 DICOM series" in errors[study] and "--series" in errors[study] and str(cases) not in errors[study]
    assert {r["case_id"] for r in rows if r["status"] == "ok"} == {hashed_id([str(p)]) for p in good}
    assert not (out / bad).exists() and not (out / study).exists()
    first = hashed_id([str(good[0])])  # without --stats: the table has them, the case folder not
    assert sorted(p.name for p in (out / first).iterdir()) == sorted(["done.json", f"{first}_seg.json",
                                                                       f"{first}_seg.nii.gz"])
    assert json.loads((out / first / f"{first}_seg.json").read_text())["outputs"] == []
    failed_lines = [line for line in err.splitlines() if line.startswith("medvit: case ")]
    assert sorted(failed_lines) == sorted(f"medvit: case {i} failed: {m}" for i, m in errors.items())


@pytest.mark.skipif(bool(missing_packages("onnxruntime")), reason="onnxruntime is not installed")
def test_batch_on_onnxruntime_gives_torchs_labels_and_converts_once(ray_session, ckpt, tmp_path, capfd, monkeypatch):
    """Two cases on one worker with --runtime onnxruntime: the labels ``segment`` gives on torch
    (random weights: near ties allow a few voxels, as in test_runtime_cli), each sidecar saying
    onnxruntime ran, one export in the cache ``MEDVIT_CACHE`` names (the workers get it from the
    driver), and a rerun on torch redoes the cases (the runtime is a recorded option)."""
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))
    paths = _phantoms(tmp_path / "cases", 2)
    out = tmp_path / "out"
    args = ["batch", str(tmp_path / "cases"), "-o", str(out), "--checkpoint", str(ckpt), "--workers", "1"]
    code, stdout, err = run_cli(args + ["--runtime", "onnxruntime"], capfd)
    assert code == 0, err
    assert "2 cases: 2 segmented" in stdout
    assert len(list((tmp_path / "cache").rglob("*.onnx"))) == 1
    for p in paths:
        i = hashed_id([str(p)])
        sidecar = json.loads((out / i / f"{i}_seg.json").read_text())
        assert sidecar["options"]["runtime"] == "onnxruntime"
        assert sidecar["runtime"] == {"requested": "onnxruntime", "ran": "onnxruntime", "note": ""}
        code, _, err = run_cli(["segment", str(p), "-o", str(tmp_path / "one" / i), "--checkpoint", str(ckpt),
                                "--no-progress"], capfd)
        assert code == 0, err
        alone = np.asarray(nib.load(next((tmp_path / "one" / i).glob("*_seg.nii.gz"))).dataobj)
        batched = np.asarray(nib.load(out / i / f"{i}_seg.nii.gz").dataobj)
        assert (alone != batched).mean() <= 1e-3
    code, stdout, err = run_cli(args, capfd)
    assert code == 0 and "2 cases: 2 segmented, 0 already done" in stdout, (stdout, err)


def test_closed_port_as_address_fails_at_once(ckpt, tmp_path, capfd, monkeypatch):
    """--address naming a port where nothing listens: one line naming it, exit 2, nothing written;
    decided by one TCP connect bounded by PROBE_TIMEOUT_S (under the issue's 5 s), before Ray starts."""
    import ray

    import pipelines.volume.batch as batch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _phantoms(tmp_path / "cases", 1)
    timeouts = []
    connect = socket.create_connection

    def spy(address, timeout=None, *args, **kwargs):
        timeouts.append(timeout)
        return connect(address, timeout, *args, **kwargs)

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was called for a dead address")

    monkeypatch.setattr(batch.socket, "create_connection", spy)
    monkeypatch.setattr(ray, "init", no_ray)
    code, stdout, err = run_cli(["batch", str(tmp_path / "cases"), "-o", str(tmp_path / "out"), "--checkpoint",
                                 str(ckpt), "--address", f"127.0.0.1:{port}"], capfd)
    assert timeouts == [batch.PROBE_TIMEOUT_S] and batch.PROBE_TIMEOUT_S < 5
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--address 127.0.0.1:{port}: no Ray cluster reachable there" in err
    assert not (tmp_path / "out").exists()


def test_without_ray_one_line_says_what_to_install(ckpt, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    _phantoms(tmp_path / "cases", 1)
    code, _, err = run_cli(["batch", str(tmp_path / "cases"), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt)],
                           capfd)
    assert code == 2 and err.count("\n") == 1, err
    assert "pip install 'medvit[cohort]'" in err


def test_case_ids_from_a_datalist_or_hashed(tmp_path):
    """A datalist's ``id``/``case_id`` names its case; an entry without one gets the hash of its
    path; its ``test`` list is the default; an id that cannot name a folder, or one given twice,
    is a one-line error naming the datalist."""
    a, b, c = _phantoms(tmp_path, 3)
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"training": [{"image": a.name, "label": a.name}],
                              "test": [{"image": a.name, "id": 7}, {"image": b.name, "case_id": "s-01"}, c.name]}))
    assert [(x.case_id, x.paths) for x in list_cases(dl)] == \
        [("7", (str(a),)), ("s-01", (str(b),)), (hashed_id([str(c)]), (str(c),))]
    assert [x.case_id for x in list_cases(dl, split="training")] == [hashed_id([str(a)])]
    for bad, why in (({"image": a.name, "id": "../x"}, "must be 1-64 letters"),
                     ({"image": b.name, "id": 7}, "two cases have the id '7'")):
        dl.write_text(json.dumps({"test": [{"image": a.name, "id": 7}, bad]}))
        with pytest.raises(InputError, match=why):
            list_cases(dl)


def test_no_patient_data_in_batch_output_or_logs(ray_session, ckpt, data_dir, tmp_path, capfd, caplog):
    """A case folder named with a canary, holding a series whose identifying attributes are
    canaries, and a failing folder of two such series: no canary in any output name, table,
    sidecar, log or progress line, nor in the Ray workers' log files (DICOM objects, which carry
    the patient module by the standard, and cases.csv, the user's own map back to the sources,
    aside)."""
    cases, out = tmp_path / "cohort", tmp_path / "out"
    src = data_dir / "dcmqi/segmentations/ct-3slice"
    write_canary_series(src, cases / f"{CANARIES['PatientID']}_ct")
    write_canary_series(src, cases / f"{CANARIES['AccessionNumber']}_study" / "a", new_series=True)
    write_canary_series(src, cases / f"{CANARIES['AccessionNumber']}_study" / "b", new_series=True)
    texts: dict[str, str] = {}
    caplog.set_level(logging.DEBUG)
    code, texts["stdout"], texts["stderr"] = run_cli(
        ["batch", str(cases), "-o", str(out), "--checkpoint", str(ckpt), "--stats", "--preview", "--dicom-seg",
         "--resample", "labels"], capfd)
    assert code == 11, texts
    texts["log records"] = "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records)
    ok = hashed_id([str(cases / f"{CANARIES['PatientID']}_ct")])
    sidecar = json.loads((out / ok / f"{ok}_seg.json").read_text())
    assert sorted(sidecar["outputs"]) == sorted(f"{ok}{s}" for s in ("_stats.csv", "_stats.json", "_preview.png",
                                                                      "_seg.dcm"))
    assert (out / ok / f"{ok}_seg.dcm").is_file() and (out / ok / f"{ok}_preview.png").is_file()
    assert CANARIES["PatientID"] in (out / "cases.csv").read_text()  # the search below would see it
    session_logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"  # the workers' own
    hits = [h for h in find_canaries(texts, [out, session_logs]) if f"{out / 'cases.csv'}" not in h]
    assert not hits, "patient data leaked:\n" + "\n".join(hits)


def test_address_joins_a_running_cluster(ray_session, ckpt, tmp_path):
    """A second process given --address of this file's Ray instance runs its cases on it and
    leaves it running."""
    ray = ray_session
    _phantoms(tmp_path / "cases", 2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "batch", str(tmp_path / "cases"), "-o",
                           str(tmp_path / "out"), "--checkpoint", str(ckpt), "--no-progress", "--address",
                           ray.get_runtime_context().gcs_address], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "2 cases: 2 segmented" in proc.stdout and " on 1 Ray worker(s)" in proc.stdout
    assert len(list((tmp_path / "out").glob("*/done.json"))) == 2
    assert ray.is_initialized() and ray.cluster_resources().get("CPU") == 2


def test_cases_of_a_manifest_and_refused_sources(tmp_path):
    """A manifest with --root gives its training and validation cases (or one split); a folder of
    cases holding DICOM files itself, or an OUT inside a folder INPUT, is refused in one line."""
    from pipelines.volume.batch import run_batch

    a, b = _phantoms(tmp_path / "data", 2)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"name": "two", "labels": {"0": "background", "1": "liver"}, "layout": {},
                                    "training": [{"image": a.name, "label": a.name}],
                                    "validation": [{"image": b.name, "label": b.name}]}))
    assert [c.paths for c in list_cases(manifest, root=tmp_path / "data")] == [(str(a),), (str(b),)]
    assert [c.paths for c in list_cases(manifest, root=tmp_path / "data", split="validation")] == [(str(b),)]
    with pytest.raises(InputError, match="give the dataset's folder with --root"):
        list_cases(manifest)
    (tmp_path / "data" / "01.dcm").write_bytes(b"\0" * 128 + b"DICM")
    with pytest.raises(InputError, match="holds DICOM files itself"):
        list_cases(tmp_path / "data")
    (tmp_path / "data" / "01.dcm").unlink()
    with pytest.raises(InputError, match="lies inside the folder of cases"):
        run_batch(tmp_path / "data", tmp_path / "data" / "out", tmp_path / "x.safetensors")
    assert not (tmp_path / "data" / "out").exists()


def test_a_done_record_counts_only_when_it_agrees_with_the_run(tmp_path):
    """``finished``: the record of the same checkpoint, options and sources with every output at its
    SHA-256; another option, checkpoint or source, a changed or missing output, or a record that
    does not parse, and the case is redone."""
    from pipelines.volume.cohort import finished, output_hashes

    case = tmp_path / "c1"
    case.mkdir()
    (case / "c1_seg.nii.gz").write_bytes(b"labels")
    expect = {"checkpoint_sha256": "ab", "options": {"tta": False}, "sources_sha256": "cd"}
    (case / "done.json").write_text(json.dumps({**expect, "outputs": output_hashes(case), "labels": []}))
    assert finished(case, expect)["outputs"] == output_hashes(case)
    for other in ({**expect, "options": {"tta": True}}, {**expect, "checkpoint_sha256": "ef"},
                  {**expect, "sources_sha256": "01"}):
        assert finished(case, other) is None
    (case / "c1_seg.nii.gz").write_bytes(b"labelz")
    assert finished(case, expect) is None
    (case / "c1_seg.nii.gz").unlink()
    assert finished(case, expect) is None
    (case / "done.json").write_text('{"checkpoint_sha256": "ab", ')
    assert finished(case, expect) is None
