"""D-Former (Wu et al., 2022, arXiv 2201.00462): a U-shaped transformer of alternating local and
dilated global attention, registered as ``dformer``.

Our own implementation of the architecture in the paper and its official model file
(github kkk55596/D-Former, ``model.py``, ``SegNetwork``); where the two differ the code is
followed. Attention runs through :mod:`medvit.attention` (SDPA on grouped tokens).

Architecture (default sizes)
----------------------------
- **Patch embedding**: Conv3d with kernel = stride = ``patch_size`` (2, 4, 4) to ``embed_dim`` (96)
  channels, LayerNorm (``patch_norm``, on by default as in the official backbone class, which has
  the same switch), dropout. The token grid is ``roi / patch_size``.
- **Encoder**, four stages of ``embed_dim * 2**i`` channels (96/192/384/768), ``depths`` (2, 2, 6, 2)
  blocks, ``num_heads`` (3, 6, 12, 24). Each stage starts with the dynamic position encoding (a
  depthwise 3×3×3 conv added to its input; the code has no relative position bias although its
  docstring names one) and, except the last, ends with patch merging (the 2×2×2 neighbours
  concatenated to 8C, LayerNorm, Linear 8C → 2C without bias). The bottleneck ends in a LayerNorm.
- **Blocks** are pre-norm Swin blocks (LayerNorm, attention, residual; LayerNorm, MLP of
  ``mlp_ratio`` × C with GELU, residual). Even blocks run local-scope attention (LS-MSA:
  non-overlapping groups of ``group_size`` (2, 8, 8) consecutive tokens, no shift); odd blocks run
  global-scope attention (GS-MSA: groups of ``group_size`` tokens spaced ``grid / group`` apart, so
  every group spans the grid). ``SegNetwork`` sets the group to (2, 8, 8), overriding the backbone
  class's (2, 7, 7). A block whose grid is smaller than the group on any axis attends over the whole
  grid (full attention), as the code does at the small stages.
- **Decoder**, all transformer (Swin-Unet style): patch expanding (Linear C → 4C without bias,
  rearranged to a 2×2×2 neighbourhood of C/2, LayerNorm); at each level the *input* of the matching
  encoder stage is concatenated as the skip, Linear 2C → C, position encoding, then that stage's
  depth and heads mirrored (6 @ 384, 2 @ 192, 2 @ 96); a LayerNorm at the end.
- **Heads**: expand each token back by ``patch_size`` (Linear C → prod(patch)·C without bias,
  rearranged, LayerNorm) then a 1×1×1 conv without bias to ``out_channels``. The full-resolution
  head reads the decoder's output; the ½ and ¼ heads read the features entering decoder levels 1
  and 2 (the expanded bottleneck for ¼, the expanded level-2 output for ½), as in the code.

Deep supervision
----------------
With ``deep_supervision=True`` the ½ and ¼ heads are built and, in training mode, ``forward``
returns ``(full, half, quarter)`` logits (nnU-Net's order, the order MONAI's
``DeepSupervisionLoss`` takes); in eval mode, or with ``deep_supervision=False``, it returns the
full-resolution logits only. The ½ and ¼ heads are not built when deep supervision is off: no
unused weights to train or store. The official ``SegNetwork`` always builds and runs all three
heads, so our parameter count equals the official one with ``deep_supervision=True``, and the
official count less its two auxiliary heads without it. The official forward returns only
``(full, half)``: its list of up-scaling ops has a single entry, so ``zip`` drops the ¼ logits
it computed; we return all three, as nnU-Net's deep supervision does.

Fixes to the official code (each tested in ``tests/test_nets_dformer.py``)
--------------------------------------------------------------------------
- The number of classes is ``out_channels`` (the official heads hard-code 14).
- Patch merging pads depth as well as height and width (the official code pads only H and W, so an
  odd depth fails), and every decoder level crops the expanded grid back to its skip's grid, so any
  ``roi_size`` that is a multiple of ``patch_size`` works (the official code needs multiples of
  ``patch_size * 8``). The ½ and ¼ logits are cropped to ``ceil(roi / 2)`` and ``ceil(roi / 4)``.
- Padded tokens are masked out of every softmax, global groups included (the official global
  scope masks height/width padding but not depth padding; :mod:`medvit.attention` masks all).
- Global groups keep ``group_size`` tokens on every grid: an axis that does not divide by the
  group is padded to the next multiple of it (and masked). The official code pads each stage to a
  multiple of a fixed interval (8, 4, 2, 1) and derives the group from it, so at a 96³ window its
  stage-1 global groups (on a 24×12×12 grid) hold (2, 12, 12) tokens instead of (2, 8, 8).
- The choice of full attention is made per call from the grid (the official block rewrites its
  own group size and scope on the first small input, and keeps them for every later input), and
  looks at all three axes (the official test looks at height only).
- The window must be a multiple of ``patch_size``, checked at config time (the official patch
  embedding zero-pads the input silently).

Weights start from PyTorch's default initialisation, as in the official code (its truncated-normal
init runs only when loading pretrained 2D weights, which are not used here).

Size and cost (default sizes, 1 input channel, 14 classes)
----------------------------------------------------------
Parameters: 50 557 248 with deep supervision, equal to the official ``SegNetwork(14)``
(44 353 344 without its three heads); 44 649 792 without deep supervision (the official count less
its ½ head, 1 182 720, and ¼ head, 4 724 736). FLOPs, counted by
:class:`torch.utils.flop_counter.FlopCounterMode` on the ``meta`` device with all three heads run
(2 FLOPs per multiply-add; the official code measured the same way): 1×1×64×128×128:
120.84 GFLOP, equal to the official 120 841 863 168; 1×1×96³: 105.43 GFLOP, 1.8 % below the
official 107 340 917 760. At 96³ the stage-1 grid is 24×12×12: the official local scope pads the
normalised tokens to 24×16×16 before the qkv and output projections (1.59 GFLOP more; ours pad q,
k, v inside attention only) and its global groups there grow to (2, 12, 12) tokens (0.32 GFLOP
more; ours keep (2, 8, 8), padded and masked). The ½ and ¼ heads cost 15.38 GFLOP of the 120.84
at 64×128×128, which eval mode does not spend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import Tensor, nn

from medvit.attention import GridAttention, dilated_attention, full_attention, window_attention
from medvit.core.errors import ConfigError
from medvit.core.values import triple
from medvit.nets.blocks import Mlp, check_block_options
from medvit.nets.registry import NETS, construct

__all__ = ["DFormer", "dformer"]

STAGES = 4
"""Encoder stages (and decoder levels) of the architecture; the heads read levels 0, 1 and 2."""


def _crop(x: Tensor, grid: Sequence[int]) -> Tensor:
    """``x`` of shape ``(B, D, H, W, C)`` cut to its first ``grid`` tokens along D, H, W."""
    d, h, w = grid
    return x[:, :d, :h, :w]


class PositionEncoding(nn.Module):
    """Dynamic position encoding: ``x + depthwise_conv3x3x3(x)`` on ``(B, D, H, W, C)`` tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x.permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1)


class DFormerBlock(nn.Module):
    """One pre-norm block on ``(B, D, H, W, C)`` tokens: local (LS-MSA) or global (GS-MSA) scope.

    ``scope`` "local": groups of ``group`` consecutive tokens; "global": groups of ``group`` tokens
    spread over the grid. On a grid smaller than ``group`` on any axis the block attends over the
    whole grid instead.
    """

    def __init__(self, dim: int, num_heads: int, group: tuple[int, int, int], scope: str, *, mlp_ratio: float,
                 qkv_bias: bool, drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        if scope not in ("local", "global"):
            raise ValueError(f"scope must be 'local' or 'global', got {scope!r}")
        self.group = group
        self.scope = scope
        self.norm1 = nn.LayerNorm(dim)
        self.attn = GridAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def pattern(self, grid: Sequence[int]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """The attention pattern this block applies to a token grid of shape ``grid`` (D, H, W)."""
        p = self.attn.dropout_p
        if any(n < g for n, g in zip(grid, self.group)):
            return partial(full_attention, dropout_p=p)
        if self.scope == "local":
            return partial(window_attention, window=self.group, dropout_p=p)
        return partial(dilated_attention, group=self.group, dropout_p=p)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), self.pattern(x.shape[1:4])))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Stage(nn.Module):
    """Position encoding then ``depth`` blocks alternating local (even) and global (odd) scope."""

    def __init__(self, dim: int, depth: int, num_heads: int, group: tuple[int, int, int], drop_path: Sequence[float],
                 **block: Any):
        super().__init__()
        self.pos = PositionEncoding(dim)
        self.blocks = nn.ModuleList(
            DFormerBlock(dim, num_heads, group, "local" if i % 2 == 0 else "global", drop_path=drop_path[i], **block)
            for i in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.pos(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class PatchMerging(nn.Module):
    """``(B, D, H, W, C)`` → ``(B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)``: 2×2×2 neighbours
    concatenated (odd axes zero-padded at the end), LayerNorm(8C), Linear 8C → 2C without bias."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        d2, h2, w2 = (d + 1) // 2, (h + 1) // 2, (w + 1) // 2
        # neighbour order (d, h, w) with w fastest, then channels
        x = x.reshape(b, d2, 2, h2, 2, w2, 2, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, d2, h2, w2, 8 * c)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """``(B, D, H, W, C)`` → ``(B, D·s0, H·s1, W·s2, C_out)``: Linear C → prod(s)·C_out without bias,
    each token's features rearranged into an ``s`` neighbourhood of ``C_out`` channels, LayerNorm."""

    def __init__(self, dim: int, out_dim: int, scale: tuple[int, int, int]):
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim
        self.expand = nn.Linear(dim, math.prod(scale) * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, d, h, w, _ = x.shape
        s0, s1, s2 = self.scale
        x = self.expand(x).reshape(b, d, h, w, s0, s1, s2, self.out_dim)
        x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d * s0, h * s1, w * s2, self.out_dim)
        return self.norm(x)


class Head(nn.Module):
    """Tokens ``(B, D, H, W, C)`` → logits ``(B, out, D·p0, H·p1, W·p2)``: expand by the patch size,
    then a 1×1×1 conv without bias."""

    def __init__(self, dim: int, out_channels: int, patch: tuple[int, int, int]):
        super().__init__()
        self.expand = PatchExpand(dim, dim, patch)
        self.conv = nn.Conv3d(dim, out_channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.expand(x).permute(0, 4, 1, 2, 3))


class DFormer(nn.Module):
    """D-Former mapping ``(B, in_channels, D, H, W)`` to logits ``(B, out_channels, D, H, W)``.

    ``D, H, W`` must be multiples of ``patch_size`` (any such size works: odd token grids are
    padded and cropped inside the net). In training mode with ``deep_supervision`` the forward
    pass returns ``(full, half, quarter)`` logits, the auxiliary ones of spatial size
    ``ceil(S / 2)`` and ``ceil(S / 4)``; otherwise the full-resolution logits only. See the module
    docstring for the architecture and how it relates to the official code.

    Raises:
        ValueError: a size below 1, ``depths``/``num_heads`` not four entries, ``patch_size``/
            ``group_size`` not three, a head count that does not divide its stage's channels
            (``embed_dim * 2**i``), a dropout rate outside [0, 1); the message names the
            argument.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        patch_size: Sequence[int] = (2, 4, 4),
        group_size: Sequence[int] = (2, 8, 8),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        deep_supervision: bool = False,
        patch_norm: bool = True,
    ):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("embed_dim", embed_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        patch = triple(patch_size, "patch_size", scalar=False, axes="D, H, W")
        group = triple(group_size, "group_size", scalar=False, axes="D, H, W")
        depths, num_heads = list(depths), list(num_heads)
        for name, seq in (("depths", depths), ("num_heads", num_heads)):
            if len(seq) != STAGES or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in seq):
                raise ValueError(f"{name} needs {STAGES} positive integers (one per stage), got {seq}")
        dims = [embed_dim * 2**i for i in range(STAGES)]
        for i, (dim, heads) in enumerate(zip(dims, num_heads)):
            if dim % heads:
                raise ValueError(f"num_heads[{i}] = {heads} does not divide the {dim} channels of stage {i}")
        check_block_options(embed_dim, mlp_ratio, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                            drop_path_rate=drop_path_rate)

        self.patch_size = patch
        self.group_size = group
        self.deep_supervision = bool(deep_supervision)

        self.patch_embed = nn.Conv3d(in_channels, embed_dim, kernel_size=patch, stride=patch)
        self.embed_norm = nn.LayerNorm(embed_dim) if patch_norm else nn.Identity()
        self.embed_drop = nn.Dropout(drop_rate)

        # stochastic depth grows linearly over the encoder; decoder level i reuses stage i's rates
        n = sum(depths)
        dpr = [drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        rates = [dpr[sum(depths[:i]):sum(depths[: i + 1])] for i in range(STAGES)]
        block = {"mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias, "drop": drop_rate, "attn_drop": attn_drop_rate}

        self.encoder = nn.ModuleList(Stage(dims[i], depths[i], num_heads[i], group, rates[i], **block)
                                     for i in range(STAGES))
        self.merges = nn.ModuleList(PatchMerging(dims[i]) for i in range(STAGES - 1))
        self.bottleneck_norm = nn.LayerNorm(dims[-1])

        # decoder level i (0..STAGES-2) runs at stage i's grid and width
        self.expands = nn.ModuleList(PatchExpand(dims[i + 1], dims[i], (2, 2, 2)) for i in range(STAGES - 1))
        self.fuse = nn.ModuleList(nn.Linear(2 * dims[i], dims[i]) for i in range(STAGES - 1))
        self.decoder = nn.ModuleList(Stage(dims[i], depths[i], num_heads[i], group, rates[i], **block)
                                     for i in range(STAGES - 1))
        self.decoder_norm = nn.LayerNorm(embed_dim)

        self.head = Head(dims[0], out_channels, patch)
        # the 1/2 and 1/4 heads, only with deep supervision
        self.aux_heads = (nn.ModuleList(Head(dims[i], out_channels, patch) for i in (1, 2))
                          if self.deep_supervision else None)

    encoder_prefixes: tuple[str, ...] = ("patch_embed.", "embed_norm.", "encoder.", "merges.", "bottleneck_norm.")
    """State-dict key prefixes of the encoder (patch embedding, stages, merges, bottleneck norm): what
    ``medvit pretrain`` trains and ``model.pretrained`` loads."""

    def _encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Bottleneck tokens ``(B, d, h, w, C)`` and the skips entering each stage, for ``x`` ``(B, C_in, D, H, W)``."""
        if x.ndim != 5 or any(s % p for s, p in zip(x.shape[2:], self.patch_size)):
            raise ValueError(f"input must be (B, C, D, H, W) with D, H, W multiples of {self.patch_size}, "
                             f"got {tuple(x.shape)}")
        x = self.patch_embed(x).permute(0, 2, 3, 4, 1)
        x = self.embed_drop(self.embed_norm(x))
        skips = []
        for i, stage in enumerate(self.encoder):
            skips.append(x)
            x = stage(x)
            if i < STAGES - 1:
                x = self.merges[i](x)
        return self.bottleneck_norm(x), skips

    def encode(self, x: Tensor) -> Tensor:
        """The encoder's bottleneck features ``(B, 8·embed_dim, d, h, w)`` for ``x`` ``(B, in_channels, D, H, W)``,
        ``d = ceil(D / (8·patch_size[0]))`` and so on (odd grids are padded at each merge).

        Raises:
            ValueError: ``D, H, W`` not multiples of ``patch_size``.
        """
        return self._encode(x)[0].permute(0, 4, 1, 2, 3)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Logits for ``x`` of shape ``(B, in_channels, D, H, W)``; see the class docstring.

        Raises:
            ValueError: ``D, H, W`` not multiples of ``patch_size``.
        """
        size = tuple(x.shape[2:])
        x, skips = self._encode(x)

        entering = {}  # features entering decoder levels 1 and 2, read by the auxiliary heads
        for i in reversed(range(STAGES - 1)):
            x = _crop(self.expands[i](x), skips[i].shape[1:4])
            entering[i] = x
            x = self.fuse[i](torch.cat([x, skips[i]], dim=-1))
            x = self.decoder[i](x)
        full = self.head(self.decoder_norm(x))

        if not (self.training and self.aux_heads is not None):
            return full
        aux = []
        for head, level in zip(self.aux_heads, (1, 2)):
            y = head(entering[level])
            d, h, w = (math.ceil(s / 2**level) for s in size)
            aux.append(y[:, :, :d, :h, :w])
        return full, aux[0], aux[1]


@NETS.register("dformer")
def dformer(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options: Any) -> nn.Module:
    """D-Former mapping ``(B, in_channels, *roi_size)`` to logits ``(B, out_channels, *roi_size)``.

    ``options`` are :class:`DFormer`'s keyword arguments (embed_dim, depths, num_heads, patch_size,
    group_size, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, deep_supervision,
    patch_norm).
    Each roi size must be a multiple of ``patch_size`` on its axis (any multiple: odd token grids
    are padded inside the net). Raises :class:`ConfigError` naming ``model.roi_size`` or
    ``model.options.<key>``.
    """
    patch = options.get("patch_size", (2, 4, 4))
    if (not isinstance(patch, (list, tuple)) or len(patch) != 3
            or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in patch)):
        raise ConfigError(f"model.options.patch_size: expected three positive integers (D, H, W), got {patch!r}")
    if any(r % p for r, p in zip(roi_size, patch)):
        raise ConfigError(f"model.roi_size: dformer needs each size a multiple of patch_size {list(patch)}, "
                          f"got {list(roi_size)}")
    return construct(
        DFormer,
        "dformer",
        options,
        fixed={"in_channels": in_channels, "out_channels": out_channels},
        fixed_from={"in_channels": "model.in_channels", "out_channels": "model.out_channels"},
    )
