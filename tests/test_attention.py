"""medvit.attention against a naive reference: full attention over all B*D*H*W tokens of a
batch with an explicit boolean (N x N) mask built from each pattern's definition in grid
coordinates (float64 softmax, no padding anywhere), forward and backward."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from medvit.attention import (
    CrossStripeAttention,
    GridAttention,
    dilated_attention,
    full_attention,
    stripe_attention,
    window_attention,
)

B, HEADS, HEAD_DIM = 2, 2, 4


# --- per-axis "may attend" rules, from the definitions (p1: query index, p2: key index) ---


def same_window(n, w, s):
    """Swin on one axis: pad to Np, roll by -s, cut into windows of w; region slices of the
    rolled axis [0, Np-w), [Np-w, Np-s), [Np-s, Np) (Swin's img_mask) when shifted."""

    def rule(p1, p2):
        if s == 0:
            return p1 // w == p2 // w
        np_ = math.ceil(n / w) * w
        r1, r2 = (p1 - s) % np_, (p2 - s) % np_

        def region(r):
            return (r >= np_ - w).long() + (r >= np_ - s).long()

        return (r1 // w == r2 // w) & (region(r1) == region(r2))

    return rule


def same_dilated_group(n, g):
    """D-Former's group r holds r, r+I, .., I = ceil(n/g)*g // g."""
    interval = math.ceil(n / g) * g // g
    return lambda p1, p2: p1 % interval == p2 % interval


def same_slab(w):
    return lambda p1, p2: p1 // w == p2 // w


def anywhere(p1, p2):
    return torch.ones(torch.broadcast_shapes(p1.shape, p2.shape), dtype=torch.bool)


def token_mask(batch, grid, rules):
    """(T, T) bool over tokens ordered (b, d, h, w): same volume and every axis rule holds."""
    idx = torch.cartesian_prod(*(torch.arange(n) for n in (batch, *grid)))
    mask = idx[:, None, 0] == idx[None, :, 0]
    for a, rule in enumerate(rules):
        mask &= rule(idx[:, None, 1 + a], idx[None, :, 1 + a])
    return mask


def naive_attention(q, k, v, mask):
    """Explicit float64 softmax attention of (B, heads, D, H, W, c) grids under a (T, T) mask."""
    b, h, d, hh, w, c = q.shape
    flat = [x.double().transpose(0, 1).reshape(h, b * d * hh * w, x.shape[-1]) for x in (q, k, v)]
    scores = flat[0] @ flat[1].transpose(-1, -2) / math.sqrt(c)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = weights @ flat[2]
    return out.reshape(h, b, d, hh, w, v.shape[-1]).transpose(0, 1)


def random_qkv(grid, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    # built as (B, D, H, W, heads, c) and permuted: the patterns must take non-contiguous input
    out = []
    for _ in range(3):
        x = torch.randn(B, *grid, HEADS, HEAD_DIM, generator=gen).permute(0, 4, 1, 2, 3, 5)
        out.append(x.detach().requires_grad_(requires_grad))
    return out


def window_case(grid, window, shift):
    rules = [same_window(n, w, s) for n, w, s in zip(grid, window, shift)]
    return grid, partial(window_attention, window=window, shift=shift), rules


def dilated_case(grid, group):
    rules = [same_dilated_group(n, g) for n, g in zip(grid, group)]
    return grid, partial(dilated_attention, group=group), rules


def stripe_case(grid, axis, width):
    rules = [same_slab(width) if a == axis else anywhere for a in range(3)]
    return grid, partial(stripe_attention, axis=axis, width=width), rules


# (case, whether SDPA must get a mask)
CASES = {
    "full": ((3, 5, 7), full_attention, [anywhere] * 3, False),
    "window": (*window_case((4, 6, 6), (2, 3, 3), (0, 0, 0)), False),
    "window_padded": (*window_case((3, 5, 7), (2, 4, 4), (0, 0, 0)), True),
    "window_shift": (*window_case((4, 8, 8), (2, 4, 4), (1, 2, 2)), True),
    "window_shift_padded": (*window_case((3, 5, 7), (2, 4, 4), (1, 2, 2)), True),
    "window_shift_one_axis": (*window_case((3, 5, 7), (2, 4, 4), (0, 0, 2)), True),
    "window_shift_small_grid": (*window_case((2, 3, 9), (4, 2, 4), (2, 1, 2)), True),
    "window_larger_than_grid": (*window_case((1, 5, 3), (2, 8, 3), (0, 0, 0)), False),
    "window_larger_and_padded": (*window_case((1, 5, 7), (2, 8, 3), (0, 0, 0)), True),
    "dilated": (*dilated_case((4, 6, 6), (2, 3, 3)), False),
    "dilated_padded": (*dilated_case((3, 5, 7), (2, 4, 4)), True),
    "dilated_small_grid": (*dilated_case((2, 3, 9), (4, 2, 4)), True),
    "dilated_dformer_group": (*dilated_case((3, 9, 10), (2, 8, 8)), True),
    "stripe_d": (*stripe_case((3, 5, 7), 0, 2), True),
    "stripe_h": (*stripe_case((3, 5, 7), 1, 2), True),
    "stripe_w": (*stripe_case((3, 5, 7), 2, 3), True),
    "stripe_divides": (*stripe_case((3, 4, 6), 2, 3), False),
    "stripe_wider_than_grid": (*stripe_case((3, 5, 4), 1, 9), False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pattern_equals_naive_reference(name, monkeypatch):
    grid, pattern, rules, masked = CASES[name]
    masks = []
    sdpa = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        masks.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    q, k, v = random_qkv(grid, requires_grad=True)
    out = pattern(q, k, v)
    assert out.shape == q.shape and out.is_contiguous()
    assert masks and all((m is not None) == masked for m in masks)
    assert all(m.dtype == torch.bool for m in masks if m is not None)
    # no empty softmax row (a NaN on backends that do not special-case it)
    assert all(m.any(-1).all() for m in masks if m is not None)

    qr, kr, vr = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    ref = naive_attention(qr, kr, vr, token_mask(B, grid, rules))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)

    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * upstream).sum().backward()
    (ref * upstream.double()).sum().backward()
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_shift_keeps_wrapped_tokens_apart():
    # a token that wrapped around must not see the far end of the grid it now shares a window with
    q, k, v = random_qkv((1, 1, 8))
    v = torch.zeros_like(v)
    v[:, :, :, :, 0] = 1.0  # only token w=0 (wraps with shift 2) carries a value
    out = window_attention(q, k, v, (1, 1, 4), shift=(0, 0, 2))
    assert torch.all(out[:, :, :, :, 0:2] > 0)  # the wrapped pair sees it
    assert torch.all(out[:, :, :, :, 2:] == 0)  # tokens 6, 7 share its window but not its region


def test_padded_grads_finite_in_bf16_and_close_to_fp32():
    q, k, v = random_qkv((3, 5, 7))
    want = window_attention(q, k, v, (2, 4, 4), shift=(1, 2, 2))
    qb, kb, vb = (x.bfloat16().requires_grad_(True) for x in (q, k, v))
    got = window_attention(qb, kb, vb, (2, 4, 4), shift=(1, 2, 2))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
    got.float().square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (qb, kb, vb))


def test_meta_device_under_flop_counter():
    grid, group = (3, 5, 7), (2, 4, 4)
    q, k, v = (torch.empty(B, HEADS, *grid, HEAD_DIM, device="meta") for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        out = dilated_attention(q, k, v, group)
    assert out.device.type == "meta" and out.shape == q.shape
    # padded to (4, 8, 8): 2*4*4 groups of 32 tokens; QK^T and AV, 2 FLOPs per multiply-add
    groups, tokens = (4 // 2) * (8 // 4) * (8 // 4), 2 * 4 * 4
    expected = 2 * 2 * groups * B * HEADS * tokens * tokens * HEAD_DIM
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q: window_attention(q, q, q, (2, 2)), "3 entries"),
        (lambda q: window_attention(q, q, q, (2, 0, 2)), ">= 1"),
        (lambda q: window_attention(q, q, q, (2, 2, 2), shift=(0, 0, 2)), "shift"),
        (lambda q: dilated_attention(q, q, q, (2, 2, -1)), ">= 1"),
        (lambda q: stripe_attention(q, q, q, 3, 2), "axis"),
        (lambda q: stripe_attention(q, q, q, 0, 0), ">= 1"),
        (lambda q: full_attention(q[0], q[0], q[0]), r"\(B, heads, D, H, W, head_dim\)"),
        (lambda q: full_attention(q, q[:, :, :1], q), "share"),
    ],
)
def test_pattern_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.zeros(1, 1, 2, 3, 4, 2))


# --- CrossStripeAttention ---


def naive_slab_conv(x, conv, axis, width):
    """conv (padding 1) run on each slab of `width` along `axis` separately, by slicing."""
    pieces = []
    for start in range(0, x.shape[2 + axis], width):
        pieces.append(conv(x.narrow(2 + axis, start, min(width, x.shape[2 + axis] - start))))
    return torch.cat(pieces, dim=2 + axis)


def naive_cross_stripe(m, x):
    b, d, h, w, c = x.shape
    c3, h3 = c // 3, m.num_heads // 3
    q, k, v = m.qkv(x).chunk(3, dim=-1)
    outs = []
    for a in range(3):
        sl = slice(a * c3, (a + 1) * c3)

        def heads(t):
            return t[..., sl].reshape(b, d, h, w, h3, c3 // h3).permute(0, 4, 1, 2, 3, 5)

        rules = [same_slab(m.width[a]) if ax == a else anywhere for ax in range(3)]
        out = naive_attention(heads(q), heads(k), heads(v), token_mask(b, (d, h, w), rules)).float()
        out = out.permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, c3)
        if m.lepe is not None:
            v_img = v[..., sl].permute(0, 4, 1, 2, 3)
            out = out + naive_slab_conv(v_img, m.lepe[a], a, m.width[a]).permute(0, 2, 3, 4, 1)
        outs.append(out)
    return m.proj(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("lepe", [True, False])
@pytest.mark.parametrize("grid, width", [((3, 5, 7), (2, 2, 3)), ((4, 4, 6), 2), ((2, 5, 3), (4, 2, 8))])
def test_cross_stripe_attention_equals_naive(lepe, grid, width):
    torch.manual_seed(0)
    m = CrossStripeAttention(12, 6, width, lepe=lepe).eval()
    if lepe:
        for conv in m.lepe:  # default bias init is small; make LePE count in the comparison
            torch.nn.init.normal_(conv.bias)
    x = torch.randn(2, *grid, 12, requires_grad=True)
    out = m(x)
    assert out.shape == x.shape
    with torch.no_grad():
        torch.testing.assert_close(out, naive_cross_stripe(m, x), atol=1e-5, rtol=0)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_cross_stripe_lepe_zero_pads_at_slab_faces():
    m = CrossStripeAttention(3, 3, (1, 2, 1)).eval()
    conv = m.lepe[1]
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    x = torch.ones(1, 1, 1, 4, 1)  # (B, C, D, H, W): slabs H = {0, 1}, {2, 3}
    from medvit.attention.stripes import slab_conv

    y = slab_conv(x, conv, 1, 2)
    # each voxel sums its 3x3x3 neighbourhood inside its own slab only: 2 voxels, never 3
    assert torch.equal(y, torch.full_like(y, 2.0))


def test_cross_stripe_attention_parameters_and_errors():
    m = CrossStripeAttention(12, 6, 2)
    assert m.width == (2, 2, 2)
    assert [tuple(c.weight.shape) for c in m.lepe] == [(4, 1, 3, 3, 3)] * 3
    assert CrossStripeAttention(12, 6, 2, lepe=False).lepe is None
    for kwargs, match in [
        (dict(dim=12, num_heads=4, width=2), "divide by 3"),
        (dict(dim=15, num_heads=6, width=2), "divide by num_heads"),
        (dict(dim=12, num_heads=3, width=0), ">= 1"),
        (dict(dim=12, num_heads=3, width=(2, 2)), "three values"),
        (dict(dim=0, num_heads=3, width=2), ">= 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            CrossStripeAttention(**kwargs)
    with pytest.raises(ValueError, match=r"\(B, D, H, W, 12\)"):
        m(torch.zeros(1, 2, 2, 2, 6))


# --- GridAttention ---


def test_grid_attention_equals_naive_multihead():
    torch.manual_seed(0)
    m = GridAttention(8, 2).eval()
    x = torch.randn(2, 3, 5, 7, 8)
    got = m(x, partial(window_attention, window=(2, 4, 4), shift=(1, 2, 2), dropout_p=m.dropout_p))
    q, k, v = m.qkv(x).chunk(3, dim=-1)

    def heads(t):
        return t.reshape(2, 3, 5, 7, 2, 4).permute(0, 4, 1, 2, 3, 5)

    rules = [same_window(n, w, s) for n, w, s in zip((3, 5, 7), (2, 4, 4), (1, 2, 2))]
    ref = naive_attention(heads(q), heads(k), heads(v), token_mask(2, (3, 5, 7), rules)).float()
    ref = m.proj(ref.permute(0, 2, 3, 4, 1, 5).reshape(2, 3, 5, 7, 8))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert [n for n, _ in m.named_parameters()] == ["qkv.weight", "qkv.bias", "proj.weight", "proj.bias"]
    assert GridAttention(8, 2, qkv_bias=False).qkv.bias is None


def test_grid_attention_dropout_p_follows_training():
    torch.manual_seed(0)
    m = GridAttention(8, 2, attn_drop=0.5)
    x = torch.randn(1, 2, 3, 4, 8)
    assert m.dropout_p == 0.5
    trained = m(x, partial(dilated_attention, group=(2, 2, 2), dropout_p=m.dropout_p))
    m.eval()
    assert m.dropout_p == 0.0
    evaluated = m(x, partial(dilated_attention, group=(2, 2, 2), dropout_p=m.dropout_p))
    assert not torch.allclose(trained, evaluated)
    torch.testing.assert_close(evaluated, m(x, partial(dilated_attention, group=(2, 2, 2))))


@pytest.mark.parametrize(
    "dim, heads, match",
    [(10, 3, "divide by num_heads"), (0, 1, ">= 1"), (8, 0, ">= 1"), (8, -2, ">= 1")],
)
def test_grid_attention_errors(dim, heads, match):
    with pytest.raises(ValueError, match=match):
        GridAttention(dim, heads)


def test_grid_attention_refuses_wrong_channels():
    with pytest.raises(ValueError, match=r"\(B, D, H, W, 8\)"):
        GridAttention(8, 2)(torch.zeros(1, 2, 2, 2, 6), full_attention)
