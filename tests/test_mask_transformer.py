"""The Mask2Former-style 3D decoder: shapes, layers built, masked attention, semantic scores."""

from __future__ import annotations

import pytest
import torch

from medvit.nets.mask_transformer import MaskPrediction, MaskTransformerDecoder, semantic_scores


def small(in_channels=(16, 8), **kw) -> MaskTransformerDecoder:
    args = dict(num_queries=5, hidden=24, heads=4, ffn=32, num_layers=3)
    return MaskTransformerDecoder(in_channels, 4, 3, **{**args, **kw})


def test_shapes_and_one_prediction_per_layer_plus_the_init():
    torch.manual_seed(0)
    dec = small(num_layers=3)
    assert len(dec.layers) == 3  # num_layers means the layers built
    feats = [torch.randn(2, 16, 2, 3, 4), torch.randn(2, 8, 4, 6, 8)]
    pred = dec(feats, torch.randn(2, 4, 8, 12, 16))
    assert isinstance(pred, MaskPrediction)
    assert pred.class_logits.shape == (2, 5, 4) and pred.mask_logits.shape == (2, 5, 8, 12, 16)
    assert len(pred.aux) == 3
    assert all(c.shape == (2, 5, 4) and m.shape == (2, 5, 8, 12, 16) for c, m in pred.aux)
    # gradient reaches every parameter (levels cycle 0, 1, 0: both projections used)
    (pred.class_logits.sum() + pred.mask_logits.sum() + sum(c.sum() + m.sum() for c, m in pred.aux)).backward()
    assert all(p.grad is not None for p in dec.parameters())


def test_semantic_scores_sum_class_probability_times_mask_probability():
    g = torch.Generator().manual_seed(1)
    cls, masks = torch.randn(1, 3, 3, generator=g), torch.randn(1, 3, 2, 2, 2, generator=g)
    s = semantic_scores(MaskPrediction(cls, masks, []))
    assert s.shape == (1, 2, 2, 2, 2)
    p = cls.softmax(-1)
    expect = sum(p[0, q, 1] * masks[0, q, 1, 0, 1].sigmoid() for q in range(3))
    assert torch.isclose(s[0, 1, 1, 0, 1], expect)


def _one_sign_masks(dec: MaskTransformerDecoder) -> None:
    """Every query's mask embedding = 1, so its mask logits equal the 1-channel mask features."""
    last = dec.mask_embed[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.0)


def test_cross_attention_ignores_voxels_the_previous_mask_excludes():
    torch.manual_seed(0)
    dec = MaskTransformerDecoder((8,), 1, 2, num_queries=4, hidden=12, heads=2, ffn=16, num_layers=1).eval()
    _one_sign_masks(dec)
    mf = torch.ones(1, 1, 4, 4, 4)
    mf[:, :, 2:] = -1  # queries may attend only to the first half along D
    feats = torch.randn(1, 8, 4, 4, 4)
    base = dec([feats], mf).class_logits
    masked, open_ = feats.clone(), feats.clone()
    masked[:, :, 2:] += 5.0
    open_[:, :, :2] += 5.0
    assert torch.allclose(dec([masked], mf).class_logits, base, atol=1e-6)
    assert not torch.allclose(dec([open_], mf).class_logits, base, atol=1e-3)


def test_a_query_masked_everywhere_attends_everywhere():
    torch.manual_seed(0)
    dec = MaskTransformerDecoder((8,), 1, 2, num_queries=4, hidden=12, heads=2, ffn=16, num_layers=2).eval()
    _one_sign_masks(dec)
    mf = -torch.ones(1, 1, 4, 4, 4)
    feats = torch.randn(1, 8, 4, 4, 4)
    out = dec([feats], mf).class_logits
    assert torch.isfinite(out).all()
    moved = feats.clone()
    moved[:, :, 3:] += 5.0
    assert not torch.allclose(dec([moved], mf).class_logits, out, atol=1e-3)


def test_the_mask_resized_to_a_coarser_level_by_trilinear_interpolation():
    torch.manual_seed(0)
    dec = MaskTransformerDecoder((8,), 1, 2, num_queries=2, hidden=12, heads=2, ffn=16, num_layers=1).eval()
    _one_sign_masks(dec)
    mf = torch.ones(1, 1, 8, 8, 8)
    mf[:, :, 4:] = -1  # on the 2x coarser level: the first two D slices open, the last two closed
    feats = torch.randn(1, 8, 4, 4, 4)
    base = dec([feats], mf).class_logits
    masked = feats.clone()
    masked[:, :, 2:] -= 3.0
    assert torch.allclose(dec([masked], mf).class_logits, base, atol=1e-6)


@pytest.mark.parametrize("kw, match", [({"num_queries": 0}, "num_queries"), ({"num_layers": 0}, "num_layers"),
                                       ({"hidden": 26}, "hidden"), ({"in_channels": ()}, "in_channels")])
def test_bad_sizes_are_value_errors_naming_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_wrong_levels_are_refused():
    dec = small()
    with pytest.raises(ValueError, match="feature levels"):
        dec([torch.randn(1, 16, 2, 2, 2)], torch.randn(1, 4, 4, 4, 4))
    with pytest.raises(ValueError, match="channels"):
        dec([torch.randn(1, 8, 2, 2, 2), torch.randn(1, 8, 4, 4, 4)], torch.randn(1, 4, 4, 4, 4))
