"""`medvit segment`'s preprocessing with --skip-below-hu: the net's input is unchanged, the test sees HU."""

import numpy as np
import pytest
import torch

from medvit.config import parse_config
from medvit.data.phantom import make_phantom
from medvit.core.errors import MedvitError
from medvit.transforms import infer_transforms
from pipelines.volume.segment import preprocess_case
from tests.helpers import TINY


@pytest.fixture(scope="module")
def case():
    from monai.data import MetaTensor

    p = make_phantom(np.random.default_rng(5), spacing=(7.0, 6.0, 9.0), axcodes="LPS")
    loaded = {"image": MetaTensor(torch.as_tensor(p.image, dtype=torch.float32)[None], affine=torch.as_tensor(p.affine))}
    pre = parse_config(TINY).preprocess
    plain = infer_transforms(pre, load=False)(dict(loaded))["image"].as_tensor()
    return pre, loaded, plain


@pytest.mark.parametrize("hu, unclipped", [(None, False), (-500.0, False), (620.0, True), (-1200.0, True)])
def test_net_input_is_the_plain_chains_and_the_test_reads_hu(case, hu, unclipped):
    pre, loaded, plain = case
    prep = preprocess_case(pre, loaded, hu)
    assert torch.equal(prep.image, plain)  # bit for bit: clamping after the chain is the clip
    lo, hi = pre.intensity.window
    if hu is None:
        assert prep.skip_below is None and prep.skip_source is None
        return
    assert prep.skip_below == pytest.approx((hu - lo) / (hi - lo))
    assert (prep.skip_source is not None) == unclipped
    if unclipped:
        assert prep.skip_source.shape == plain.shape
        assert float(prep.skip_source.max()) > 1.0 and float(prep.skip_source.min()) < 0.0  # HU beyond the window
        torch.testing.assert_close(prep.skip_source.clamp(0, 1), plain, rtol=0, atol=0)


def test_mri_checkpoint_refuses_a_hu_threshold(case):
    pre, loaded, _ = case
    mri = pre.model_copy(update={"intensity": pre.intensity.model_copy(update={"modality": "mri"})})
    with pytest.raises(MedvitError, match="needs a CT checkpoint"):
        preprocess_case(mri, loaded, -500.0)
