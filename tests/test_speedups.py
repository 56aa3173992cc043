"""Model speed-ups: same outputs as the plain net, and clear errors for what cannot apply."""

import pytest
import torch

from medvit.config import ModelConfig
from medvit.core.errors import MedvitError
from medvit.nets import build_net
from medvit.nets.speedups import speed_up, use_sdpa

NETS = {
    "swin_unetr": ({"feature_size": 12, "depths": (1, 1, 1, 1)}, 64),
    "unetr": ({"feature_size": 8, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}, 32),
}


def _pair(name: str):
    opts, roi = NETS[name]
    cfg = ModelConfig(name=name, in_channels=1, out_channels=3, roi_size=(roi,) * 3, options=opts)
    torch.manual_seed(0)
    a = build_net(cfg).eval()
    b = build_net(cfg).eval()
    b.load_state_dict(a.state_dict())
    return a, b, roi


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("steps", [("sdpa",), ("sdpa", "channels_last")])
def test_speed_ups_keep_the_output(name, steps):
    plain, fast, roi = _pair(name)
    x = torch.rand(2, 1, roi, roi, roi, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = plain(x)
        got = speed_up(fast, steps)(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


def test_sdpa_switches_every_attention_block():
    _, net, _ = _pair("swin_unetr")
    n = use_sdpa(net)
    assert n == 4  # one window attention per Swin block, depths (1, 1, 1, 1)
    assert all(m.use_flash_attention for m in net.modules() if hasattr(m, "use_flash_attention"))


def test_unknown_step_and_net_without_attention():
    _, net, _ = _pair("unetr")
    with pytest.raises(MedvitError, match="unknown speed-up 'fp8'"):
        speed_up(net, ["fp8"])
    cnn = build_net(ModelConfig(name="unet", in_channels=1, out_channels=2, roi_size=(32, 32, 32), options={}))
    with pytest.raises(MedvitError, match="no attention block"):
        speed_up(cnn, ["sdpa"])


def test_cudnn_benchmark_needs_a_gpu():
    _, net, _ = _pair("unetr")
    with pytest.raises(MedvitError, match="cudnn_benchmark .* the net is on cpu"):
        speed_up(net, ["cudnn_benchmark"])


class _SeesFlag(torch.nn.Module):
    """Records cuDNN's benchmark flag during its call."""

    def forward(self, x):
        self.seen = torch.backends.cudnn.benchmark
        return x


def test_cudnn_benchmark_is_on_only_inside_the_call(monkeypatch):
    class OnGpu:
        device = torch.device("cuda")

    net = _SeesFlag()  # made to claim a GPU parameter, so no GPU is needed
    monkeypatch.setattr(net, "parameters", lambda recurse=True: iter([OnGpu()]))
    before = torch.backends.cudnn.benchmark
    pred = speed_up(net, ["cudnn_benchmark"])
    x = torch.ones(1, 1, 2, 2, 2)
    assert torch.equal(pred(x), x)
    assert net.seen is True
    assert torch.backends.cudnn.benchmark == before
