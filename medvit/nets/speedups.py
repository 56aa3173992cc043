"""Inference speed-ups for a built net, each one optional and each one measurable on its own.

The nets stay MONAI's; these only change how they run:

- ``sdpa``: MONAI's attention blocks (Swin's ``WindowAttention``, UNETR's ``SABlock``) carry a
  ``use_flash_attention`` switch that routes attention through
  ``torch.nn.functional.scaled_dot_product_attention`` instead of an explicit softmax of the
  full score matrix. Same maths; on a GPU it runs fused kernels. Blocks that save their
  attention maps (``save_attn``) are left alone, since SDPA never forms the map.
- ``cudnn_benchmark``: cuDNN times its convolution algorithms on the first call of each input
  shape and keeps the fastest (``torch.backends.cudnn.benchmark``, which nnU-Net turns on for
  inference); the engine feeds one window shape, so the search runs once. Only inside the
  predictor's calls, so nothing else in the process changes. CUDA only. The algorithms differ in
  summation order, not precision.
- ``channels_last``: weights and inputs in ``torch.channels_last_3d`` layout, which cuDNN's
  3D convolutions prefer on tensor-core GPUs.
- ``compile``: ``torch.compile`` of the whole net (fixed shapes: the engine always feeds the
  same window size, and the batch only changes for a last, smaller batch).

None is on by default, since on the CPU none pays for UNETR (``docs/benchmarks.md``): only
``medvit bench engine --speedups`` applies them, to time each against the plain net.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from medvit.core.errors import MedvitError

STEPS = ("sdpa", "cudnn_benchmark", "channels_last", "compile")


def use_sdpa(net: nn.Module) -> int:
    """Switch every MONAI attention block of ``net`` to SDPA; returns how many were switched."""
    n = 0
    for m in net.modules():
        if hasattr(m, "use_flash_attention") and not getattr(m, "save_attn", False):
            m.use_flash_attention = True
            n += 1
    return n


def speed_up(net: nn.Module, steps: Iterable[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A predictor running ``net`` with ``steps`` (names from :data:`STEPS`) applied, in that order.

    ``net`` is changed in place for ``sdpa`` and ``channels_last``; ``compile`` wraps it. The
    predictor maps ``(B, C, D, H, W)`` to the net's output, like ``net`` itself.
    """
    steps = list(steps)
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise MedvitError(f"unknown speed-up {bad[0]!r}; choose from {', '.join(STEPS)}")
    if "sdpa" in steps and use_sdpa(net) == 0:
        raise MedvitError(f"speed-up sdpa: {type(net).__name__} has no attention block with an SDPA switch")
    tune = "cudnn_benchmark" in steps
    if tune:
        where = next((p.device for p in net.parameters()), torch.device("cpu"))
        if where.type != "cuda":
            raise MedvitError(f"speed-up cudnn_benchmark tunes cuDNN's convolutions on a GPU; the net is on {where}")
    layout = torch.channels_last_3d if "channels_last" in steps else None
    if layout is not None:
        net = net.to(memory_format=layout)
    run: Callable[[torch.Tensor], torch.Tensor] = torch.compile(net, dynamic=False) if "compile" in steps else net

    def predict(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=layout) if layout is not None else x
        if not tune:
            return run(x)
        saved = torch.backends.cudnn.benchmark  # only this flag: cudnn.flags() would reset the others
        torch.backends.cudnn.benchmark = True
        try:
            return run(x)
        finally:
            torch.backends.cudnn.benchmark = saved

    return predict
