"""CPU runtimes behind the engine's predictor: same logits as torch, cached conversions, fallbacks."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from medvit.config import ModelConfig
from medvit.core.errors import MedvitError
from medvit.nets import build_net
from medvit.runtimes import (
    RTOL,
    backends,
    compile_predictor,
    default_cache_dir,
    missing_packages,
    predictor,
    state_sha256,
)

INSTALLED = [r for r in ("onnxruntime", "openvino") if not missing_packages(r)]
ANY = pytest.mark.skipif(not INSTALLED, reason="neither onnxruntime nor openvino is installed")
BOTH = pytest.mark.skipif(len(INSTALLED) < 2, reason="needs onnxruntime and openvino")

# the smallest settings each registered volume net accepts, with a window it takes
TINY = {
    "unetr": ((32, 32, 32), {"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 2}),
    "swin_unetr": ((64, 32, 32), {"feature_size": 12, "depths": [2, 1, 1, 1]}),  # a shifted block too
    "dformer": ((8, 16, 16), {"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 3, 4]}),
    "cswin_unet3d": ((8, 16, 16), {"embed_dim": 12, "depths": [1, 1, 1, 1], "num_heads": [3, 3, 3, 6],
                                    "feature_size": 8, "stem_stride": 1}),
    "transunet3d": ((16, 32, 32), {"strides": [1, 2, 2, 2], "base_features": 4, "max_features": 16,
                                   "vit_layers": 2, "vit_hidden": 16, "vit_heads": 2, "vit_mlp": 32}),
}
ROI = (8, 8, 8)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1)).eval()


def compile_conv(net: nn.Module, cache: Path, runtime: str, batch: int = 2) -> predictor.Predictor:
    return compile_predictor(net, runtime=runtime, roi=ROI, batch=batch, in_channels=1,
                             checkpoint_sha256=state_sha256(net), cache_dir=cache, threads=1)


def torch_out(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= RTOL * want.abs().max().item()


@ANY
@pytest.mark.parametrize("name", sorted(TINY))
def test_registered_nets_give_torchs_logits_on_each_runtime(name, tmp_path, exports):
    roi, options = TINY[name]
    torch.manual_seed(0)
    net = build_net(ModelConfig(name=name, out_channels=3, roi_size=roi, options=options)).eval()
    x = torch.randn(3, 1, *roi)  # three windows through a batch of 2: a full batch and a short one
    want = torch_out(net, x)
    for runtime in INSTALLED:
        p = compile_predictor(net, runtime=runtime, roi=roi, batch=2, in_channels=1,
                              checkpoint_sha256=state_sha256(net), cache_dir=tmp_path, threads=2)
        assert (p.runtime, p.note) == (runtime, "")
        assert_close(p(x), want)
        assert_close(p(x[:1]), want[:1])
    assert len(exports) == 1  # both runtimes read the same export


@ANY
def test_second_call_converts_nothing_and_gives_the_same_logits(tmp_path, exports):
    net, x = conv_net(), torch.randn(2, 1, *ROI)
    runtime = INSTALLED[0]
    first = compile_conv(net, tmp_path, runtime)(x)
    assert len(exports) == 1
    again = compile_conv(net, tmp_path, runtime)
    assert len(exports) == 1 and again.runtime == runtime
    assert torch.equal(again(x), first)
    other_batch = compile_conv(net, tmp_path, runtime, batch=1)  # another static shape: its own export
    assert len(exports) == 2 and other_batch.runtime == runtime


@pytest.mark.skipif("openvino" not in INSTALLED, reason="openvino is not installed")
def test_openvino_keeps_its_compiled_net_beside_the_export_and_survives_a_broken_one(tmp_path):
    net, x = conv_net(), torch.randn(2, 1, *ROI)
    first = compile_conv(net, tmp_path, "openvino")(x)
    blobs = list(tmp_path.rglob(f"*.openvino-{backends.version('openvino')}.compiled/*"))
    assert blobs and all(b.stat().st_size > 0 for b in blobs)
    assert torch.equal(compile_conv(net, tmp_path, "openvino")(x), first)
    for b in blobs:  # a blob cut short (a crash while OpenVINO wrote it): compiled again, same logits
        b.write_bytes(b.read_bytes()[:64])
    again = compile_conv(net, tmp_path, "openvino")
    assert again.runtime == "openvino" and torch.equal(again(x), first)


@ANY
def test_another_version_is_rebuilt_not_loaded(tmp_path, exports, monkeypatch):
    net = conv_net()
    runtime = INSTALLED[0]
    compile_conv(net, tmp_path, runtime)
    real = backends.version

    def newer(package):
        return "99.0" if package == runtime else real(package)

    monkeypatch.setattr(backends, "version", newer)
    checks = []
    monkeypatch.setattr(predictor._Build, "reference", lambda self, real=predictor._Build.reference: checks.append(1) or real(self))
    p = compile_conv(net, tmp_path, runtime)
    assert p.runtime == runtime and len(exports) == 1 and checks == [1]  # checked again, export reused
    assert list(tmp_path.rglob(f"*.{runtime}-99.0.json"))

    monkeypatch.setattr(backends, "version", lambda package: "3.0" if package == "torch" else newer(package))
    x = torch.randn(1, 1, *ROI)
    assert_close(compile_conv(net, tmp_path, runtime)(x), torch_out(net, x))
    assert len(exports) == 2  # another torch exports anew
    assert len(list(tmp_path.rglob("*.onnx"))) == 2


@ANY
def test_unwritable_cache_warns_once_and_still_runs(tmp_path, caplog, exports):
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"  # under a file: nothing can be created there, even as root
    net, x = conv_net(), torch.randn(2, 1, *ROI)
    with caplog.at_level(logging.WARNING):
        p = compile_conv(net, cache, INSTALLED[0])
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(cache) in warnings[0].getMessage()
    assert "cannot be written" in warnings[0].getMessage()
    assert p.runtime == INSTALLED[0]
    assert_close(p(x), torch_out(net, x))
    compile_conv(net, cache, INSTALLED[0])
    assert len(exports) == 2  # nothing cached: converted again


@ANY
def test_failed_export_runs_on_torch_with_one_warning_and_is_not_retried(tmp_path, caplog, monkeypatch):
    tries = []

    def broken(net, example, path):
        tries.append(path)
        raise RuntimeError("no ONNX form for aten::window_partition\nlong traceback text")

    monkeypatch.setattr(backends, "export_onnx", broken)
    net, x = conv_net(), torch.randn(2, 1, *ROI)
    runtime = INSTALLED[0]
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            p = compile_conv(net, tmp_path, runtime)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1
        assert warnings[0] == (f"runtime {runtime}: export failed (RuntimeError: no ONNX form for "
                               "aten::window_partition); running on torch instead")
        assert p.runtime == "torch" and "window_partition" in p.note
        assert torch.equal(p(x), torch_out(net, x))
    assert len(tries) == 1  # the cached verdict says why, without a second try


@ANY
def test_conversion_that_differs_from_torch_is_not_used(tmp_path, caplog, monkeypatch):
    real = backends.session

    def off_by_one(*args):
        run = real(*args)
        return lambda x: run(x) + 1.0

    monkeypatch.setattr(backends, "session", off_by_one)
    with caplog.at_level(logging.WARNING):
        p = compile_conv(conv_net(), tmp_path, INSTALLED[0])
    assert p.runtime == "torch"
    assert "output differs from torch by 1 (tolerance" in caplog.text


@ANY
def test_auto_picks_a_runtime_that_passes_and_remembers_it(tmp_path, exports, monkeypatch):
    net, x = conv_net(), torch.randn(3, 1, *ROI)
    p = compile_conv(net, tmp_path, "auto")
    assert p.requested == "auto" and p.runtime in ("torch", *INSTALLED)
    assert set(p.seconds) == {"torch", *INSTALLED} and p.note.startswith(f"auto: {p.runtime};")
    assert_close(p(x), torch_out(net, x))
    timed = []
    monkeypatch.setattr(predictor, "_median_seconds", lambda *a, **k: timed.append(1) or 1.0)
    again = compile_conv(net, tmp_path, "auto")
    assert (again.runtime, again.seconds, timed, len(exports)) == (p.runtime, p.seconds, [], 1)


@ANY
def test_auto_skips_a_runtime_that_fails(tmp_path, monkeypatch):
    real = backends.session
    broken = INSTALLED[0]

    def session(runtime, *args):
        if runtime == broken:
            raise RuntimeError("unsupported Reshape")
        return real(runtime, *args)

    monkeypatch.setattr(backends, "session", session)
    p = compile_conv(conv_net(), tmp_path, "auto")
    assert p.runtime != broken and broken not in p.seconds
    assert f"{broken} unusable: compile failed (RuntimeError: unsupported Reshape)" in p.note


def test_missing_package_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setattr(backends, "installed", lambda package: package not in ("openvino", "onnxscript"))
    with pytest.raises(MedvitError) as e:
        compile_conv(conv_net(), Path("/nonexistent"), "openvino")
    assert str(e.value) == ("runtime 'openvino' needs the Python packages openvino, onnxscript, not installed: "
                            "pip install 'medvit[cpu-runtimes]' (or pip install openvino onnxscript)")


def test_auto_without_runtimes_and_torch_run_the_net_itself(monkeypatch, tmp_path):
    net, x = conv_net(), torch.randn(1, 1, *ROI)
    monkeypatch.setattr(backends, "installed", lambda package: False)
    for runtime in ("torch", "auto"):
        p = compile_conv(net, tmp_path, runtime)
        assert p.runtime == "torch" and torch.equal(p(x), torch_out(net, x))
    assert "neither OpenVINO nor ONNX Runtime is installed" in p.note
    assert not any(tmp_path.iterdir())


def test_lidar_nets_stay_on_torch(tmp_path):
    class SparseNet(nn.Module):
        def forward(self, x):
            return x

    SparseNet.__module__ = "pointcloud.nets.sparse_unet"
    with pytest.raises(MedvitError, match="sparse convolutions .* run them on torch"):
        compile_conv(SparseNet(), tmp_path, "onnxruntime")
    assert compile_conv(SparseNet(), tmp_path, "auto").runtime == "torch"


def test_unknown_runtime_is_a_user_error_and_a_bad_key_a_bug(tmp_path):
    with pytest.raises(MedvitError, match="unknown runtime 'tensorrt'; choose from torch, openvino, onnxruntime or auto"):
        compile_conv(conv_net(), tmp_path, "tensorrt")
    with pytest.raises(ValueError, match="checkpoint_sha256 must be 64 lowercase hex digits, got '../x'"):
        compile_predictor(conv_net(), runtime="auto", roi=ROI, batch=1, in_channels=1, checkpoint_sha256="../x")


@ANY
def test_a_window_of_another_shape_is_refused(tmp_path):
    p = compile_conv(conv_net(), tmp_path, INSTALLED[0])
    with pytest.raises(ValueError, match=r"compiled for \(B, 1, 8, 8, 8\) windows, got \(1, 1, 8, 8, 16\)"):
        p(torch.zeros(1, 1, 8, 8, 16))


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDVIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "medvit" / "runtimes"
    monkeypatch.setenv("MEDVIT_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "runtimes"
    monkeypatch.delenv("MEDVIT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "medvit" / "runtimes"
