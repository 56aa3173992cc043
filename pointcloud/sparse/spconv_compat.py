"""The one place that decides, per operation, whether spconv or our torch convs run.

Nets build their sparse convs through :func:`subm_conv`, :func:`sparse_conv`,
:func:`inverse_conv` and :func:`depthwise_conv`, never through spconv. The modules they
return hold our weight layout (the same as spconv's), so checkpoints do not depend on
the backend; each ``forward`` asks :func:`sparse_backend` which one runs.

Measured on spconv 2.3.8 (CPU wheel, torch 2.13), the reasons for the rules below:

- ``SubMConv3d`` and regular ``SparseConv3d`` forward on CPU race when torch uses more
  than one thread: wrong outputs (errors up to ~0.6 against dense ``conv3d``) that
  change run to run; with one thread they are correct;
- backward on CPU fails (``Torch not compiled with CUDA enabled``: it asks for the
  current CUDA stream);
- eval-mode layers with a bias fail on CPU (``cpu don't support act and bias``); we
  never hand spconv the bias, we add it afterwards, on every device;
- ``groups > 1`` is refused (``don't support groups for now``): depthwise is always ours.

Rules: on CUDA, spconv when it imports; everywhere else ours. On CPU spconv runs only
when asked for explicitly (``POINTCLOUD_SPARSE_BACKEND=spconv`` or
``use_backend("spconv")``) *and* torch uses one thread *and* no gradient is needed;
otherwise ours, with the reason logged once on ``logging.getLogger("pointcloud.sparse")``.
Nothing in spconv is patched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from medvit.core.errors import ConfigError
from pointcloud.sparse.conv import DepthwiseSubMConv3d, SparseConv3d, SparseInverseConv3d, SubMConv3d, same_sites
from pointcloud.sparse.voxelize import from_spconv, to_spconv
from pointcloud.structure import SparseVoxels

__all__ = [
    "ENV_VAR",
    "AutoSparseConv3d",
    "AutoSparseInverseConv3d",
    "AutoSubMConv3d",
    "depthwise_conv",
    "inverse_conv",
    "sparse_backend",
    "sparse_conv",
    "spconv_available",
    "subm_conv",
    "use_backend",
]

logger = logging.getLogger("pointcloud.sparse")

ENV_VAR = "POINTCLOUD_SPARSE_BACKEND"
_PREFERENCES = ("auto", "ours", "spconv")
_OPS = ("subm", "conv", "inverse", "depthwise")
_preference: str | None = None
_spconv_ok: bool | None = None
_logged: set[tuple] = set()


def _log_once(key: tuple, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.info(message)


def spconv_available() -> bool:
    """Whether ``spconv.pytorch`` imports (checked once, on first need)."""
    global _spconv_ok
    if _spconv_ok is None:
        try:
            import spconv.pytorch  # noqa: F401
        except (ImportError, OSError) as err:  # not installed, or its compiled libraries do not load
            _spconv_ok = False
            _log_once(("import",), f"spconv unavailable ({err}); all sparse convs use the torch implementation")
        else:
            _spconv_ok = True
    return _spconv_ok


def _preference_now() -> str:
    if _preference is not None:
        return _preference
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _PREFERENCES:
        raise ConfigError(f"environment variable {ENV_VAR}={value!r}: must be one of {', '.join(_PREFERENCES)}")
    return value


@contextlib.contextmanager
def use_backend(preference: str) -> Iterator[None]:
    """Within the block, prefer ``"auto"``, ``"ours"`` or ``"spconv"`` (overrides the
    environment variable). ``"spconv"`` on CPU still falls back where spconv is wrong."""
    global _preference
    if preference not in _PREFERENCES:
        raise ValueError(f"backend preference must be one of {_PREFERENCES}, got {preference!r}")
    previous, _preference = _preference, preference
    try:
        yield
    finally:
        _preference = previous


def sparse_backend(device: torch.device | str, op: str = "subm", needs_grad: bool = False) -> str:
    """``"spconv"`` or ``"ours"`` for one operation.

    Args:
        device: where the features live.
        op: ``"subm"``, ``"conv"`` (strided), ``"inverse"`` or ``"depthwise"``.
        needs_grad: whether autograd will differentiate through this call.
    """
    if op not in _OPS:
        raise ValueError(f"op must be one of {_OPS}, got {op!r}")
    device = torch.device(device)
    pref = _preference_now()
    if op == "depthwise":
        choice, why = "ours", "spconv refuses groups > 1"
    elif pref == "ours":
        choice, why = "ours", "asked for"
    elif device.type == "cuda":
        if spconv_available():
            choice, why = "spconv", "CUDA"
        else:
            choice, why = "ours", "spconv not importable"
    elif device.type == "cpu" and pref == "spconv":
        if torch.get_num_threads() > 1:
            choice, why = "ours", f"spconv's CPU convs race with {torch.get_num_threads()} torch threads"
        elif needs_grad:
            choice, why = "ours", "spconv's CPU backward needs CUDA"
        elif not spconv_available():
            choice, why = "ours", "spconv not importable"
        else:
            choice, why = "spconv", "asked for, one thread, no gradient"
    else:
        choice, why = "ours", f"{device.type} default"
    _log_once((device.type, op, choice, why), f"sparse {op} conv on {device.type}: {choice} ({why})")
    return choice


def _needs_grad(module: nn.Module, x: SparseVoxels) -> bool:
    return torch.is_grad_enabled() and (x.features.requires_grad or any(p.requires_grad for p in module.parameters()))


def _spconv_module(module: _AutoMixin) -> nn.Module:
    """spconv's layer with this module's geometry, made once and kept out of the module
    tree (no parameters of its own: ours are passed in, so state dicts stay ours)."""
    impl = module.__dict__.get("_spconv_impl")
    if impl is None:
        import spconv.pytorch as spconv

        if isinstance(module, SubMConv3d):
            impl = spconv.SubMConv3d(module.in_channels, module.out_channels, module.kernel_size,
                                     dilation=module.dilation, bias=False, indice_key=module.indice_key)
        elif isinstance(module, SparseInverseConv3d):
            impl = spconv.SparseInverseConv3d(module.in_channels, module.out_channels, module.kernel_size,
                                              indice_key=module.indice_key, bias=False)
        else:
            impl = spconv.SparseConv3d(module.in_channels, module.out_channels, module.kernel_size,
                                       stride=module.stride, padding=module.padding, dilation=module.dilation,
                                       bias=False, indice_key=module.indice_key)
        impl.weight = None
        module.__dict__["_spconv_impl"] = impl
    return impl


def _spconv_forward(module: _AutoMixin, x: SparseVoxels) -> SparseVoxels:
    # _conv_forward takes the weight and bias as arguments (spconv's own forward passes
    # self.weight); the bias goes on afterwards, which avoids the CPU "act and bias" path
    out = _spconv_module(module)._conv_forward(module.training, to_spconv(x), module.weight, None)
    y = from_spconv(out, like=x)
    if module.bias is not None:
        y = y.replace_feature(y.features + module.bias)
    return y


class _AutoMixin:
    """Dispatch ``forward`` to spconv or to our implementation (the parent class)."""

    _op = "subm"

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        self._check(x)
        if sparse_backend(x.features.device, self._op, _needs_grad(self, x)) == "spconv":
            return self._forward_spconv(x)
        return super().forward(x)

    def _forward_spconv(self, x: SparseVoxels) -> SparseVoxels:
        return _spconv_forward(self, x)


class AutoSubMConv3d(_AutoMixin, SubMConv3d):
    """:class:`~pointcloud.sparse.conv.SubMConv3d` that runs on spconv where that is right."""

    _op = "subm"


class AutoSparseConv3d(_AutoMixin, SparseConv3d):
    """:class:`~pointcloud.sparse.conv.SparseConv3d` that runs on spconv where that is right."""

    _op = "conv"

    def _forward_spconv(self, x: SparseVoxels) -> SparseVoxels:
        y = _spconv_forward(self, x)
        voxel_size, origin = self.output_meta(x)
        if self.indice_key is not None:  # for the inverse conv, whose spconv data keeps no metadata
            x.cache.setdefault("spconv_meta", {})[self.indice_key] = (x.voxel_size, x.origin)
        y.voxel_size, y.origin = voxel_size, origin
        return y


class AutoSparseInverseConv3d(_AutoMixin, SparseInverseConv3d):
    """:class:`~pointcloud.sparse.conv.SparseInverseConv3d` that runs on whichever backend
    built its ``indice_key``'s map: neither can invert the other's pairs."""

    _op = "inverse"

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        self._check(x)
        kmap = x.cache.get("maps", {}).get(self.indice_key)
        ours = kmap is not None and same_sites(kmap.out_indices, x.indices)
        theirs = self.indice_key in (x.cache.get("spconv") or {})
        if theirs and not ours:
            _log_once(("inverse", "spconv"), "sparse inverse conv: spconv (spconv built its indice_key's map)")
            y = _spconv_forward(self, x)
            y.voxel_size, y.origin = x.cache.get("spconv_meta", {}).get(self.indice_key, (None, None))
            return y
        _log_once(("inverse", "ours"), "sparse inverse conv: ours (the map was built by ours)")
        return SparseInverseConv3d.forward(self, x)  # ours, or its error naming the missing key


def subm_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    bias: bool = True,
    indice_key: str | None = None,
) -> AutoSubMConv3d:
    """Submanifold conv ``(M, C_in) -> (M, C_out)``; arguments as spconv's ``SubMConv3d``."""
    return AutoSubMConv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, indice_key)


def sparse_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    bias: bool = True,
    indice_key: str | None = None,
) -> AutoSparseConv3d:
    """Regular (strided) sparse conv; arguments as spconv's ``SparseConv3d``."""
    return AutoSparseConv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, indice_key)


def inverse_conv(
    in_channels: int, out_channels: int, kernel_size: int | Sequence[int], indice_key: str, bias: bool = True
) -> AutoSparseInverseConv3d:
    """Inverse of the strided conv that used ``indice_key``; as spconv's ``SparseInverseConv3d``."""
    return AutoSparseInverseConv3d(in_channels, out_channels, kernel_size, indice_key, bias)


def depthwise_conv(channels: int, kernel_size: int | Sequence[int] = 3, dilation: int | Sequence[int] = 1,
                   bias: bool = True, indice_key: str | None = None) -> DepthwiseSubMConv3d:
    """Depthwise submanifold conv ``(M, C) -> (M, C)``; always ours (spconv has no groups)."""
    sparse_backend("cpu", "depthwise")  # logs the decision once
    return DepthwiseSubMConv3d(channels, kernel_size, dilation, bias, indice_key)
