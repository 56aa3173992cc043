"""``--runtime`` (issue 23): segment, batch and bench engine on OpenVINO and ONNX Runtime."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medvit.core.errors import MedvitError
from medvit.runtimes import backends, missing_packages
from pipelines.engine import Engine, InferenceSettings, check_options
from pipelines.engine.checks import CPU_ONLY_RUNTIMES, RUNTIMES
from tests.helpers import assert_user_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

INSTALLED = [r for r in ("onnxruntime", "openvino") if not missing_packages(r)]

NEAR_TIES = 1e-3
"""Share of voxels a converted runtime's labels may differ from torch's: the tiny checkpoint has
random weights, so many voxels' top two logits lie closer than the fp32 differences of another
runtime (at most RTOL x the largest logit); onnxruntime gave 0 and OpenVINO 3 of 52500 voxels."""


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """The runtime cache in the test's folder (``MEDVIT_CACHE``), and the ONNX exports counted."""
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _labels(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(next(folder.glob("*_seg.nii.gz"))).dataobj)


def _segment(phantom, ckpt, out: Path, capsys, *extra) -> tuple[np.ndarray, dict, str]:
    code, stdout, err = run_cli(["segment", str(phantom), "-o", str(out), "--checkpoint", str(ckpt),
                                 "--no-progress", *extra], capsys)
    assert code == 0, err
    return _labels(out), json.loads(next(out.glob("*_seg.json")).read_text()), err


@pytest.mark.parametrize("runtime", INSTALLED)
def test_segment_on_a_converted_runtime_gives_torchs_labels_and_caches_the_export(
        runtime, ckpt, phantom, tmp_path, capsys, cache, exports):
    want, sidecar, _ = _segment(phantom, ckpt, tmp_path / "torch", capsys)
    assert sidecar["options"]["runtime"] == "torch"
    assert sidecar["runtime"] == {"requested": "torch", "ran": "torch", "note": ""}
    assert not cache.exists() and not exports  # torch converts nothing

    got, sidecar, err = _segment(phantom, ckpt, tmp_path / "first", capsys, "--runtime", runtime)
    assert got.shape == want.shape
    assert (got != want).mean() <= NEAR_TIES
    assert sidecar["options"]["runtime"] == runtime
    assert sidecar["runtime"] == {"requested": runtime, "ran": runtime, "note": ""}
    assert len(exports) == 1 and len(list(cache.rglob("*.onnx"))) == 1
    assert "running on torch" not in err

    again, _, _ = _segment(phantom, ckpt, tmp_path / "second", capsys, "--runtime", runtime)
    assert len(exports) == 1  # the second run loads the cached export
    np.testing.assert_array_equal(again, got)


def test_auto_records_what_it_chose(ckpt, phantom, tmp_path, capsys, cache):
    _, sidecar, _ = _segment(phantom, ckpt, tmp_path / "auto", capsys, "--runtime", "auto")
    r = sidecar["runtime"]
    assert r["requested"] == "auto" and r["ran"] in ("torch", *INSTALLED)
    if INSTALLED:
        assert r["note"].startswith(f"auto: {r['ran']}; s per batch of 1: ")


def test_a_failed_conversion_runs_on_torch_warns_once_and_says_so(ckpt, phantom, tmp_path, capsys, cache, monkeypatch,
                                                                   caplog):
    """Two cases, one engine: one warning, both label maps torch's, both sidecars naming the fallback."""
    if "onnxruntime" not in INSTALLED:
        pytest.skip("onnxruntime is not installed")

    def broken(net, example, path):
        raise RuntimeError("unsupported operator aten::frobnicate\nmore detail")

    monkeypatch.setattr(backends, "export_onnx", broken)
    want, _, _ = _segment(phantom, ckpt, tmp_path / "torch", capsys)
    second = tmp_path / "in" / "other.nii.gz"
    second.parent.mkdir()
    second.write_bytes(phantom.read_bytes())
    caplog.set_level(logging.WARNING)
    code, _, err = run_cli(["segment", str(phantom), str(second), "-o", str(tmp_path / "o"), "--checkpoint", str(ckpt),
                            "--no-progress", "--runtime", "onnxruntime"], capsys)
    assert code == 0, err
    fallbacks = [r.getMessage() for r in caplog.records if "running on torch instead" in r.getMessage()]
    assert len(fallbacks) == 1 and "export failed (RuntimeError: unsupported operator aten::frobnicate)" in fallbacks[0]
    for name in ("case", "other"):
        np.testing.assert_array_equal(_labels_of(tmp_path / "o", name), want)
        r = json.loads((tmp_path / "o" / f"{name}_seg.json").read_text())["runtime"]
        assert r["requested"] == "onnxruntime" and r["ran"] == "torch" and "export failed" in r["note"]


def _labels_of(folder: Path, name: str) -> np.ndarray:
    return np.asarray(nib.load(folder / f"{name}_seg.nii.gz").dataobj)


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_a_cpu_runtime_on_a_gpu_is_one_line_naming_both_options(runtime, ckpt, phantom, tmp_path, capsys):
    """Refused before the checkpoint is read (a GPU need not exist for the check)."""
    for command in ("segment", "batch"):
        err = assert_user_error([command, str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "none"),
                                 "--runtime", runtime, "--device", "cuda"], capsys, f"--runtime {runtime} runs on the CPU only",
                                "--device is cuda", out_dir=tmp_path / "o")
        assert "none" not in err


@pytest.mark.parametrize("command", ["segment", "batch"])
def test_a_missing_runtime_package_is_one_line_with_the_install(command, phantom, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(backends, "installed", lambda package: package != "openvino")
    assert_user_error([command, str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "none"),
                       "--runtime", "openvino"], capsys, "runtime 'openvino' needs the Python package openvino",
                      "pip install 'medvit[cpu-runtimes]'", out_dir=tmp_path / "o")


def test_an_unknown_runtime_is_a_usage_error(phantom, tmp_path, capsys):
    assert_user_error(["segment", str(phantom), "-o", str(tmp_path / "o"), "--checkpoint", "c", "--runtime", "tvm"],
                      capsys, "'--runtime'")


def test_runtime_setting_is_checked_in_one_place():
    assert RUNTIMES == (*backends.RUNTIMES, "auto") and CPU_ONLY_RUNTIMES == backends.CONVERTED
    assert InferenceSettings().runtime == "torch"
    with pytest.raises(ValueError, match="runtime must be one of torch, openvino, onnxruntime, auto, got 'tvm'"):
        InferenceSettings(runtime="tvm")
    with pytest.raises(ValueError, match="runtime openvino runs on the CPU only, but device is cuda"):
        InferenceSettings(runtime="openvino", device="cuda")
    assert InferenceSettings(runtime="auto", device="cuda").runtime == "auto"  # auto keeps torch there
    with pytest.raises(MedvitError, match="--runtime must be one of"):
        check_options(runtime="tvm")
    with pytest.raises(MedvitError, match="--runtime onnxruntime runs on the CPU only, but --device is cuda:1"):
        check_options(runtime="onnxruntime", device="cuda:1")


def test_engine_predictor_is_the_net_on_torch_and_compiled_once_per_engine(tmp_path, exports):
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 3, padding=1)).eval()
    sha = "0" * 64
    assert Engine().predictor(net, roi=(8, 8, 8), in_channels=1, checkpoint_sha256=sha) is net
    if not INSTALLED:
        pytest.skip("neither onnxruntime nor openvino is installed")
    engine = Engine(InferenceSettings(runtime=INSTALLED[0], batch_size=2), runtime_threads=1,
                    runtime_cache=str(tmp_path))
    p = engine.predictor(net, roi=(8, 8, 8), in_channels=1, checkpoint_sha256=sha)
    assert p.runtime == INSTALLED[0] and p.batch == 2
    other = engine.with_settings(overlap=0.25)  # another case's engine shares the compiled net
    assert other.predictor(net, roi=(8, 8, 8), in_channels=1, checkpoint_sha256=sha) is p
    assert len(exports) == 1
    x = torch.randn(3, 1, 8, 8, 8)  # a full batch and a short one
    with torch.no_grad():
        torch.testing.assert_close(p(x), net(x), rtol=0, atol=1e-3 * float(net(x).abs().max()))


@pytest.mark.skipif("onnxruntime" not in INSTALLED, reason="onnxruntime is not installed")
def test_bench_engine_times_each_runtime_against_torch(tmp_path, capsys, cache):
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", "engine", "--model", "small", "--shape", "40,40,32", "--classes", "3",
                                 "--runtime", "torch,onnxruntime", "--no-peer", "--json", str(out)], capsys)
    assert code == 0, err
    lines = stdout.splitlines()
    head = lines.index("runtimes (ours; speed-ups and labels against ours on torch fp32):")
    assert lines[head + 1].split()[:3] == ["runtime", "wall", "s"]
    assert lines[head + 2].split()[0] == "torch" and lines[head + 3].split()[0] == "onnxruntime"
    res = json.loads(out.read_text())
    (run,) = res["runtimes"]
    assert run["runtime"] == run["runtime_ran"] == "onnxruntime" and run["windows"] == res["ours"]["windows"] == 1
    assert run["labels_equal_torch"] >= 0.99  # random weights: near ties (see NEAR_TIES)
    assert lines[head + 3].rstrip().endswith(f"{100 * run['labels_equal_torch']:.4f}%")
    assert len(list(cache.rglob("*.onnx"))) == 1


@pytest.mark.parametrize("args, needle", [
    (["--runtime", "torch,tvm"], "--runtime must be one of torch, openvino, onnxruntime, auto, got 'tvm'"),
    (["--runtime", "onnxruntime", "--amp"], "leave out --amp"),
])
def test_bench_engine_bad_runtime_options(args, needle, capsys):
    assert_user_error(["bench", "engine", "--model", "small", *args], capsys, needle)


def test_bench_engine_missing_runtime_package(capsys, monkeypatch):
    monkeypatch.setattr(backends, "installed", lambda package: package != "onnxruntime")
    assert_user_error(["bench", "engine", "--model", "small", "--runtime", "torch,onnxruntime"], capsys,
                      "pip install 'medvit[cpu-runtimes]'")


WITHOUT_RUNTIMES = """
import sys
# as on a machine without the cpu-runtimes extra: importing these fails, find_spec finds nothing
for name in ("openvino", "onnxruntime", "onnx", "onnxscript"):
    sys.modules[name] = None
from pipelines.cli.__main__ import main
main(sys.argv[1:])
"""


def test_without_the_runtimes_installed_torch_and_auto_still_segment(ckpt, phantom, tmp_path, capsys):
    """A fresh process where OpenVINO, ONNX Runtime and ONNX cannot be imported: the default and
    ``auto`` segment on torch with the labels of a normal run; ``openvino`` is the install line."""
    script = tmp_path / "without_runtimes.py"
    script.write_text(WITHOUT_RUNTIMES)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
           "MEDVIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    want, _, _ = _segment(phantom, ckpt, tmp_path / "here", capsys)

    def segment(out: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), "segment", str(phantom), "-o", str(tmp_path / out),
                               "--checkpoint", str(ckpt), "--no-progress", *extra], capture_output=True, text=True,
                              env=env)

    for out, extra in (("default", ()), ("auto", ("--runtime", "auto"))):
        r = segment(out, *extra)
        assert r.returncode == 0, r.stderr
        assert np.array_equal(_labels(tmp_path / out), want)
        ran = json.loads(next((tmp_path / out).glob("*_seg.json")).read_text())["runtime"]
        assert ran["ran"] == "torch"
    assert "neither OpenVINO nor ONNX Runtime is installed" in ran["note"]
    assert not (tmp_path / "cache").exists()
    r = segment("ov", "--runtime", "openvino")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "needs the Python packages openvino, onnx, onnxscript" in r.stderr and "medvit[cpu-runtimes]" in r.stderr
    assert not (tmp_path / "ov").exists()
