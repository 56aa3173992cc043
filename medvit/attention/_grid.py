"""Grouped attention over a per-head token grid: the padding, grouping and masking that every
pattern of :mod:`medvit.attention` shares.

A pattern is described per axis by an :class:`AxisPlan`: the axis is padded at its end to a
multiple of ``size`` and cut into ``size``-token pieces, either *local* (group ``i`` holds the
consecutive tokens ``i*size .. i*size+size-1``: windows and stripes) or *dilated* (with
``I = padded // size``, group ``r`` holds tokens ``r, r+I, .., r+(size-1)*I``: D-Former's global
scope), optionally after a cyclic roll by ``-shift`` (Swin). A 3D group is the product of one
group per axis; all groups are batched into one
:func:`torch.nn.functional.scaled_dot_product_attention` (SDPA) call of shape
``(groups, B*heads, tokens per group, head_dim)``.

Masking (boolean, True = may attend), built once per call with torch ops on the input's device
(so ``meta`` tensors work):

- padded keys are masked out of every softmax;
- with a shift, a key is allowed only when, along every shifted axis, it lies on the same side
  of the wrap as the query (Swin's region mask: no token attends across the roll);
- a padded query (cropped away afterwards) may attend every key of its group, so no softmax
  row is empty and neither forward nor backward makes NaN; a real query always keeps itself.

When no axis is padded or shifted, SDPA gets ``attn_mask=None`` and may run a fused kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AxisPlan", "check_qkv", "grouped_attention", "sdpa"]


@dataclass(frozen=True)
class AxisPlan:
    """How one grid axis is padded and cut into groups.

    Attributes:
        length: tokens along the axis (before padding), >= 1.
        size: tokens a group takes along the axis, >= 1; a ``size`` of at least ``length`` (with
            no shift) is taken as ``length``: one group spans the axis, as padding and masking
            would give, without the padding.
        dilated: False: consecutive tokens (windows, stripes); True: tokens ``padded // size``
            apart (D-Former's global groups).
        shift: Swin's cyclic shift, ``0 <= shift < size``, local groups only: the padded axis is
            rolled by ``-shift`` before it is cut.
    """

    length: int
    size: int
    dilated: bool = False
    shift: int = 0

    def __post_init__(self) -> None:
        if self.length < 1 or self.size < 1:
            raise ValueError(f"grid length and group size must be >= 1, got {self.length} and {self.size}")
        if not 0 <= self.shift < self.size:
            raise ValueError(f"shift must be in [0, {self.size}) for a group of {self.size}, got {self.shift}")
        if self.dilated and self.shift:
            raise ValueError("a dilated group takes no shift")

    @property
    def group(self) -> int:
        """Tokens per group along the axis, after clamping to the axis when nothing is shifted."""
        return min(self.size, self.length) if self.shift == 0 else self.size

    @property
    def padded(self) -> int:
        """The axis length after padding: ``ceil(length / group) * group``."""
        return math.ceil(self.length / self.group) * self.group

    @property
    def groups(self) -> int:
        """Number of groups along the axis."""
        return self.padded // self.group

    @property
    def needs_mask(self) -> bool:
        return self.padded != self.length or self.shift != 0

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per token of the cut axis, indexed ``[group, position in group]``: whether it is a real
        (unpadded) token, and whether it wrapped around in the roll (``original index < shift``).

        Returns:
            two bool tensors of shape ``(groups, group)``.
        """
        groups, group = self.groups, self.group
        if self.dilated:
            # padded index = position * groups + group index
            idx = torch.arange(group, device=device)[None, :] * groups + torch.arange(groups, device=device)[:, None]
        else:
            rolled = torch.arange(self.padded, device=device).reshape(groups, group)
            idx = torch.remainder(rolled + self.shift, self.padded)  # index before the roll by -shift
        return idx < self.length, idx < self.shift


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Check that ``q, k, v`` are per-head token grids ``(B, heads, D, H, W, head_dim)``.

    Raises:
        ValueError: a tensor is not 6D, ``k`` differs from ``q`` in shape, or ``v`` differs from
            ``q`` before the last axis; an axis of zero length.
    """
    if q.ndim != 6 or k.ndim != 6 or v.ndim != 6:
        raise ValueError(
            f"q, k, v must be (B, heads, D, H, W, head_dim), got shapes {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"q, k, v must share (B, heads, D, H, W) and q, k head_dim, got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if 0 in q.shape or v.shape[-1] == 0:
        raise ValueError(f"q, k, v must have no empty axis, got {tuple(q.shape)} and v {tuple(v.shape)}")


def sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float) -> Tensor:
    """:func:`torch.nn.functional.scaled_dot_product_attention`, looked up at call time."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


def _split(x: Tensor, plans: Sequence[AxisPlan]) -> tuple[Tensor, list[int], tuple[int, ...]]:
    """``(B, h, Dp, Hp, Wp, c)`` -> ``(G, B*h, L, c)``; returns the inverse permutation and the
    9D shape to reshape the grouped tensor back to before un-permuting."""
    b, h = x.shape[:2]
    c = x.shape[-1]
    split_shape: list[int] = [b, h]
    group_dims, token_dims = [], []
    for a, p in enumerate(plans):
        outer, inner = (p.group, p.groups) if p.dilated else (p.groups, p.group)
        split_shape += [outer, inner]
        g_dim, t_dim = (3 + 2 * a, 2 + 2 * a) if p.dilated else (2 + 2 * a, 3 + 2 * a)
        group_dims.append(g_dim)
        token_dims.append(t_dim)
    split_shape.append(c)
    perm = [*group_dims, 0, 1, *token_dims, 8]
    xs = x.reshape(split_shape).permute(perm)
    grouped_shape = tuple(xs.shape)
    n_groups = math.prod(p.groups for p in plans)
    n_tokens = math.prod(p.group for p in plans)
    inverse = [perm.index(i) for i in range(9)]
    return xs.reshape(n_groups, b * h, n_tokens, c), inverse, grouped_shape


def _mask(plans: Sequence[AxisPlan], device: torch.device) -> Tensor:
    """The boolean mask ``(G, 1, L, L)`` or, with no shift, ``(G, 1, 1, L)`` (see module doc)."""
    valid = None
    wrapped = None
    for a, p in enumerate(plans):
        v_a, w_a = p.tables(device)
        # place this axis' (groups, group) table into (G0, G1, G2, L0, L1, L2)
        shape = [1] * 6
        shape[a], shape[3 + a] = p.groups, p.group
        v_a, w_a = v_a.reshape(shape), w_a.reshape(shape)
        valid = v_a if valid is None else valid & v_a
        if p.shift:
            # one integer region code per token: bit a set when it wrapped along axis a
            code = w_a.to(torch.uint8) << a
            wrapped = code if wrapped is None else wrapped | code
    n_groups = math.prod(p.groups for p in plans)
    n_tokens = math.prod(p.group for p in plans)
    full = [p.groups for p in plans] + [p.group for p in plans]
    valid = valid.expand(full).reshape(n_groups, n_tokens)
    if wrapped is None:
        return valid[:, None, None, :]
    wrapped = wrapped.expand(full).reshape(n_groups, n_tokens)
    allowed = (wrapped[:, :, None] == wrapped[:, None, :]) & valid[:, None, :]
    allowed = allowed | ~valid[:, :, None]
    return allowed[:, None]


def grouped_attention(
    q: Tensor, k: Tensor, v: Tensor, plans: Sequence[AxisPlan], dropout_p: float = 0.0
) -> Tensor:
    """Attention within the groups that ``plans`` (one per axis D, H, W) cut the grid into.

    Args:
        q, k: ``(B, heads, D, H, W, head_dim)``; v: the same with its own last axis.
        plans: three :class:`AxisPlan`, whose ``length`` must be the grid's ``(D, H, W)``.
        dropout_p: SDPA's attention dropout.

    Returns:
        ``(B, heads, D, H, W, v.shape[-1])``, contiguous, in ``q``'s dtype.

    Raises:
        ValueError: the plans do not match the grid.
    """
    grid = tuple(q.shape[2:5])
    if tuple(p.length for p in plans) != grid:
        raise ValueError(f"axis plans for {tuple(p.length for p in plans)} do not match the grid {grid}")
    pad = []
    for p in reversed(plans):
        pad += [0, p.padded - p.length]
    shifts = tuple(-p.shift for p in plans)
    shifted = any(shifts)
    parts = []
    for x in (q, k, v):
        if any(pad):
            x = F.pad(x, [0, 0, *pad])
        if shifted:
            x = torch.roll(x, shifts, dims=(2, 3, 4))
        parts.append(x)
    (qg, inverse, _), (kg, _, _), (vg, _, vshape) = (_split(x, plans) for x in parts)
    mask = _mask(plans, q.device) if any(p.needs_mask for p in plans) else None
    out = sdpa(qg, kg, vg, mask, dropout_p)
    out = out.reshape(vshape).permute(inverse)
    b, h = q.shape[:2]
    out = out.reshape(b, h, *(p.padded for p in plans), v.shape[-1])
    if shifted:
        out = torch.roll(out, tuple(-s for s in shifts), dims=(2, 3, 4))
    d, hh, w = grid
    return out[:, :, :d, :hh, :w].contiguous()
