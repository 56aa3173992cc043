"""CSwin UNet: a 3D CSWin Transformer encoder with a CNN decoder, registered as ``cswin_unet3d``.

Li et al., "Cross-Shaped Windows Transformer with Self-supervised Pretraining for Clinically
Significant Prostate Cancer Detection in Bi-parametric MRI" (arXiv 2305.00385) build a U-Net on
the CSWin Transformer (Dong et al., arXiv 2107.00652; code github microsoft/CSWin-Transformer,
``models/cswin.py``). No code of the prostate paper is public, so the 3D form below is ours; each
choice is listed with where it comes from. Attention runs through :mod:`medvit.attention`.

Encoder (default sizes)
-----------------------
- **Stem**: Conv3d 7×7×7 with stride ``stem_stride`` (4, CSWin's; or e.g. (4, 4, 2) for
  anisotropic MRI, the short stride along the slice axis) to ``embed_dim`` channels, LayerNorm, as
  CSWin's ``stage1_conv_embed``. The padding is 3 (CSWin pads 2), so the token grid is exactly
  ``roi / stem_stride`` on every axis.
- **Stages**: four, of ``embed_dim * 2**i`` channels (48/96/192/384), ``depths`` (2, 2, 6, 2)
  blocks, ``num_heads`` (3, 6, 12, 24). Between stages a merge: Conv3d 3×3×3, stride 2, padding 1
  to twice the channels, LayerNorm (CSWin's ``Merge_Block``); an odd grid gives ``ceil(n / 2)``.
  The bottleneck ends in a LayerNorm (CSWin's final ``norm``).
- **Blocks** are pre-norm (LayerNorm, attention, residual; LayerNorm, MLP of ``mlp_ratio`` (4) × C
  with GELU, residual), as CSWin's. Attention is
  :class:`~medvit.attention.CrossStripeAttention`: the heads and channels in three sets, one per
  axis (2D CSWin has two, one per image axis), set ``a`` attending within slabs ``stripe_widths[i]``
  tokens wide along axis ``a`` that span the other two axes, plus LePE (a depthwise 3×3×3 conv on
  V inside each slab, as CSWin convolves V inside each stripe). Stripe widths default to
  (1, 2, 4, "full"): CSWin-T's (1, 2, 7, 7) at 224² give its third stage stripes half its 14×14
  grid and its fourth one window over the 7×7 grid; on a 96³ window with stride 4 (grids
  24/12/6/3) a width of 4 keeps the third stage (6³) a stripe pattern. A width larger than its stage's grid is one slab on that
  axis (full attention along it; :mod:`medvit.attention` pads and masks a width that does not
  divide the grid), so any width >= 1 is served.
- **The last stage** (width ``"full"``, the default) runs full attention with all heads in one set
  and LePE over the whole grid, as CSWin's ``last_stage`` blocks do
  (:class:`~medvit.attention.GridAttention` with :func:`~medvit.attention.full_attention`).
  ``"full"`` is allowed at any stage; a stage of stripes needs ``num_heads`` a multiple of 3.
- **Defaults**: ``embed_dim`` 48, ``depths`` (2, 2, 6, 2). CSWin-T's 64 channels do not split into
  three equal sets; 48 keeps 16 channels a head at the default heads. CSWin-T's depths
  (1, 2, 21, 1) put 21 blocks in the third stage for ImageNet; (2, 2, 6, 2) is Swin-T's, the
  depth D-Former uses here, at less than half of CSWin-T's blocks. ``qkv_bias`` on (CSWin's
  class default). Size: 24.73 M parameters, 143.2 GFLOP per 3×96³ window (2 classes, no deep
  supervision), 117.7 of them in the two full-resolution conv blocks (the image skip and the
  last up-step, as in Swin UNETR's decoder) and 9.5 in the encoder.

Decoder (UNETR / Swin UNETR style, MONAI's blocks)
--------------------------------------------------
- Skips: a residual conv block (``UnetResBlock``, 3×3×3, ``norm_name`` instance norm) on the input
  image at full resolution (``feature_size`` channels, 24) and on each stage's output (its own
  channels); one more on the bottleneck.
- Up: at each level a ``UnetrUpBlock`` (transposed conv ×2, concatenation with the skip, residual
  conv block) from stage ``i + 1``'s channels to stage ``i``'s; the expanded grid is cropped to the
  skip's grid (odd grids). The last up-step upsamples by ``stem_stride`` to the full resolution
  with the image skip, then a 1×1×1 conv to ``out_channels`` (``UnetOutBlock``).

Deep supervision
----------------
With ``deep_supervision=True``, in training mode ``forward`` returns ``(full, half, quarter)``
logits (nnU-Net's order, what :class:`pipelines.volume.train.SegmentationLoss` takes) of spatial size
``S``, ``ceil(S / 2)`` and ``ceil(S / 4)``: the ½ and ¼ heads are transposed convs (kernel =
stride = ``stem_stride``) from the decoder's features at stage 1's and stage 2's grid to
``out_channels``, cropped. In eval mode, or without the option, only the full-resolution logits;
without it the two heads are not built.

Encoder protocol (pretraining)
------------------------------
:attr:`CSwinUNet3D.encoder_prefixes` names the state-dict prefixes of the encoder (stem, stages,
merges, bottleneck norm); :meth:`CSwinUNet3D.encode` returns the normalised bottleneck features.

Weights start from PyTorch's default initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from monai.networks.blocks import UnetOutBlock, UnetResBlock, UnetrUpBlock
from monai.networks.layers import DropPath
from torch import Tensor, nn

from medvit.attention import CrossStripeAttention, GridAttention, full_attention
from medvit.core.errors import ConfigError
from medvit.nets.blocks import Mlp, check_block_options
from medvit.nets.registry import NETS, construct

__all__ = ["CSwinUNet3D", "cswin_unet3d"]

STAGES = 4
"""Encoder stages of the architecture."""

FULL = "full"
"""The stripe width that means full attention over the stage's grid."""


def _crop(x: Tensor, grid: Sequence[int]) -> Tensor:
    """``x`` of shape ``(B, C, D, H, W)`` cut to its first ``grid`` voxels along D, H, W."""
    d, h, w = grid
    return x[:, :, :d, :h, :w]


class FullAttentionLePE(GridAttention):
    """Full multi-head attention on ``(B, D, H, W, dim)`` tokens plus LePE: a depthwise 3×3×3 conv
    on V over the whole grid added to the attention output (CSWin's last-stage attention)."""

    def __init__(self, dim: int, num_heads: int, **kw: Any):
        super().__init__(dim, num_heads, **kw)
        self.lepe = nn.Conv3d(dim, dim, 3, padding=1, groups=dim)

    def _pattern(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        out = full_attention(q, k, v, dropout_p=self.dropout_p)
        b, h, d, hh, w, c = v.shape
        pe = self.lepe(v.permute(0, 1, 5, 2, 3, 4).reshape(b, h * c, d, hh, w))
        return out + pe.reshape(b, h, c, d, hh, w).permute(0, 1, 3, 4, 5, 2)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]  (the pattern is fixed)
        return super().forward(x, self._pattern)


class CSwinBlock(nn.Module):
    """One pre-norm block on ``(B, D, H, W, C)`` tokens: cross-shaped stripe attention of slab width
    ``width`` (an int), or full attention (``width == "full"``), each with LePE; then the MLP."""

    def __init__(self, dim: int, num_heads: int, width: int | str, *, mlp_ratio: float, qkv_bias: bool,
                 drop: float, attn_drop: float, drop_path: float):
        super().__init__()
        self.width = width
        self.norm1 = nn.LayerNorm(dim)
        kw = {"qkv_bias": qkv_bias, "attn_drop": attn_drop, "proj_drop": drop}
        self.attn = (FullAttentionLePE(dim, num_heads, **kw) if width == FULL
                     else CrossStripeAttention(dim, num_heads, int(width), lepe=True, **kw))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ConvNorm(nn.Module):
    """Conv3d then LayerNorm over channels: ``(B, C_in, D, H, W)`` → tokens ``(B, D', H', W', C_out)``."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int | tuple[int, int, int], padding: int):
        super().__init__()
        self.conv = nn.Conv3d(in_dim, out_dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x).permute(0, 2, 3, 4, 1))


def _stride(value: int | Sequence[int]) -> tuple[int, int, int]:
    """``stem_stride`` as three positive ints; ValueError naming it otherwise."""
    t = (value,) * 3 if isinstance(value, int) and not isinstance(value, bool) else tuple(value)
    if len(t) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in t):
        raise ValueError(f"stem_stride needs one or three positive integers (D, H, W), got {value!r}")
    return t  # type: ignore[return-value]


def _widths(value: Sequence[int | str]) -> list[int | str]:
    """``stripe_widths`` as four entries, each an int >= 1 or ``"full"``; ValueError naming it otherwise."""
    w = list(value)
    ok = all((isinstance(v, int) and not isinstance(v, bool) and v >= 1) or v == FULL for v in w)
    if len(w) != STAGES or not ok:
        raise ValueError(f"stripe_widths needs {STAGES} entries (one per stage), each an integer >= 1 or "
                         f"{FULL!r}, got {w}")
    return w


def stage_grids(roi: Sequence[int], stem_stride: int | Sequence[int]) -> list[tuple[int, ...]]:
    """The token grid of each stage for a window ``roi``: ``ceil(roi / stem_stride)``, then halved
    (rounding up) by each merge."""
    g = tuple(math.ceil(r / s) for r, s in zip(roi, _stride(stem_stride)))
    grids = [g]
    for _ in range(STAGES - 1):
        g = tuple(math.ceil(n / 2) for n in g)
        grids.append(g)
    return grids


class CSwinUNet3D(nn.Module):
    """CSwin UNet mapping ``(B, in_channels, D, H, W)`` to logits ``(B, out_channels, D, H, W)``.

    ``D, H, W`` must be multiples of ``stem_stride`` (any such size: odd stage grids are cropped
    in the decoder). In training mode with ``deep_supervision`` the forward pass returns
    ``(full, half, quarter)`` logits, the auxiliary ones of spatial size ``ceil(S / 2)`` and
    ``ceil(S / 4)``; otherwise the full-resolution logits only. See the module docstring for the
    architecture and where each choice comes from.

    Raises:
        ValueError: a size below 1; ``depths``/``num_heads``/``stripe_widths`` not four entries;
            a stripe width neither an integer >= 1 nor ``"full"``; a stripe stage whose head count
            is not a multiple of 3; a head count that does not divide its stage's channels
            (``embed_dim * 2**i``); ``stem_stride`` not one or three positive integers; a dropout
            rate outside [0, 1). The message names the argument.
    """

    encoder_prefixes: tuple[str, ...] = ("stem", "stages", "merges", "bottleneck_norm")
    """State-dict key prefixes of the encoder (what :meth:`encode` runs)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        embed_dim: int = 48,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        stripe_widths: Sequence[int | str] = (1, 2, 4, FULL),
        stem_stride: int | Sequence[int] = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        feature_size: int = 24,
        norm_name: str = "instance",
        deep_supervision: bool = False,
    ):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels), ("embed_dim", embed_dim),
                        ("feature_size", feature_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        stride = _stride(stem_stride)
        widths = _widths(stripe_widths)
        depths, num_heads = list(depths), list(num_heads)
        for name, seq in (("depths", depths), ("num_heads", num_heads)):
            if len(seq) != STAGES or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in seq):
                raise ValueError(f"{name} needs {STAGES} positive integers (one per stage), got {seq}")
        dims = [embed_dim * 2**i for i in range(STAGES)]
        for i, (dim, heads, width) in enumerate(zip(dims, num_heads, widths)):
            if width != FULL and heads % 3:
                raise ValueError(f"num_heads[{i}] = {heads} is not a multiple of 3: stage {i}'s stripe attention "
                                 f"splits its heads into three sets, one per axis")
            if dim % heads:
                raise ValueError(f"num_heads[{i}] = {heads} does not divide the {dim} channels of stage {i}")
        check_block_options(embed_dim, mlp_ratio, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                            drop_path_rate=drop_path_rate)

        self.stem_stride = stride
        self.stripe_widths = widths
        self.deep_supervision = bool(deep_supervision)
        self.out_channels = out_channels

        # encoder: the names here are encoder_prefixes
        self.stem = ConvNorm(in_channels, embed_dim, 7, stride, 3)
        self.stem_drop = nn.Dropout(drop_rate)
        n = sum(depths)
        dpr = [drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        block = {"mlp_ratio": mlp_ratio, "qkv_bias": qkv_bias, "drop": drop_rate, "attn_drop": attn_drop_rate}
        self.stages = nn.ModuleList(
            nn.Sequential(*(CSwinBlock(dims[i], num_heads[i], widths[i], drop_path=dpr[sum(depths[:i]) + j], **block)
                            for j in range(depths[i])))
            for i in range(STAGES)
        )
        self.merges = nn.ModuleList(ConvNorm(dims[i], dims[i + 1], 3, 2, 1) for i in range(STAGES - 1))
        self.bottleneck_norm = nn.LayerNorm(dims[-1])

        # decoder
        res = partial(UnetResBlock, 3, kernel_size=3, stride=1, norm_name=norm_name)
        self.skip_image = res(in_channels, feature_size)
        self.skip_stages = nn.ModuleList(res(dims[i], dims[i]) for i in range(STAGES))  # the last: the bottleneck
        self.ups = nn.ModuleList(
            UnetrUpBlock(3, dims[i + 1], dims[i], kernel_size=3, upsample_kernel_size=2, norm_name=norm_name,
                         res_block=True)
            for i in range(STAGES - 1)
        )
        self.up_full = UnetrUpBlock(3, dims[0], feature_size, kernel_size=3, upsample_kernel_size=stride,
                                    norm_name=norm_name, res_block=True)
        self.head = UnetOutBlock(3, feature_size, out_channels)
        # the 1/2 and 1/4 heads read the decoder at stage 1's and stage 2's grids
        self.aux_heads = (nn.ModuleList(nn.ConvTranspose3d(dims[i], out_channels, stride, stride=stride)
                                        for i in (1, 2)) if self.deep_supervision else None)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 5 or any(s % p for s, p in zip(x.shape[2:], self.stem_stride)):
            raise ValueError(f"input must be (B, C, D, H, W) with D, H, W multiples of {self.stem_stride}, "
                             f"got {tuple(x.shape)}")

    def _encode(self, x: Tensor) -> list[Tensor]:
        """Each stage's output ``(B, C_i, d_i, h_i, w_i)``, the last one normalised."""
        t = self.stem_drop(self.stem(x))
        outs = []
        for i, stage in enumerate(self.stages):
            if i:
                t = self.merges[i - 1](t.permute(0, 4, 1, 2, 3))
            t = stage(t)
            outs.append(self.bottleneck_norm(t) if i == STAGES - 1 else t)
        return [o.permute(0, 4, 1, 2, 3) for o in outs]

    def encode(self, x: Tensor) -> Tensor:
        """The bottleneck features ``(B, 8 * embed_dim, d, h, w)`` for ``x`` of shape
        ``(B, in_channels, D, H, W)``: stage 3's grid, ``ceil(S / stem_stride / 8)`` per axis.

        Raises:
            ValueError: ``D, H, W`` not multiples of ``stem_stride``.
        """
        self._check(x)
        return self._encode(x)[-1]

    @staticmethod
    def _up(block: UnetrUpBlock, x: Tensor, skip: Tensor) -> Tensor:
        """``block`` (transposed conv, concatenation, residual conv) with the expanded grid
        cropped to the skip's."""
        up = _crop(block.transp_conv(x), skip.shape[2:])
        return block.conv_block(torch.cat((up, skip), dim=1))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        """Logits for ``x`` of shape ``(B, in_channels, D, H, W)``; see the class docstring.

        Raises:
            ValueError: ``D, H, W`` not multiples of ``stem_stride``.
        """
        self._check(x)
        size = tuple(x.shape[2:])
        feats = [skip(f) for skip, f in zip(self.skip_stages, self._encode(x))]
        y = feats[-1]
        levels = {}
        for i in reversed(range(STAGES - 1)):
            y = self._up(self.ups[i], y, feats[i])
            levels[i] = y
        full = self.head(self._up(self.up_full, y, self.skip_image(x)))
        if not (self.training and self.aux_heads is not None):
            return full
        aux = []
        for head, level in zip(self.aux_heads, (1, 2)):
            aux.append(_crop(head(levels[level]), [math.ceil(s / 2**level) for s in size]))
        return full, aux[0], aux[1]


@NETS.register("cswin_unet3d")
def cswin_unet3d(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options: Any) -> nn.Module:
    """CSwin UNet mapping ``(B, in_channels, *roi_size)`` to logits ``(B, out_channels, *roi_size)``.

    ``options`` are :class:`CSwinUNet3D`'s keyword arguments (embed_dim, depths, num_heads,
    stripe_widths, stem_stride, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate,
    feature_size, norm_name, deep_supervision). Each roi size must be a multiple of
    ``stem_stride`` on its axis; with instance norm (the default) the bottleneck grid
    (``ceil(roi / stem_stride / 8)``) needs more than one voxel. Raises :class:`ConfigError`
    naming ``model.roi_size`` or ``model.options.<key>``.
    """
    raw = options.get("stem_stride", 4)
    try:
        stride = _stride(raw)
    except (ValueError, TypeError):
        raise ConfigError(f"model.options.stem_stride: expected one or three positive integers (D, H, W), "
                          f"got {raw!r}") from None
    if any(r % s for r, s in zip(roi_size, stride)):
        raise ConfigError(f"model.roi_size: cswin_unet3d needs each size a multiple of stem_stride {list(stride)}, "
                          f"got {list(roi_size)}")
    norm = options.get("norm_name", "instance")
    if isinstance(norm, str) and norm.lower().startswith("instance"):
        bottleneck = stage_grids(roi_size, stride)[-1]
        if math.prod(bottleneck) <= 1:
            raise ConfigError(f"model.roi_size: cswin_unet3d with instance norm needs a bottleneck of more than one "
                              f"voxel; {list(roi_size)} with stem_stride {list(stride)} leaves 1x1x1 "
                              f"(choose a larger window, or norm_name: batch)")
    return construct(
        CSwinUNet3D,
        "cswin_unet3d",
        options,
        fixed={"in_channels": in_channels, "out_channels": out_channels},
        fixed_from={"in_channels": "model.in_channels", "out_channels": "model.out_channels"},
    )
