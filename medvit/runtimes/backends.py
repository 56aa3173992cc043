"""The pieces each runtime needs: which packages it takes, their versions, the ONNX export, and a
session that runs an exported net on NumPy arrays.

One exporter serves both runtimes: ``torch.onnx.export(dynamo=True)`` (torch.export, then
onnxscript's translation and optimiser) at a fixed opset, with static shapes. The TorchScript
exporter (``dynamo=False``) converts UNETR but refuses MONAI's Swin UNETR ("ONNX export of
instance_norm for unknown channel size": its shape inference loses the channels after the window
partition), and the export without onnxscript's optimiser gives a graph ONNX Runtime rejects (a
convolution bias of the wrong rank). OpenVINO reads the same ONNX file: with static shapes it runs
Swin UNETR, which its own converter traced with dynamic shapes does not (a Reshape in the window
partition fails at run time). Reading the file takes a fraction of a second, but OpenVINO's compile
of Swin UNETR takes seconds, so OpenVINO's compiled blob is kept beside the export (its
``CACHE_DIR``, which OpenVINO keys on the file and the settings, and recompiles when a blob does
not load).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medvit.core.errors import MedvitError

RUNTIMES = ("torch", "openvino", "onnxruntime")
"""Every runtime :func:`medvit.runtimes.compile_predictor` accepts, besides ``auto``."""
CONVERTED = ("openvino", "onnxruntime")
"""The runtimes that run an ONNX export of the net, in the order ``auto`` tries them."""
OPSET = 18
"""The ONNX opset of every export (both runtimes support it)."""
INSTALL_HINT = "pip install 'medvit[cpu-runtimes]'"

_NEEDS = {"openvino": ("openvino", "onnx", "onnxscript"), "onnxruntime": ("onnxruntime", "onnx", "onnxscript")}
_EXPORT_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch.fx.experimental")

Session = Callable[[np.ndarray], np.ndarray]
"""A compiled net: a float32 ``(batch, C, *roi)`` array (the static shape) -> the first output."""


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (without importing it)."""
    return importlib.util.find_spec(package) is not None


def version(package: str) -> str:
    """The installed distribution version of ``package`` ("" when absent)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def missing_packages(runtime: str) -> list[str]:
    """The packages ``runtime`` needs that are not installed (none for torch)."""
    return [p for p in _NEEDS.get(runtime, ()) if not installed(p)]


def require(runtime: str) -> None:
    """MedvitError saying how to install what ``runtime`` needs, if anything is missing."""
    missing = missing_packages(runtime)
    if missing:
        raise MedvitError(f"runtime {runtime!r} needs the Python package{'s' if len(missing) > 1 else ''} "
                          f"{', '.join(missing)}, not installed: {INSTALL_HINT} (or pip install {' '.join(missing)})")


def is_sparse_net(net: nn.Module) -> bool:
    """Whether ``net`` is a LiDAR net (the ``pointcloud`` package or spconv modules): its sparse
    convolutions and hash-table voxel lookups have no ONNX form these runtimes run."""
    if type(net).__module__.split(".")[0] == "pointcloud":
        return True
    return any(type(m).__module__.split(".")[0] == "spconv" for m in net.modules())


def export_stem() -> str:
    """What an export depends on besides the net and its shapes: torch's and onnxscript's versions
    and the opset; part of the cached file's name, so another version exports anew."""
    return f"torch{version('torch')}-onnxscript{version('onnxscript')}-opset{OPSET}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's progress lines, tracer warnings and loggers, silenced for one export."""
    levels = {name: logging.getLogger(name).level for name in _EXPORT_LOGGERS}
    try:
        for name in levels:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Write ``net`` (in eval mode, on the CPU) as one ONNX file at ``path`` for inputs shaped like
    ``example`` exactly (static shapes; weights inside the file, so at most 2 GB of them)."""
    with _quiet(), torch.no_grad():
        torch.onnx.export(net, (example,), str(path), dynamo=True, optimize=True, external_data=False,
                          opset_version=OPSET, input_names=["x"], verbose=False)


def session(runtime: str, path: Path, threads: int, compiled_dir: Path | None = None) -> Session:
    """A session of ``runtime`` over the ONNX file at ``path`` using ``threads`` threads.
    ``compiled_dir``: where OpenVINO keeps its compiled blobs (its ``CACHE_DIR``; None: none kept);
    ONNX Runtime ignores it (its session starts in a fraction of the compile's time)."""
    if runtime == "onnxruntime":
        return _onnxruntime(path, threads)
    if runtime == "openvino":
        return _openvino(path, threads, compiled_dir)
    raise ValueError(f"no session for runtime {runtime!r}")


def _onnxruntime(path: Path, threads: int) -> Session:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # one net, run sequentially: no second pool to share the cores with
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return sess.run(None, {name: x})[0]

    return run


def _openvino(path: Path, threads: int, compiled_dir: Path | None) -> Session:
    import openvino as ov

    core = ov.Core()
    # f32 explicitly: the CPU plugin's default hint is bf16 where the CPU has it, and emulated
    # bf16 on a CPU without it is several times slower than f32
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32",
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if compiled_dir is not None:
        # OpenVINO's own cache of the compiled net: compiling Swin UNETR takes seconds every run
        config["CACHE_DIR"] = str(compiled_dir)
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()  # the request's buffer is reused by the next call

    return run
