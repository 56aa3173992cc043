"""3D TransUNet (Chen et al., 2023, arXiv 2310.07781; the 2D TransUNet, arXiv 2102.04306, is the seed
paper): an nnU-Net CNN encoder-decoder with a ViT at its bottleneck, registered as ``transunet3d``.

Our own implementation of the paper's "encoder-only" configuration, checked against the official
code (github Beckschen/3D-TransUNet, ``nn_transunet/networks/transunet3d_model.py``,
``Generic_TransUNet_max_ppbp`` with ``is_max_bottleneck_transformer``, and ``vit_modeling.py``).
The CNN is built from MONAI's DynUNet blocks (:class:`monai.networks.blocks.dynunet_block.UnetBasicBlock`);
the ViT's attention runs through :mod:`medvit.attention` (:class:`GridAttention` with
:func:`full_attention`, SDPA).

Architecture (default sizes)
----------------------------
- **CNN encoder** as in nnU-Net: one stage per entry of ``strides`` (default ``[1, 2, 2, 2, 2, 2]``,
  six stages, five halvings; an entry is one stride for all axes or three, one per axis; the first
  must be 1: the full-resolution stage, whose decoder level gives the logits or mask features). A stage
  is two 3×3×3 convs, each followed by InstanceNorm (affine) and LeakyReLU(0.01); its first conv
  carries the stage's stride (strided-conv downsampling, nnU-Net's ``convolutional_pooling``).
  Stage ``i`` has ``min(base_features * 2**i, max_features)`` channels: 32, 64, 128, 256, 320, 320.
- **ViT at the bottleneck** on 1×1×1 tokens (one token per bottleneck voxel): a 1×1×1 conv to
  ``vit_hidden`` (768), plus a learned position embedding, dropout; ``vit_layers`` (12) pre-norm
  blocks (LayerNorm, multi-head self-attention over all tokens with ``vit_heads`` (12) heads,
  residual; LayerNorm, MLP of ``vit_mlp`` (3072) with GELU, residual); LayerNorm; a 1×1×1 conv back to
  the bottleneck channels. These are ViT-B's sizes, 85 M parameters in the blocks alone. The
  LayerNorms use eps 1e-6 and the dropout rates are the official ``R50-ViT-B_16`` config's
  (``vit_dropout`` 0.1 after the embedding and in the MLP, ``vit_attn_dropout`` 0).
- **CNN decoder** as in nnU-Net: per level a transposed conv (kernel = stride, no bias) to the skip's
  channels, the skip concatenated, a stage of two convs as above; deep-supervision heads are 1×1×1
  convs without bias, as in the official code.

Deep supervision
----------------
With ``deep_supervision=True``, in training mode ``forward`` returns a tuple of logits, full
resolution first, then every coarser decoder level but the coarsest (with the default six stages:
full, ½, ¼, ⅛), the order MONAI's ``DeepSupervisionLoss`` takes. nnU-Net weights the coarsest
decoder output zero; we do not build its head. In eval mode, or without deep supervision, only the
full-resolution logits.

Choices and fixes to the official code (each tested in ``tests/test_nets_transunet3d.py``)
-------------------------------------------------------------------------------------------
- **The position embedding is resized to the token grid at every forward pass** (trilinear over
  D×H×W, ``align_corners=False``), so windows other than the one the net was built for work. It is
  created on the grid of ``roi_size`` (the window the builder is given), so a checkpoint keeps its
  shape. The official 2D and 3D code fix it at build time and fail on any other window size
  (TransUNet issues #35 and #13).
- **LayerScale scales the branches, not the skip.** With ``layer_scale: γ`` each block computes
  ``x + γ₁·attn(norm(x))`` then ``x + γ₂·mlp(norm(x))`` (γ learned per channel, starting at the
  value given; CaiT's form). The official block computes ``attn(norm(h)) + γ·h``: it scales the
  residual (skip) path, with γ = 1e-5 on in every encoder config, which removes nearly all of the
  residual at initialisation. Off by default.
- **Any window size works**: a stride-2 conv gives ``ceil(n / 2)`` voxels, and each decoder level
  crops its upsampled map to its skip's size, so the window need not be a multiple of the total
  stride (nnU-Net needs one). Auxiliary logits have the sizes of the encoder stages. The only
  window limit: instance norm needs more than one bottleneck voxel, checked at config time.
- The position embedding starts from a truncated normal (std 0.02, as ViT); the official one starts
  at zero and is only filled when 2D ImageNet weights are loaded, which are not used here.
- The CNN's convs carry no bias (MONAI's blocks; a bias before instance norm is cancelled by it);
  the official convs have one. The official weights use He init; ours PyTorch's defaults.

Decoder variant (``decoder: mask_transformer``)
-----------------------------------------------
The paper's "decoder" configuration: the CNN decoder runs as above, without its logit heads, and
a Mask2Former-style transformer decoder (:class:`medvit.nets.mask_transformer.MaskTransformerDecoder`:
``num_queries`` (20) learnable queries, width ``query_hidden`` (192), ``query_heads`` (8),
FFN ``query_ffn`` (1536), ``query_layers`` (3) layers of masked cross-attention, self-attention,
FFN) cross-attends the CNN decoder's outputs at ⅛, ¼ and ½ of the window (decoder levels 3, 2, 1,
coarse to fine; with fewer stages the levels there are), its masks dotted with "mask features": a
1×1×1 conv from the finest decoder level (full resolution) to ``query_hidden`` channels, as the
official ``linear_mask_features``. The official code also passes each level through a 1×1×1 conv
and GroupNorm; here the decoder's own per-level 1×1×1 projection serves. In training mode
``forward`` returns the :class:`~medvit.nets.mask_transformer.MaskPrediction` (the training loop
sends it to the Hungarian matching loss, which supervises every layer; so ``deep_supervision``
does not combine with this decoder); in eval mode the semantic scores
``Σ_q softmax(class_q)[:K] · sigmoid(mask_q)`` ``(B, K, D, H, W)``, on the input's grid (the finest
level's: the first stage has stride 1).

Size (default sizes, 1 input channel, 14 classes)
-------------------------------------------------
The ViT blocks alone: 85 054 464 parameters (ViT-B's 85 M). The whole net at a 96³ window (a 3×3×3
token grid): 116 759 136, of which the CNN 31 189 792; in the official BTCV setting
(``configs/btcv_transunet3d.yaml``: a 160×192×64 window, first halving in-plane only, a 5×6×4
grid): 116 822 368 (116 828 640 with the deep-supervision heads), beside the issue's estimate of
about 117 M (the official code has not been run; its conv biases would add about 4 k). The decoder
variant in the BTCV setting: 119 705 007.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.dynunet_block import UnetBasicBlock
from torch import Tensor, nn

from medvit.attention import GridAttention, full_attention
from medvit.core.errors import ConfigError
from medvit.nets.mask_transformer import MaskPrediction, MaskTransformerDecoder, semantic_scores
from medvit.nets.registry import NETS, construct

__all__ = ["TransUNet3D", "transunet3d"]

NORM = ("INSTANCE", {"affine": True})
ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})
DECODERS = ("cnn", "mask_transformer")
MASK_LEVELS = (3, 2, 1)
"""Decoder levels the mask transformer cross-attends, coarse to fine (1/8, 1/4, 1/2 with stride-2 stages)."""


def _strides(strides: Sequence[int | Sequence[int]]) -> list[tuple[int, int, int]]:
    """Each entry as three positive ints; ValueError naming ``strides`` otherwise."""
    out = []
    for s in strides:
        t = (s, s, s) if isinstance(s, int) and not isinstance(s, bool) else tuple(s)
        if len(t) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in t):
            raise ValueError(f"strides needs entries of one positive integer or three (D, H, W), got {list(strides)}")
        out.append(t)
    if len(out) < 2:
        raise ValueError(f"strides needs at least two stages (one downsampling), got {list(strides)}")
    if out[0] != (1, 1, 1):
        raise ValueError(f"strides must start with 1 (the first stage runs at the input's resolution), got {list(strides)}")
    return out  # type: ignore[return-value]


def token_grid(roi_size: Sequence[int], strides: Sequence[int | Sequence[int]]) -> tuple[int, int, int]:
    """The bottleneck grid (= the ViT's token grid) of a window ``roi_size``: ``ceil`` per stride."""
    grid = list(roi_size)
    for s in _strides(strides):
        grid = [math.ceil(n / k) for n, k in zip(grid, s)]
    return tuple(grid)  # type: ignore[return-value]


class LayerScale(nn.Module):
    """Per-channel learned scale ``γ`` of a residual branch (on the last axis)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class ViTBlock(nn.Module):
    """Pre-norm transformer block on ``(B, D, H, W, C)`` tokens, full attention over the grid.

    ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``; ``ls`` is LayerScale when
    ``layer_scale`` is a number, else the identity.
    """

    def __init__(self, dim: int, heads: int, mlp: int, *, dropout: float, attn_dropout: float,
                 layer_scale: float | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = GridAttention(dim, heads, qkv_bias=True, attn_drop=attn_dropout, proj_drop=attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, dim),
                                 nn.Dropout(dropout))
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), partial(full_attention, dropout_p=self.attn.dropout_p)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class BottleneckViT(nn.Module):
    """``(B, C, d, h, w)`` → ``(B, C, d, h, w)``: 1×1×1 conv to ``hidden``, position embedding
    (resized to ``(d, h, w)`` when that is not the grid it was built on), blocks, LayerNorm, 1×1×1
    conv back to ``C``."""

    def __init__(self, channels: int, grid: Sequence[int], *, layers: int, hidden: int, heads: int, mlp: int,
                 dropout: float, attn_dropout: float, layer_scale: float | None):
        super().__init__()
        self.embed = nn.Conv3d(channels, hidden, kernel_size=1)
        self.pos = nn.Parameter(torch.zeros(1, hidden, *grid))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            ViTBlock(hidden, heads, mlp, dropout=dropout, attn_dropout=attn_dropout, layer_scale=layer_scale)
            for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.out = nn.Conv3d(hidden, channels, kernel_size=1)

    def position(self, grid: Sequence[int]) -> Tensor:
        """The position embedding ``(1, hidden, *grid)``, trilinearly resized when ``grid`` differs."""
        if tuple(grid) == tuple(self.pos.shape[2:]):
            return self.pos
        return F.interpolate(self.pos, size=tuple(grid), mode="trilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        t = self.drop(self.embed(x) + self.position(x.shape[2:])).permute(0, 2, 3, 4, 1)
        for blk in self.blocks:
            t = blk(t)
        return self.out(self.norm(t).permute(0, 4, 1, 2, 3))


class TransUNet3D(nn.Module):
    """3D TransUNet (encoder variant) mapping ``(B, in_channels, D, H, W)`` to logits ``(B, out_channels, D, H, W)``.

    Any ``D, H, W`` works as long as the bottleneck keeps more than one voxel (instance norm). In
    training mode with ``deep_supervision`` the forward pass returns a tuple of logits, full
    resolution first, then decoder levels 1 .. n-2 (sizes of encoder stages 1 .. n-2); otherwise the
    full-resolution logits. With ``decoder="mask_transformer"``: a ``MaskPrediction`` in training
    mode, semantic scores ``(B, out_channels, D, H, W)`` in eval mode. See the module docstring for
    the architecture and the official code.

    Args:
        grid: the token grid the position embedding is created on (the builder passes the
            bottleneck grid of ``roi_size``); other grids are served by resizing it.
        strides: one entry per stage (an int, or three for D, H, W), the first 1.
        base_features, max_features: stage ``i`` has ``min(base_features * 2**i, max_features)`` channels.
        vit_layers, vit_hidden, vit_heads, vit_mlp: the ViT's depth, width, heads, MLP width.
        vit_dropout, vit_attn_dropout: dropout after the embedding and in the MLP; on attention.
        layer_scale: initial LayerScale γ on the attention and MLP branches; None builds none.
        decoder: "cnn" (the U-Net decoder's logit heads) or "mask_transformer" (see the module docstring).
        num_queries, query_hidden, query_heads, query_ffn, query_layers, query_dropout: the mask
            transformer's sizes (used with ``decoder="mask_transformer"`` only).

    Raises:
        ValueError: a size below 1, bad ``strides``, ``vit_hidden`` not divisible by ``vit_heads``, a
            dropout outside [0, 1), an unknown ``decoder``, ``deep_supervision`` with the mask
            transformer, or a bad mask-transformer size; the message names the argument.
    """

    encoder_prefixes: tuple[str, ...] = ("encoder.", "vit.")
    """State-dict key prefixes of the encoder (the CNN stages and the bottleneck ViT)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int,
        grid: Sequence[int],
        strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2, 2, 2),
        base_features: int = 32,
        max_features: int = 320,
        vit_layers: int = 12,
        vit_hidden: int = 768,
        vit_heads: int = 12,
        vit_mlp: int = 3072,
        vit_dropout: float = 0.1,
        vit_attn_dropout: float = 0.0,
        layer_scale: float | None = None,
        deep_supervision: bool = False,
        decoder: str = "cnn",
        num_queries: int = 20,
        query_hidden: int = 192,
        query_heads: int = 8,
        query_ffn: int = 1536,
        query_layers: int = 3,
        query_dropout: float = 0.0,
    ):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels),
                        ("base_features", base_features), ("max_features", max_features),
                        ("vit_layers", vit_layers), ("vit_hidden", vit_hidden), ("vit_heads", vit_heads),
                        ("vit_mlp", vit_mlp), ("num_queries", num_queries), ("query_hidden", query_hidden),
                        ("query_heads", query_heads), ("query_ffn", query_ffn), ("query_layers", query_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        strides_ = _strides(strides)
        if len(tuple(grid)) != 3 or min(grid) < 1:
            raise ValueError(f"grid needs three positive sizes, got {list(grid)}")
        if vit_hidden % vit_heads:
            raise ValueError(f"vit_hidden = {vit_hidden} is not divisible by vit_heads = {vit_heads}")
        if query_hidden % query_heads or query_hidden < 6:
            raise ValueError(f"query_hidden = {query_hidden} must be at least 6 and divisible by query_heads = "
                             f"{query_heads}")
        for name, rate in (("vit_dropout", vit_dropout), ("vit_attn_dropout", vit_attn_dropout),
                           ("query_dropout", query_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(map(repr, DECODERS))}, got {decoder!r}")
        if decoder == "mask_transformer" and deep_supervision:
            raise ValueError("deep_supervision is for the 'cnn' heads; the mask transformer's Hungarian loss "
                             "supervises each of its layers")

        self.strides = strides_
        self.deep_supervision = bool(deep_supervision)
        self.decoder_name = decoder
        n = len(strides_)
        chans = [min(base_features * 2**i, max_features) for i in range(n)]
        self.channels = chans

        self.encoder = nn.ModuleList(
            UnetBasicBlock(3, in_channels if i == 0 else chans[i - 1], chans[i], kernel_size=3, stride=strides_[i],
                           norm_name=NORM, act_name=ACT)
            for i in range(n))
        self.vit = BottleneckViT(chans[-1], tuple(grid), layers=vit_layers, hidden=vit_hidden, heads=vit_heads,
                                 mlp=vit_mlp, dropout=vit_dropout, attn_dropout=vit_attn_dropout,
                                 layer_scale=layer_scale)
        # decoder level i (0 .. n-2) runs at encoder stage i's size and width
        self.ups = nn.ModuleList(
            nn.ConvTranspose3d(chans[i + 1], chans[i], kernel_size=strides_[i + 1], stride=strides_[i + 1], bias=False)
            for i in range(n - 1))
        self.decoder = nn.ModuleList(
            UnetBasicBlock(3, 2 * chans[i], chans[i], kernel_size=3, stride=1, norm_name=NORM, act_name=ACT)
            for i in range(n - 1))
        self.head: nn.Module | None = None
        self.aux_heads: nn.ModuleList | None = None
        self.mask_decoder: MaskTransformerDecoder | None = None
        if decoder == "cnn":
            self.head = nn.Conv3d(chans[0], out_channels, kernel_size=1, bias=False)
            # heads of decoder levels 1 .. n-3 (the coarsest level, n-2, gets none), only with deep supervision
            if self.deep_supervision:
                self.aux_heads = nn.ModuleList(nn.Conv3d(chans[i], out_channels, kernel_size=1, bias=False)
                                               for i in range(1, n - 2))
        else:
            # the decoder levels there are of 3, 2, 1 (level 0 makes the mask features)
            self.mask_levels = tuple(i for i in MASK_LEVELS if i <= n - 2) or (0,)
            self.mask_features = nn.Conv3d(chans[0], query_hidden, kernel_size=1)
            self.mask_decoder = MaskTransformerDecoder(
                [chans[i] for i in self.mask_levels], query_hidden, out_channels, num_queries=num_queries,
                hidden=query_hidden, heads=query_heads, ffn=query_ffn, num_layers=query_layers, dropout=query_dropout)

    def _encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        if x.ndim != 5:
            raise ValueError(f"input must be (B, C, D, H, W), got {tuple(x.shape)}")
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x)
            if i < len(self.encoder) - 1:
                skips.append(x)
        return self.vit(x), skips

    def encode(self, x: Tensor) -> Tensor:
        """The bottleneck features ``(B, channels[-1], d, h, w)`` after the ViT (and its 1×1×1 conv
        back) for ``x`` of shape ``(B, in_channels, D, H, W)``; ``d = ceil(D / prod(strides))`` per axis."""
        return self._encode(x)[0]

    def decode(self, x: Tensor, skips: Sequence[Tensor]) -> list[Tensor]:
        """The decoder's level outputs, finest (level 0, the input's size) first."""
        levels: list[Tensor] = [None] * len(skips)  # type: ignore[list-item]
        for i in reversed(range(len(skips))):
            d, h, w = skips[i].shape[2:]
            x = self.ups[i](x)[:, :, :d, :h, :w]
            x = self.decoder[i](torch.cat([x, skips[i]], dim=1))
            levels[i] = x
        return levels

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, ...] | MaskPrediction:
        """Logits for ``x`` of shape ``(B, in_channels, D, H, W)``; see the class docstring."""
        bottleneck, skips = self._encode(x)
        levels = self.decode(bottleneck, skips)
        if self.mask_decoder is not None:
            pred = self.mask_decoder([levels[i] for i in self.mask_levels], self.mask_features(levels[0]))
            if self.training:
                return pred
            return semantic_scores(pred)  # on level 0's grid: the input's
        full = self.head(levels[0])  # type: ignore[misc]  (built with the cnn decoder)
        if not (self.training and self.aux_heads is not None):
            return full
        return (full, *(head(levels[i + 1]) for i, head in enumerate(self.aux_heads)))


@NETS.register("transunet3d")
def transunet3d(in_channels: int, out_channels: int, roi_size: tuple[int, int, int], **options: Any) -> nn.Module:
    """3D TransUNet mapping ``(B, in_channels, *roi_size)`` to logits ``(B, out_channels, *roi_size)``.

    ``options`` are :class:`TransUNet3D`'s keyword arguments but ``grid`` (strides, base_features,
    max_features, vit_layers, vit_hidden, vit_heads, vit_mlp, vit_dropout, vit_attn_dropout,
    layer_scale, deep_supervision, decoder, num_queries, query_hidden, query_heads, query_ffn,
    query_layers, query_dropout). The position embedding is created on the bottleneck
    grid of ``roi_size`` and resized for other windows. Raises :class:`ConfigError` naming
    ``model.roi_size`` (a one-voxel bottleneck, which instance norm refuses) or
    ``model.options.<key>``.
    """
    strides = options.get("strides", (1, 2, 2, 2, 2, 2))
    try:
        grid = token_grid(roi_size, strides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.options.strides: transunet3d: {e}") from None
    if math.prod(grid) <= 1:
        raise ConfigError(f"model.roi_size: transunet3d's strides leave {list(roi_size)} a one-voxel bottleneck, "
                          "which instance norm refuses; use a larger window or fewer strides")
    return construct(
        TransUNet3D,
        "transunet3d",
        options,
        fixed={"in_channels": in_channels, "out_channels": out_channels, "grid": grid},
        fixed_from={"in_channels": "model.in_channels", "out_channels": "model.out_channels",
                    "grid": "model.roi_size"},
    )
