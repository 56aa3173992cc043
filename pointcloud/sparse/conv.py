"""Sparse 3D convolution in plain torch: CPU or GPU, autograd, deterministic.

A convolution is a set of (input row, output row) pairs per kernel offset, the *kernel
map*, built once by hashing voxel coordinates: each site's ``(batch, z, y, x)`` becomes
one int64 key, keys are sorted once, and a neighbour's row is found with
``torch.searchsorted``. The features are then computed per offset as
gather -> GEMM -> scatter-add (``index_add_``).

For a fixed kernel offset the map from output site to input site
(``in = out * stride - padding + k * dilation``) is one-to-one, so within one offset no
output row receives two contributions: the scatter has no collisions and the offsets are
summed in a fixed order. Results are therefore the same run to run whatever the
thread count (tested: bit-identical between 1 and 2 threads), unlike spconv
2.3.8 on CPU (see ``spconv_compat``).

Layouts match spconv, so weights load either way: the weight is
``(out_channels, kz, ky, kx, in_channels)``, sites are ``(batch, z, y, x)``, and the
kernel offset ``k`` enumerates ``(kz, ky, kx)`` in C order. Outputs equal
``torch.nn.functional.conv3d`` (cross-correlation) on the densified grid, read at the
output sites; the inverse conv equals ``conv_transpose3d`` read at the encoder's sites.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from medvit.core.values import triple
from pointcloud.structure import SparseVoxels

__all__ = [
    "DepthwiseSubMConv3d",
    "KernelMap",
    "SparseConv3d",
    "SparseInverseConv3d",
    "SubMConv3d",
    "apply_depthwise_map",
    "apply_kernel_map",
    "strided_map",
    "submanifold_map",
]

Triple = tuple[int, int, int]


@dataclass(eq=False)
class KernelMap:
    """Which input row feeds which output row through which kernel offset.

    ``in_idx``/``out_idx`` ``(P,)`` int64 hold the pairs of all offsets back to back;
    offset ``k`` owns ``[bounds[k], bounds[k + 1])``. For submanifold maps the centre
    offset (``center``) is the identity and stores no pairs.
    """

    subm: bool
    kernel_size: Triple
    stride: Triple
    padding: Triple
    dilation: Triple
    in_idx: torch.Tensor
    out_idx: torch.Tensor
    bounds: list[int]
    center: int | None
    in_indices: torch.Tensor
    in_shape: Triple
    out_indices: torch.Tensor
    out_shape: Triple
    in_meta: tuple  # (voxel_size, origin) of the input sites, restored by the inverse conv

    @property
    def n_in(self) -> int:
        return self.in_indices.shape[0]

    @property
    def n_out(self) -> int:
        return self.out_indices.shape[0]

    def config(self) -> tuple:
        return (self.subm, self.kernel_size, self.stride, self.padding, self.dilation)


def _keys(batch: torch.Tensor, zyx: torch.Tensor, shape: Triple) -> torch.Tensor:
    """One int64 key per site: ``((b * nz + z) * ny + y) * nx + x``."""
    nz, ny, nx = shape
    return ((batch * nz + zyx[:, 0]) * ny + zyx[:, 1]) * nx + zyx[:, 2]


def _offsets(kernel_size: Triple, device: torch.device) -> torch.Tensor:
    """``(K, 3)`` kernel positions ``(kz, ky, kx)`` in C order, the weight's order."""
    axes = [torch.arange(k, device=device) for k in kernel_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def _subm_config(kernel_size: Triple, dilation: Triple) -> tuple:
    # (subm, kernel, stride, padding, dilation), as KernelMap.config()
    return (True, kernel_size, (1, 1, 1), tuple(d * (k // 2) for d, k in zip(dilation, kernel_size)), dilation)


def submanifold_map(
    indices: torch.Tensor, spatial_shape: Sequence[int], kernel_size: Triple, dilation: Triple = (1, 1, 1)
) -> KernelMap:
    """Kernel map whose output sites are the input sites (odd kernels, centred).

    Args:
        indices: ``(M, 4)`` int ``(batch, z, y, x)``, unique rows.
        spatial_shape: ``(nz, ny, nx)``.
    """
    if any(k % 2 == 0 for k in kernel_size):
        raise ValueError(f"submanifold convolution needs odd kernel sizes, got {kernel_size}")
    shape = tuple(int(s) for s in spatial_shape)
    idx = indices.long()
    device = idx.device
    # keys on the grid grown by the kernel's reach on every side: a neighbour's key is
    # then key + delta with no bounds check (one off the grid lands in the margin,
    # where no site is), and queries made from sorted keys stay sorted, which keeps
    # searchsorted walking memory forward
    reach = [d * (k // 2) for d, k in zip(dilation, kernel_size)]
    grown = tuple(n + 2 * r for n, r in zip(shape, reach))
    sorted_keys, perm = torch.sort(_keys(idx[:, 0], idx[:, 1:] + torch.tensor(reach, device=device), grown))
    half = torch.tensor([k // 2 for k in kernel_size], device=device)
    deltas = ((_offsets(kernel_size, device) - half) * torch.tensor(dilation, device=device)).tolist()
    kvol = len(deltas)
    center = kvol // 2
    last = len(sorted_keys) - 1
    pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * kvol
    # offsets d and -d (k and K-1-k) have mirrored pairs: search only the first half
    for k in range(center if len(sorted_keys) else 0):
        dz, dy, dx = deltas[k]
        nkey = sorted_keys + ((dz * grown[1] + dy) * grown[2] + dx)
        pos = torch.searchsorted(sorted_keys, nkey).clamp_max(last)
        rows = (sorted_keys[pos] == nkey).nonzero().squeeze(1)
        src, dst = perm[pos[rows]], perm[rows]
        pairs[k] = (src, dst)
        pairs[kvol - 1 - k] = (dst, src)
    empty = idx.new_zeros(0)
    ins = [p[0] if p is not None else empty for p in pairs]
    outs = [p[1] if p is not None else empty for p in pairs]
    bounds = [0] + torch.cumsum(torch.tensor([len(t) for t in ins]), 0).tolist()
    return KernelMap(
        *_subm_config(kernel_size, dilation),
        in_idx=torch.cat(ins), out_idx=torch.cat(outs), bounds=bounds, center=center,
        in_indices=indices, in_shape=shape, out_indices=indices, out_shape=shape, in_meta=(None, None),
    )


def conv_output_shape(
    spatial_shape: Sequence[int], kernel_size: Triple, stride: Triple, padding: Triple, dilation: Triple
) -> Triple:
    """Grid shape after a regular conv, as ``torch.nn.functional.conv3d`` computes it."""
    out = tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(spatial_shape, kernel_size, stride, padding, dilation)
    )
    if any(o < 1 for o in out):
        raise ValueError(
            f"grid {tuple(spatial_shape)} is too small for kernel {kernel_size} stride {stride} padding {padding}"
        )
    return out  # type: ignore[return-value]


def strided_map(
    indices: torch.Tensor,
    spatial_shape: Sequence[int],
    kernel_size: Triple,
    stride: Triple,
    padding: Triple,
    dilation: Triple = (1, 1, 1),
) -> KernelMap:
    """Kernel map of a regular conv: an output site is active when its receptive field
    holds an active input site. Output sites come sorted by ``(batch, z, y, x)``."""
    shape = tuple(int(s) for s in spatial_shape)
    out_shape = conv_output_shape(shape, kernel_size, stride, padding, dilation)
    idx = indices.long()
    b, zyx = idx[:, 0], idx[:, 1:]
    device = idx.device
    s = torch.tensor(stride, device=device)
    lim = torch.tensor(out_shape, device=device)
    shifted = zyx + torch.tensor(padding, device=device)
    ks = _offsets(kernel_size, device) * torch.tensor(dilation, device=device)
    rows_k, keys_k = [], []
    for k in range(ks.shape[0]):
        num = shifted - ks[k]  # = out * stride for the output fed through offset k
        o = torch.div(num, s, rounding_mode="floor")
        rows = ((num >= 0) & (o * s == num) & (o < lim)).all(1).nonzero().squeeze(1)
        rows_k.append(rows)
        keys_k.append(_keys(b[rows], o[rows], out_shape))
    ukeys, out_idx = torch.unique(torch.cat(keys_k), sorted=True, return_inverse=True)
    nz, ny, nx = out_shape
    out_indices = torch.stack(
        [ukeys // (nz * ny * nx), (ukeys // (ny * nx)) % nz, (ukeys // nx) % ny, ukeys % nx], 1
    ).to(torch.int32)
    bounds = [0] + torch.cumsum(torch.tensor([len(r) for r in rows_k]), 0).tolist()
    return KernelMap(
        subm=False, kernel_size=kernel_size, stride=stride, padding=padding, dilation=dilation,
        in_idx=torch.cat(rows_k), out_idx=out_idx, bounds=bounds, center=None,
        in_indices=indices, in_shape=shape, out_indices=out_indices, out_shape=out_shape, in_meta=(None, None),
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # sum half-precision products in float32 (no fp16 accumulators)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _out_dtype(out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # under autocast keep the float32 sums; otherwise return the inputs' dtype
    if torch.is_autocast_enabled(out.device.type):
        return out
    return out.to(torch.result_type(features, weight))


def apply_kernel_map(
    features: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, transpose: bool = False
) -> torch.Tensor:
    """Sparse conv features through a kernel map.

    Args:
        features: ``(n_in, C_in)`` (``(n_out, C_in)`` of the map when ``transpose``).
        weight: ``(C_out, kz, ky, kx, C_in)``.
        transpose: run the map backwards (the inverse conv): output rows are the
            map's input sites.

    Returns:
        ``(n_out, C_out)`` (``(n_in, C_out)`` when ``transpose``).
    """
    c_out, c_in = weight.shape[0], weight.shape[-1]
    w = weight.reshape(c_out, -1, c_in).permute(1, 2, 0)  # (K, C_in, C_out)
    src_all, dst_all = (kmap.out_idx, kmap.in_idx) if transpose else (kmap.in_idx, kmap.out_idx)
    n_out = kmap.n_in if transpose else kmap.n_out
    if kmap.center is not None:
        out = features @ w[kmap.center]
        acc = _acc_dtype(out.dtype)
        out = out.to(acc)
    else:
        out = None
    for k in range(w.shape[0]):
        lo, hi = kmap.bounds[k], kmap.bounds[k + 1]
        if hi == lo:
            continue
        prod = features.index_select(0, src_all[lo:hi]) @ w[k]
        if out is None:
            out = prod.new_zeros(n_out, c_out, dtype=_acc_dtype(prod.dtype))
        out.index_add_(0, dst_all[lo:hi], prod.to(out.dtype))
    if out is None:  # no pairs at all (no input sites)
        return features.new_zeros(n_out, c_out)
    return _out_dtype(out, features, weight)


def apply_depthwise_map(features: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Depthwise conv through a submanifold map: ``(M, C)`` features, ``(K, C)`` weight.

    Each offset multiplies the gathered rows elementwise by its per-channel weight:
    ``O(K * M * C)`` work, no ``C x C`` matrices.
    """
    if kmap.center is None:
        raise ValueError("depthwise convolution runs on submanifold maps")
    out = features * weight[kmap.center]
    out = out.to(_acc_dtype(out.dtype))
    for k in range(weight.shape[0]):
        lo, hi = kmap.bounds[k], kmap.bounds[k + 1]
        if hi == lo:
            continue
        prod = features.index_select(0, kmap.in_idx[lo:hi]) * weight[k]
        out.index_add_(0, kmap.out_idx[lo:hi], prod.to(out.dtype))
    return _out_dtype(out, features, weight)


def same_sites(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two ``(M, 4)`` site lists are the same (the same tensor, or equal rows)."""
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


def _cached_map(x: SparseVoxels, key: str | None, config: tuple, build) -> KernelMap:
    """The map stored under ``key`` in ``x.cache["maps"]``, built (and stored) if absent."""
    maps = x.cache.setdefault("maps", {})
    if key is not None and key in maps:
        kmap = maps[key]
        if kmap.config() != config:
            raise ValueError(f"indice_key {key!r} holds a map for {kmap.config()}, this layer needs {config}")
        if not same_sites(kmap.in_indices, x.indices):
            raise ValueError(
                f"indice_key {key!r} was built for other sites ({kmap.n_in}) than this input's ({x.num_sites})"
            )
        return kmap
    kmap = build()
    if key is not None:
        maps[key] = kmap
    return kmap


class _SparseConvBase(nn.Module):
    """Weight ``(C_out, kz, ky, kx, C_in)`` and optional bias ``(C_out,)``, as spconv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        indice_key: str | None = None,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be >= 1, got in={in_channels} out={out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = triple(kernel_size, "kernel_size", minimum=1, axes="z, y, x")
        self.stride = triple(stride, "stride", minimum=1, axes="z, y, x")
        self.padding = triple(padding, "padding", minimum=0, axes="z, y, x")
        self.dilation = triple(dilation, "dilation", minimum=1, axes="z, y, x")
        self.indice_key = indice_key
        self.weight = nn.Parameter(torch.empty(out_channels, *self.kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch's Conv3d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        bound = 1.0 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def _check(self, x: SparseVoxels) -> None:
        if x.features.shape[1] != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} channels, got {x.features.shape[1]}")

    def _add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        s += f", padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}"
        return s + (f", indice_key={self.indice_key!r}" if self.indice_key else "")


class SubMConv3d(_SparseConvBase):
    """Submanifold sparse conv: output sites are the input sites.

    ``forward(x)``: ``x.features`` ``(M, C_in)`` -> ``(M, C_out)`` on the same indices.
    The kernel (odd sizes) is centred; ``padding`` is implied and ignored, as in spconv.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        indice_key: str | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias, indice_key)
        if self.stride != (1, 1, 1):
            raise ValueError(f"submanifold convolution has stride 1, got {self.stride}")
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"submanifold convolution needs odd kernel sizes, got {self.kernel_size}")

    def kernel_map(self, x: SparseVoxels) -> KernelMap:
        config = _subm_config(self.kernel_size, self.dilation)
        return _cached_map(x, self.indice_key, config,
                           lambda: submanifold_map(x.indices, x.spatial_shape, self.kernel_size, self.dilation))

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        self._check(x)
        out = apply_kernel_map(x.features, self.weight, self.kernel_map(x))
        return x.replace_feature(self._add_bias(out))


class SparseConv3d(_SparseConvBase):
    """Regular (strided) sparse conv; an output site is active when its receptive field
    holds an active input site. With ``indice_key`` the map is kept for the
    :class:`SparseInverseConv3d` that brings features back to these input sites.

    ``forward(x)``: ``(M, C_in)`` -> ``(M', C_out)`` on the downsampled sites, grid
    ``(n + 2p - d(k-1) - 1) // s + 1`` per axis.
    """

    def kernel_map(self, x: SparseVoxels) -> KernelMap:
        config = (False, self.kernel_size, self.stride, self.padding, self.dilation)

        def build() -> KernelMap:
            kmap = strided_map(x.indices, x.spatial_shape, self.kernel_size, self.stride, self.padding, self.dilation)
            kmap.in_meta = (x.voxel_size, x.origin)
            return kmap

        return _cached_map(x, self.indice_key, config, build)

    def output_meta(self, x: SparseVoxels) -> tuple:
        """``(voxel_size, origin)`` of the output grid in metres, ``(x, y, z)``."""
        if x.voxel_size is None or x.origin is None:
            return None, None
        # output voxel 0 starts at input site -padding and spans `stride` input voxels
        sxyz, pxyz = self.stride[::-1], self.padding[::-1]
        voxel_size = tuple(v * s for v, s in zip(x.voxel_size, sxyz))
        origin = tuple(o - p * v for o, p, v in zip(x.origin, pxyz, x.voxel_size))
        return voxel_size, origin

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        self._check(x)
        kmap = self.kernel_map(x)
        out = self._add_bias(apply_kernel_map(x.features, self.weight, kmap))
        voxel_size, origin = self.output_meta(x)
        return SparseVoxels(
            features=out, indices=kmap.out_indices, spatial_shape=kmap.out_shape, batch_size=x.batch_size,
            voxel_size=voxel_size, origin=origin, dropped=x.dropped, cache=x.cache,
        )


class SparseInverseConv3d(_SparseConvBase):
    """Inverse of the :class:`SparseConv3d` that used ``indice_key``: its pairs run
    backwards, so the output sites are that conv's input sites (the decoder's way back
    to an encoder level). Equals ``conv_transpose3d`` read at those sites.

    ``forward(x)``: ``(M', C_in)`` on the coarse sites -> ``(M, C_out)`` on the fine ones.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], indice_key: str,
                 bias: bool = True) -> None:
        if not indice_key:
            raise ValueError("SparseInverseConv3d needs the indice_key of the SparseConv3d it inverts")
        super().__init__(in_channels, out_channels, kernel_size, bias=bias, indice_key=indice_key)

    def kernel_map(self, x: SparseVoxels) -> KernelMap:
        kmap = x.cache.get("maps", {}).get(self.indice_key)
        if kmap is None or kmap.subm:
            raise ValueError(f"no strided conv map under indice_key {self.indice_key!r}; run that SparseConv3d first")
        if kmap.kernel_size != self.kernel_size:
            raise ValueError(
                f"indice_key {self.indice_key!r} has kernel {kmap.kernel_size}, this layer {self.kernel_size}"
            )
        if not same_sites(kmap.out_indices, x.indices):
            raise ValueError(
                f"indice_key {self.indice_key!r} produced other sites ({kmap.n_out}) than this input's ({x.num_sites})"
            )
        return kmap

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        self._check(x)
        kmap = self.kernel_map(x)
        out = self._add_bias(apply_kernel_map(x.features, self.weight, kmap, transpose=True))
        voxel_size, origin = kmap.in_meta
        return SparseVoxels(
            features=out, indices=kmap.in_indices, spatial_shape=kmap.in_shape, batch_size=x.batch_size,
            voxel_size=voxel_size, origin=origin, dropped=x.dropped, cache=x.cache,
        )


class DepthwiseSubMConv3d(nn.Module):
    """Depthwise submanifold conv (groups == channels): weight ``(K, C)``, K = kz*ky*kx.

    Each channel is convolved with its own kernel: per offset gather, scale by the
    per-channel weight, scatter-add; ``O(K * M * C)`` work. Shares submanifold maps
    (``indice_key``) with :class:`SubMConv3d` of the same kernel size.

    ``forward(x)``: ``(M, C)`` -> ``(M, C)`` on the same sites.
    """

    def __init__(self, channels: int, kernel_size: int | Sequence[int] = 3, dilation: int | Sequence[int] = 1,
                 bias: bool = True, indice_key: str | None = None) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.channels = channels
        self.kernel_size = triple(kernel_size, "kernel_size", minimum=1, axes="z, y, x")
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"submanifold convolution needs odd kernel sizes, got {self.kernel_size}")
        self.dilation = triple(dilation, "dilation", minimum=1, axes="z, y, x")
        self.indice_key = indice_key
        self.weight = nn.Parameter(torch.empty(math.prod(self.kernel_size), channels))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(math.prod(self.kernel_size))  # fan_in of one channel
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        if x.features.shape[1] != self.channels:
            raise ValueError(f"DepthwiseSubMConv3d expects {self.channels} channels, got {x.features.shape[1]}")
        config = _subm_config(self.kernel_size, self.dilation)
        kmap = _cached_map(x, self.indice_key, config,
                           lambda: submanifold_map(x.indices, x.spatial_shape, self.kernel_size, self.dilation))
        out = apply_depthwise_map(x.features, self.weight, kmap)
        return x.replace_feature(out if self.bias is None else out + self.bias)

    def extra_repr(self) -> str:
        s = f"{self.channels}, kernel_size={self.kernel_size}, dilation={self.dilation}, bias={self.bias is not None}"
        return s + (f", indice_key={self.indice_key!r}" if self.indice_key else "")
