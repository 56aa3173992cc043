"""A Mask2Former-style transformer decoder in 3D (3D TransUNet's "decoder" variant).

Learnable queries (a feature and a positional embedding each) are refined by ``num_layers`` layers;
each layer is masked cross-attention to one feature level, then self-attention among the queries,
then an FFN. The levels are given coarse to fine and cycled over the layers (layer ``i`` attends
level ``i % len(levels)``), as in Mask2Former and the official 3D TransUNet code
(``nn_transunet/networks/mask2former_modeling/transformer_decoder/mask2former_transformer_decoder3d.py``).

Choices, each checked against that code and Mask2Former:

- **Post-norm** (LayerNorm after each residual sum), Mask2Former's and 3D TransUNet's default
  (``pre_norm: False``); a final LayerNorm before the prediction heads.
- **Masked attention**: the mask of layer ``i`` comes from the prediction made before it (after
  the query init for layer 0): its mask logits resized by trilinear interpolation to the level
  layer ``i`` attends, a voxel masked where ``sigmoid < 0.5``; a query whose whole row is masked
  attends everywhere instead. The mask is detached (no gradient through it).
- **Keys** carry a 3D sine position encoding (per axis, D then H then W, a third of the channels:
  sin/cos of positions normalised to ``(0, 2π]``, temperature 10000, DETR's frequency pairing;
  channels left over by ``hidden`` not divisible by 6 are zero. The official 3D code spaces the
  frequencies by ``3·(j // 3)``, a slip from DETR's ``2·(j // 2)`` that repeats sin/cos pairs'
  frequencies; we keep DETR's) plus a learned per-level embedding added to the projected
  features; queries carry their positional embedding in both attentions, values carry none.
- **Heads**: class ``Linear(hidden, K + 1)`` (the last is "no object"); mask embedding by a
  3-layer MLP, dotted with the ``mask_features`` map, so masks come at its resolution.
- **Predictions** after the query init and after every layer: the last is the output, the
  earlier ``num_layers`` ones are ``aux`` (deep supervision for the matching loss).
- ``num_layers`` is the number of layers built. The official config ``max_dec_layers: 3`` builds
  only 2 (its ``from_config`` subtracts one); we do not copy that.
- Attention by :func:`torch.nn.functional.scaled_dot_product_attention` with a boolean mask
  (True = may attend).
- Every feature level is projected to ``hidden`` by its own 1×1×1 conv when its channels differ
  (the official code requires one channel count for all levels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskPrediction", "MaskTransformerDecoder", "semantic_scores", "sine_position_encoding_3d"]


@dataclass
class MaskPrediction:
    """What :class:`MaskTransformerDecoder` returns.

    ``class_logits`` ``(B, Q, K + 1)``, the last class "no object"; ``mask_logits``
    ``(B, Q, D, H, W)`` on the mask features' grid; ``aux``: the ``(class_logits, mask_logits)``
    of the query init and every layer but the last, in that order.
    """

    class_logits: Tensor
    mask_logits: Tensor
    aux: list[tuple[Tensor, Tensor]] = field(default_factory=list)


def semantic_scores(pred: MaskPrediction) -> Tensor:
    """Per-class scores ``(B, K, D, H, W)``: ``Σ_q softmax(class_q)[:K] · sigmoid(mask_q)``.

    Mask2Former's semantic inference; the "no object" probability is dropped, so the scores are
    not normalised over classes (their argmax is the segmentation).
    """
    probs = pred.class_logits.float().softmax(-1)[..., :-1]
    return torch.einsum("bqk,bqdhw->bkdhw", probs, pred.mask_logits.float().sigmoid())


def sine_position_encoding_3d(shape: Sequence[int], channels: int, *, temperature: float = 10000.0,
                              device: torch.device | None = None) -> Tensor:
    """A fixed sine encoding ``(D·H·W, channels)`` of the grid ``shape = (D, H, W)``, flattened in
    C order: a third of the channels (rounded down to even) per axis, half sin, half cos, of the
    position ``(i + 1) / n · 2π``; channels left over are zero."""
    per_axis = (channels // 3) // 2 * 2
    if per_axis == 0:
        raise ValueError(f"channels must be at least 6 for a 3D sine encoding, got {channels}")
    half = per_axis // 2
    freq = temperature ** (torch.arange(half, device=device, dtype=torch.float32) / half)
    parts = []
    for n in shape:
        pos = torch.arange(1, n + 1, device=device, dtype=torch.float32) / n * (2 * math.pi)
        angle = pos[:, None] / freq
        parts.append(torch.cat([angle.sin(), angle.cos()], dim=1))  # (n, per_axis)
    d, h, w = shape
    enc = torch.cat([parts[0][:, None, None].expand(d, h, w, per_axis),
                     parts[1][None, :, None].expand(d, h, w, per_axis),
                     parts[2][None, None, :].expand(d, h, w, per_axis)], dim=-1).reshape(d * h * w, 3 * per_axis)
    return F.pad(enc, (0, channels - 3 * per_axis))


class _Attention(nn.Module):
    """Multi-head attention ``(B, Lq, C) × (B, Lk, C) → (B, Lq, C)`` over SDPA; ``mask``
    ``(B, Lq, Lk)`` boolean, True = may attend."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        b, lq, c = q.shape

        def split(x: Tensor) -> Tensor:
            return x.reshape(b, x.shape[1], self.heads, c // self.heads).transpose(1, 2)

        o = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(k)), split(self.v(v)),
                                           attn_mask=None if mask is None else mask[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, lq, c))


class _DecoderLayer(nn.Module):
    """Masked cross-attention → self-attention → FFN, each residual then LayerNorm (post-norm)."""

    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        self.cross, self.self_attn = _Attention(hidden, heads, dropout), _Attention(hidden, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, hidden))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, qpos: Tensor, src: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        x = self.norms[0](x + self.drop(self.cross(x + qpos, src + pos, src, mask)))
        q = x + qpos
        x = self.norms[1](x + self.drop(self.self_attn(q, q, x)))
        return self.norms[2](x + self.drop(self.ffn(x)))


class MaskTransformerDecoder(nn.Module):
    """Mask2Former-style decoder: ``num_queries`` queries predict a class and a mask each.

    ``in_channels``: channels of the feature levels cross-attended, coarse to fine (cycled over the
    layers); ``mask_channels``: channels of the finest "mask features" map the mask embeddings are
    dotted with; ``num_classes`` = K (label ids ``0..K-1``, background included; the class head
    has K + 1 outputs, the last "no object"). ``num_layers`` layers are built. Bad sizes
    (no level, zero queries or layers, ``hidden`` not divisible by ``heads`` or below 6) are a
    ValueError naming the argument.

    :meth:`forward` takes the levels ``(B, in_channels[i], d_i, h_i, w_i)`` and the mask features
    ``(B, mask_channels, D, H, W)`` and returns a :class:`MaskPrediction` with masks on ``(D, H, W)``
    and ``num_layers`` aux predictions.
    """

    def __init__(self, in_channels: Sequence[int], mask_channels: int, num_classes: int, *,
                 num_queries: int = 20, hidden: int = 192, heads: int = 8, ffn: int = 1536,
                 num_layers: int = 3, dropout: float = 0.0):
        super().__init__()
        in_channels = tuple(int(c) for c in in_channels)
        for name, value in (("mask_channels", mask_channels), ("num_classes", num_classes),
                            ("num_queries", num_queries), ("heads", heads), ("ffn", ffn), ("num_layers", num_layers)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not in_channels or min(in_channels) < 1:
            raise ValueError(f"in_channels must name at least one level of positive channels, got {in_channels}")
        if hidden < 6 or hidden % heads:
            raise ValueError(f"hidden must be at least 6 and divisible by heads ({heads}), got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.in_channels, self.mask_channels, self.num_classes = in_channels, mask_channels, num_classes
        self.hidden, self.num_layers = hidden, num_layers
        self.proj = nn.ModuleList(nn.Identity() if c == hidden else nn.Conv3d(c, hidden, 1) for c in in_channels)
        self.level_embed = nn.Embedding(len(in_channels), hidden)
        self.query_feat = nn.Embedding(num_queries, hidden)
        self.query_pos = nn.Embedding(num_queries, hidden)
        self.layers = nn.ModuleList(_DecoderLayer(hidden, heads, ffn, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(hidden)
        self.class_head = nn.Linear(hidden, num_classes + 1)
        self.mask_embed = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                        nn.Linear(hidden, mask_channels))

    def _heads(self, x: Tensor, mask_features: Tensor, size: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Class and mask logits of queries ``x`` and the attention mask ``(B, Q, prod(size))`` they
        give the next layer (True = may attend)."""
        x = self.norm(x)
        cls = self.class_head(x)
        masks = torch.einsum("bqc,bcdhw->bqdhw", self.mask_embed(x), mask_features)
        small = F.interpolate(masks.detach(), size=tuple(size), mode="trilinear", align_corners=False)
        return cls, masks, small.flatten(2) >= 0  # sigmoid >= 0.5

    def forward(self, features: Sequence[Tensor], mask_features: Tensor) -> MaskPrediction:
        if len(features) != len(self.in_channels):
            raise ValueError(f"expected {len(self.in_channels)} feature levels, got {len(features)}")
        got = tuple(f.shape[1] for f in features)
        if got != self.in_channels or mask_features.shape[1] != self.mask_channels:
            raise ValueError(f"expected level channels {self.in_channels} and mask channels {self.mask_channels}, "
                             f"got {got} and {mask_features.shape[1]}")
        b = mask_features.shape[0]
        sizes = [tuple(f.shape[2:]) for f in features]
        srcs, poss = [], []
        for i, f in enumerate(features):
            srcs.append(self.proj[i](f).flatten(2).transpose(1, 2) + self.level_embed.weight[i])
            poss.append(sine_position_encoding_3d(sizes[i], self.hidden, device=f.device).to(srcs[-1].dtype))
        x = self.query_feat.weight.expand(b, -1, -1)
        qpos = self.query_pos.weight.expand(b, -1, -1)
        cls, masks, attn = self._heads(x, mask_features, sizes[0])
        preds = [(cls, masks)]
        for i, layer in enumerate(self.layers):
            lvl = i % len(features)
            attn = attn | ~attn.any(-1, keepdim=True)  # a query that may attend nowhere attends everywhere
            x = layer(x, qpos, srcs[lvl], poss[lvl], attn)
            cls, masks, attn = self._heads(x, mask_features, sizes[(i + 1) % len(features)])
            preds.append((cls, masks))
        return MaskPrediction(cls, masks, preds[:-1])
