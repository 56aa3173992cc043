"""ConDaFormer (Duan et al., NeurIPS 2023): disassembled window attention with local
structure enhancement, in a sparse-voxel U-Net.

Disassembled window attention (:class:`DisassembledWindowAttention`): a cubic window of
``S`` voxels is taken apart into three orthogonal planes, ``S x S`` and ``thickness``
voxels thin along the third axis. The heads are split into three equal groups; group 0
attends within xy-plane windows ``(S, S, T)``, group 1 within xz windows ``(S, T, S)``,
group 2 within yz windows ``(T, S, S)`` (extents in voxels along ``(x, y, z)`` of the level
the block runs at); the three outputs are concatenated. A voxel's window is
``(g + shift) // extent`` per axis, within its own cloud; on odd blocks ``shift`` is half
the extent (``extent // 2``, Swin's shifted windows), on even blocks zero. Windows hold at
most ``S * S * T`` voxels. They are batched by size: windows whose voxel count has the same next
power of two form a group, padded to its largest window, with the padded keys masked in
``torch.nn.functional.scaled_dot_product_attention`` (see :class:`PlaneWindows`).

Relative position encoding: the paper's contextual RPE (from Stratified Transformer), on
the voxel offsets inside a window. With ``r = p_i - p_j`` the offset of query ``i`` and key
``j`` (integers, per axis), learned tables ``T_q, T_k, T_v`` of shape
``(3 axes, 2L - 1, heads / 3, head_dim)`` (``L = max(S, T)``) give::

    logit_ij = s q_i.k_j + s q_i.sum_a T_q[a, r_a] + k_j.sum_a T_k[a, r_a]     (s = head_dim^-1/2)
    out_i    = sum_j softmax_j(logit_ij) (v_j + sum_a T_v[a, r_a])

The tables are shared by the three plane groups, as in the authors' code; they index by
whole voxels of the level (the authors' code quantises continuous point coordinates to a
quarter voxel). The query/key
terms enter SDPA as its float ``attn_mask``; the value term needs the attention weights
summed per key offset, which SDPA returns when each value is extended by one-hot codes of
the key's in-window position (``2S + T`` extra channels); it is exact.

Local structure enhancement (:class:`LocalStructureEnhancement`), before the qkv projection
and after the attention: two branches concatenated to ``C`` channels, a pointwise one
``BN(Linear(x))`` (``C - C//2``, the shortcut that keeps the input's own signal) and a local
one ``BN(Linear(GELU(BN(DWConv3(x)))))`` (``C//2``), as the authors' code builds it. The
depthwise conv is the project's true depthwise sparse conv (weight ``K^3 x C``,
``O(K^3 N C)`` work), not a full kernel masked to its diagonal.

Block (:class:`ConDaFormerBlock`, pre-norm)::

    x = x + DropPath(Proj(LSE_post(DaWin(QKV(LSE_pre(LN(x)))))))
    x = x + DropPath(MLP(LN(x)))

Net (:class:`ConDaFormer`): the :class:`~pointcloud.nets.sparse_unet.SparseUNetBase` frame
(voxelise with no range, mean-reduced ``[feat, offset]`` features, conv stem, ``k2 s2``
strided sparse conv downsampling, inverse-conv decoder with skip concat and residual conv
blocks, devoxelise by ``inverse``, linear head) with ``depths[l]`` ConDaFormer blocks at
encoder level ``l``. Level 0 (full resolution) runs one residual conv block when
``depths[0] == 0``, like the paper's conv point embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pointcloud.nets.layers import DropPath, feed_forward, per_level
from pointcloud.nets.registry import POINT_NETS
from pointcloud.nets.sparse_unet import ResidualBlock, SparseUNetBase
from pointcloud.sparse import depthwise_conv
from pointcloud.structure import SparseVoxels

__all__ = [
    "PLANES",
    "ConDaFormer",
    "ConDaFormerBlock",
    "ConDaFormerStage",
    "DisassembledWindowAttention",
    "LocalStructureEnhancement",
    "PlaneWindows",
    "WindowGroup",
    "disassembled_windows",
    "plane_extent",
    "plane_windows",
]

PLANES = ("xy", "xz", "yz")  # head group g attends within PLANES[g]
_THIN_AXIS = {"xy": 2, "xz": 1, "yz": 0}  # the axis (x=0, y=1, z=2) a plane window is thin along


def plane_extent(plane: str, window_size: int, thickness: int = 1) -> tuple[int, int, int]:
    """Window extent ``(x, y, z)`` in voxels: ``window_size`` in the plane, ``thickness`` across."""
    if plane not in _THIN_AXIS:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    ext = [window_size] * 3
    ext[_THIN_AXIS[plane]] = thickness
    return tuple(ext)  # type: ignore[return-value]


@dataclass(eq=False)
class WindowGroup:
    """Windows of similar size, each padded to the group's largest (``n`` slots).

    Attributes:
        index: ``(G, n)`` int64 voxel row in each slot; ``M`` (a padding row) when empty.
        valid: ``(G, n)`` bool, the slots that hold a voxel.
        pos: ``(G, n, 3)`` int64 position ``(x, y, z)`` of each slot's voxel inside its window
            (``0 <= pos < extent``; 0 in empty slots).
        sites: ``(K,)`` int64 the group's voxel rows, and ``slots`` ``(K,)`` their slots in
            ``index.reshape(-1)``: the scatter back needs no boolean mask (and so no host sync).
    """

    index: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor
    sites: torch.Tensor
    slots: torch.Tensor


MIN_GROUP_SIZE = 2
"""Windows of up to this many voxels share one group: the fastest smallest group on the CPU
(``bench/condaformer_groups.py``, ``docs/benchmarks.md``); every further group costs a few more
kernel launches on a GPU."""


@dataclass(eq=False)
class PlaneWindows:
    """The voxels of a sparse grid grouped by their window in one plane orientation.

    Windows are grouped by size, the next power of two of their voxel count (at least
    :data:`MIN_GROUP_SIZE`), and each group is padded to its largest window. Padding every
    window to the largest one (SST-style) would cost the attention ``G * n_max^2``: on a
    nuScenes sweep most windows hold a few voxels and the largest dozens.

    Attributes:
        plane: ``"xy"``, ``"xz"`` or ``"yz"``.
        extent: window size ``(x, y, z)`` in voxels.
        shift: offset ``(x, y, z)`` added to the voxel coordinates before cutting windows.
        window: ``(M,)`` int64 window row of each voxel, in ``[0, num_windows)``.
        groups: the windows by size class, smallest first; every window is in exactly one.
    """

    plane: str
    extent: tuple[int, int, int]
    shift: tuple[int, int, int]
    window: torch.Tensor
    groups: list[WindowGroup]

    @property
    def num_windows(self) -> int:
        return sum(g.index.shape[0] for g in self.groups)

    @property
    def max_size(self) -> int:
        return max((g.index.shape[1] for g in self.groups), default=0)

    @property
    def padded_slots(self) -> int:
        """Slots the attention runs over (voxels plus padding)."""
        return sum(g.index.numel() for g in self.groups)


def plane_windows(
    indices: torch.Tensor, plane: str, window_size: int, thickness: int = 1, shift: bool = False
) -> PlaneWindows:
    """Group sparse sites ``(M, 4)`` ``(batch, z, y, x)`` into ``plane`` windows.

    A site's window is ``(g + shift) // extent`` per axis with ``g = (x, y, z)`` and
    ``shift = extent // 2`` when ``shift`` else 0; windows never span two clouds.
    Windows are numbered by ``(batch, wz, wy, wx)``; inside a window, sites keep their row order.
    """
    extent = plane_extent(plane, window_size, thickness)
    offs = tuple(e // 2 for e in extent) if shift else (0, 0, 0)
    device = indices.device
    idx = indices.long()
    m = idx.shape[0]
    xyz = idx[:, [3, 2, 1]] + torch.tensor(offs, device=device)
    size = torch.tensor(extent, device=device)
    w = torch.div(xyz, size, rounding_mode="floor")
    pos = xyz - w * size
    nw = (w.amax(0) + 1).tolist() if m else [1, 1, 1]
    key = ((idx[:, 0] * nw[2] + w[:, 2]) * nw[1] + w[:, 1]) * nw[0] + w[:, 0]
    _, window, counts = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    order = torch.argsort(window, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(window)
    rank[order] = torch.arange(m, device=device) - starts[window[order]]
    # size class: the first of MIN_GROUP_SIZE, 2x, 4x, ... that holds the window
    caps = MIN_GROUP_SIZE << torch.arange((extent[0] * extent[1] * extent[2]).bit_length(), device=device)
    k = len(caps)
    cls = torch.searchsorted(caps, counts)
    site_cls = cls[window]
    per_cls = torch.bincount(cls, minlength=k)
    largest = torch.zeros(k, dtype=counts.dtype, device=device).scatter_reduce(0, cls, counts, "amax")
    # one host sync for the whole layout (a GPU stalls at each): windows, voxels and largest window per class
    n_windows, n_sites, n_slots = torch.stack([per_cls, torch.bincount(site_cls, minlength=k), largest]).tolist()
    # windows and voxels sorted by class (stably, so both keep their order inside a class)
    w_order = torch.argsort(cls, stable=True)
    s_order = torch.argsort(site_cls, stable=True)
    local = torch.empty_like(counts)  # a window's row within its group
    local[w_order] = torch.arange(len(counts), device=device) - (torch.cumsum(per_cls, 0) - per_cls)[cls[w_order]]
    groups = []
    s0 = 0
    for c in range(k):
        if n_windows[c] == 0:
            continue
        g, n = n_windows[c], n_slots[c]
        sites = s_order[s0 : s0 + n_sites[c]]
        s0 += n_sites[c]
        slots = local[window[sites]] * n + rank[sites]
        index = torch.full((g * n,), m, dtype=torch.long, device=device)
        index[slots] = sites
        slot_pos = torch.zeros(g * n, 3, dtype=torch.long, device=device)
        slot_pos[slots] = pos[sites]
        index = index.view(g, n)
        groups.append(WindowGroup(index=index, valid=index < m, pos=slot_pos.view(g, n, 3), sites=sites, slots=slots))
    return PlaneWindows(plane=plane, extent=extent, shift=offs, window=window, groups=groups)


def disassembled_windows(
    indices: torch.Tensor, window_size: int, thickness: int = 1, shift: bool = False
) -> tuple[PlaneWindows, PlaneWindows, PlaneWindows]:
    """The xy, xz and yz plane windows of the sites ``(M, 4)`` (one per head group)."""
    return tuple(plane_windows(indices, p, window_size, thickness, shift) for p in PLANES)  # type: ignore[return-value]


class DisassembledWindowAttention(nn.Module):
    """Multi-head attention with the heads split over the xy, xz and yz plane windows.

    Args:
        num_heads: H, a multiple of 3 (H/3 heads per plane).
        head_dim: d.
        window_size: S, the in-plane window side in voxels.
        thickness: T, the window's extent across the plane in voxels.
        rpe: use the contextual relative position encoding (see the module docstring).

    ``forward(q, k, v, windows)``: ``(M, H, d)`` each and the three :class:`PlaneWindows`
    (xy, xz, yz) of the sites -> ``(M, H, d)``.
    """

    def __init__(self, num_heads: int, head_dim: int, window_size: int, thickness: int = 1, rpe: bool = True) -> None:
        super().__init__()
        if num_heads < 3 or num_heads % 3:
            raise ValueError(f"num_heads must be a positive multiple of 3 (one group per plane), got {num_heads}")
        if window_size < 1 or thickness < 1 or head_dim < 1:
            raise ValueError(f"window_size, thickness and head_dim must be >= 1, "
                             f"got {window_size}, {thickness}, {head_dim}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.window_size, self.thickness = window_size, thickness
        self.reach = max(window_size, thickness) - 1  # largest |offset| inside a window
        self.rpe = rpe
        if rpe:
            shape = (3, 2 * self.reach + 1, num_heads // 3, head_dim)
            self.table_q = nn.Parameter(torch.empty(shape))
            self.table_k = nn.Parameter(torch.empty(shape))
            self.table_v = nn.Parameter(torch.empty(shape))
            for t in (self.table_q, self.table_k, self.table_v):
                nn.init.trunc_normal_(t, std=0.02)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Sequence[PlaneWindows]
    ) -> torch.Tensor:
        if q.ndim != 3 or q.shape[1:] != (self.num_heads, self.head_dim):
            raise ValueError(f"q must be (M, {self.num_heads}, {self.head_dim}), got {tuple(q.shape)}")
        if [w.plane for w in windows] != list(PLANES):
            raise ValueError(f"windows must be the {PLANES} plane windows in that order")
        hg = self.num_heads // 3
        outs = [self._plane(q[:, g * hg:(g + 1) * hg], k[:, g * hg:(g + 1) * hg], v[:, g * hg:(g + 1) * hg], win)
                for g, win in enumerate(windows)]
        return torch.cat(outs, 1)

    def _plane(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win: PlaneWindows) -> torch.Tensor:
        """Attention of one head group ``(M, h, d)`` within ``win``'s windows, a size group at a time."""
        m, h, d = q.shape
        if m == 0:
            return q.new_zeros(m, h, d)
        q1, k1, v1 = (torch.cat([t, t.new_zeros(1, h, d)]) for t in (q, k, v))  # zero row M for empty slots
        out = None
        for grp in win.groups:
            res = self._attend(q1, k1, v1, grp, win.extent)  # (G, h, n, d)
            if out is None:
                out = res.new_empty(m, h, d)  # every voxel is in exactly one window
            out[grp.sites] = res.permute(0, 2, 1, 3).reshape(-1, h, d)[grp.slots]
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grp: WindowGroup,
                extent: tuple[int, int, int]) -> torch.Tensor:
        """``(M + 1, h, d)`` (last row zero) -> ``(G, h, n, d)`` for the group's windows."""
        h, d = q.shape[1:]
        g, n = grp.index.shape
        qg, kg, vg = (t[grp.index].permute(0, 2, 1, 3) for t in (q, k, v))  # (G, h, n, d)
        keep = grp.valid[:, None, None, :]  # (G, 1, 1, n): real keys
        if not self.rpe:
            return F.scaled_dot_product_attention(qg, kg, vg, attn_mask=keep)
        span = 2 * self.reach + 1
        pos = grp.pos
        rel = pos[:, :, None, :] - pos[:, None, :, :] + self.reach  # (G, n_q, n_k, 3) table rows
        # per-token dot products with every table row, then picked per pair: O(n * span) + O(n^2)
        tq = torch.einsum("ghnd,alhd->ghnal", qg, self.table_q.to(qg.dtype)).reshape(g, h, n, 3 * span)
        tk = torch.einsum("ghnd,alhd->ghnal", kg, self.table_k.to(kg.dtype)).reshape(g, h, n, 3 * span)
        bias = qg.new_zeros(g, h, n, n)
        for a in range(3):
            col = (rel[..., a] + a * span)[:, None]  # (G, 1, n_q, n_k)
            bias = bias + torch.gather(tq, 3, col.expand(g, h, n, n)) * d**-0.5
            bias = bias + torch.gather(tk, 3, col.transpose(2, 3).expand(g, h, n, n)).transpose(2, 3)
        bias = bias.masked_fill(~keep, float("-inf"))
        # one-hot codes of each key's in-window position ride along with the values, so
        # SDPA also returns the attention mass per key position, which the value table needs
        codes = torch.cat([F.one_hot(pos[..., a], e) for a, e in enumerate(extent)], -1).to(vg.dtype)
        ext = torch.cat([vg, codes[:, None].expand(g, h, n, codes.shape[-1])], -1)
        res = F.scaled_dot_product_attention(qg, kg, ext, attn_mask=bias)
        out, mass = res[..., :d], res[..., d:]
        start = 0
        for a, e in enumerate(extent):
            # row of T_v[a] for query position p and key position s is p - s + reach
            rows = pos[..., a, None] - torch.arange(e, device=pos.device) + self.reach  # (G, n, e)
            tv = self.table_v[a].to(out.dtype)[rows]  # (G, n, e, h, d)
            out = out + torch.einsum("ghne,gnehd->ghnd", mass[..., start:start + e], tv)
            start += e
        return out


class LocalStructureEnhancement(nn.Module):
    """LSE: ``concat[BN(Linear(x)), BN(Linear(GELU(BN(DWConv(x)))))]``, ``(M, C) -> (M, C)``.

    The pointwise branch gives ``C - C//2`` channels, the depthwise-conv branch ``C//2``.
    ``indice_key`` shares the level's submanifold map with its other convs.
    """

    def __init__(self, channels: int, kernel_size: int = 3, indice_key: str | None = None) -> None:
        super().__init__()
        half = channels // 2
        self.point = nn.Sequential(nn.Linear(channels, channels - half, bias=False), nn.BatchNorm1d(channels - half))
        self.dwconv = depthwise_conv(channels, kernel_size, bias=False, indice_key=indice_key)
        self.local = nn.Sequential(
            nn.BatchNorm1d(channels), nn.GELU(), nn.Linear(channels, half, bias=False), nn.BatchNorm1d(half)
        )

    def forward(self, x: SparseVoxels) -> torch.Tensor:
        return torch.cat([self.point(x.features), self.local(self.dwconv(x).features)], 1)


class ConDaFormerBlock(nn.Module):
    """One ConDaFormer block (see the module docstring); ``(M, C) -> (M, C)`` on the same sites.

    Args:
        channels: C, divisible by ``num_heads``.
        num_heads: a multiple of 3.
        window_size, thickness: plane window extent in voxels of this level.
        shift: use half-window-shifted windows (odd blocks).
        mlp_ratio: MLP hidden width / C.
        drop_path: stochastic depth rate (per voxel row, as timm/Pointcept).
        lse_kernel: depthwise conv kernel of the LSE.
        indice_key: submanifold map key of this level for the LSE convs.
        rpe: contextual relative position encoding on or off.
    """

    def __init__(self, channels: int, num_heads: int, window_size: int, thickness: int = 1, shift: bool = False,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, lse_kernel: int = 3,
                 indice_key: str | None = None, rpe: bool = True) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} is not divisible by num_heads {num_heads}")
        self.channels, self.num_heads = channels, num_heads
        self.window_size, self.thickness, self.shift = window_size, thickness, shift
        self.norm1 = nn.LayerNorm(channels, eps=1e-6)
        self.lse_pre = LocalStructureEnhancement(channels, lse_kernel, indice_key)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.attn = DisassembledWindowAttention(num_heads, channels // num_heads, window_size, thickness, rpe)
        self.lse_post = LocalStructureEnhancement(channels, lse_kernel, indice_key)
        self.proj = nn.Linear(channels, channels)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = feed_forward(channels, mlp_ratio)

    def windows(self, x: SparseVoxels) -> tuple[PlaneWindows, PlaneWindows, PlaneWindows]:
        return disassembled_windows(x.indices, self.window_size, self.thickness, self.shift)

    def forward(self, x: SparseVoxels, windows: Sequence[PlaneWindows] | None = None) -> SparseVoxels:
        """``windows``: this block's plane windows of ``x``'s sites, when a stage already has them."""
        if windows is None:
            windows = self.windows(x)
        m, c = x.features.shape
        h = self.lse_pre(x.replace_feature(self.norm1(x.features)))
        q, k, v = self.qkv(h).view(m, 3, self.num_heads, c // self.num_heads).unbind(1)
        a = self.attn(q, k, v, windows).reshape(m, c)
        a = self.proj(self.lse_post(x.replace_feature(a)))
        f = x.features + self.drop_path(a)
        f = f + self.drop_path(self.mlp(self.norm2(f)))
        return x.replace_feature(f)


class ConDaFormerStage(nn.Module):
    """``depth`` blocks, shifted windows on odd ones; the two window layouts are built once."""

    def __init__(self, blocks: Sequence[ConDaFormerBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: SparseVoxels) -> SparseVoxels:
        layouts: dict[bool, tuple] = {}
        for block in self.blocks:
            if block.shift not in layouts:
                layouts[block.shift] = block.windows(x)
            x = block(x, layouts[block.shift])
        return x


@POINT_NETS.register("condaformer")
class ConDaFormer(SparseUNetBase):
    """ConDaFormer segmentation net: :class:`Point` ``(N, C)`` -> logits ``(N, out_channels)``.

    Args:
        in_channels: point feature width C.
        out_channels: K.
        voxel_size: voxel edge in metres, one number or ``(x, y, z)``.
        channels: width per level, finest first (level ``l`` has voxels ``2^l`` times larger).
        depths: ConDaFormer blocks per level (an int for all). A level with blocks needs
            ``channels[l] / head_dim`` heads, a multiple of 3.
        head_dim: width of one attention head.
        window_size: in-plane window side S, in voxels of each level.
        thickness: plane window extent across the plane, in voxels.
        mlp_ratio: MLP hidden width / C.
        drop_path: largest stochastic depth rate (linear over the blocks, finest first).
        lse_kernel: depthwise conv kernel of the local structure enhancement.
        rpe: contextual relative position encoding on or off.
        decoder_layers: residual conv blocks after each decoder concat.
        point_mlp: width of the per-point branch before the head (0: none).
        point_offsets: append each point's offset from its voxel centre to its features.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        voxel_size: float | Sequence[float],
        channels: Sequence[int] = (16, 24, 48, 96),
        depths: int | Sequence[int] = (0, 2, 2, 2),
        head_dim: int = 8,
        window_size: int = 6,
        thickness: int = 1,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        lse_kernel: int = 3,
        rpe: bool = True,
        decoder_layers: int | Sequence[int] = 1,
        point_mlp: int = 16,
        point_offsets: bool = True,
    ) -> None:
        n = len(channels)
        depths = per_level(depths, n, "depths")
        if head_dim < 1 or window_size < 1 or thickness < 1:
            raise ValueError(f"head_dim, window_size and thickness must be >= 1, "
                             f"got {head_dim}, {window_size}, {thickness}")
        if lse_kernel < 1 or lse_kernel % 2 == 0:
            raise ValueError(f"lse_kernel must be odd and >= 1, got {lse_kernel}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        for level, (c, d) in enumerate(zip(channels, depths)):
            if d and (c % head_dim or (c // head_dim) % 3):
                raise ValueError(f"channels[{level}] = {c} with head_dim {head_dim}: need a multiple of "
                                 f"{3 * head_dim} (heads split in three plane groups)")
        # read by make_stage, which SparseUNetBase.__init__ calls
        self._attn_options = dict(head_dim=head_dim, window_size=window_size, thickness=thickness,
                                  mlp_ratio=mlp_ratio, lse_kernel=lse_kernel, rpe=rpe)
        total = max(sum(depths) - 1, 1)
        self._drop_rates = [drop_path * i / total for i in range(sum(depths))]
        self._depths = depths
        super().__init__(in_channels, out_channels, voxel_size, channels=channels, layers=depths,
                         decoder_layers=decoder_layers, point_mlp=point_mlp, point_offsets=point_offsets)
        self.depths = depths

    def make_stage(self, level: int, channels: int) -> nn.Module:
        depth = self._depths[level]
        if depth == 0:
            return ResidualBlock(channels, channels, f"subm{level}") if level == 0 else nn.Identity()
        o = self._attn_options
        key = f"subm{level}" if o["lse_kernel"] == 3 else f"subm{level}_k{o['lse_kernel']}"
        first = sum(self._depths[:level])
        return ConDaFormerStage([
            ConDaFormerBlock(channels, channels // o["head_dim"], o["window_size"], o["thickness"], shift=i % 2 == 1,
                             mlp_ratio=o["mlp_ratio"], drop_path=self._drop_rates[first + i],
                             lse_kernel=o["lse_kernel"], indice_key=key, rpe=o["rpe"])
            for i in range(depth)
        ])
