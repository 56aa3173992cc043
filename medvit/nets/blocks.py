"""Small blocks the transformer nets of :mod:`medvit.nets` share (one definition each)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Mlp", "check_block_options"]


class Mlp(nn.Module):
    """A transformer block's MLP on ``(..., dim)`` tokens: Linear → GELU → dropout → Linear → dropout."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def check_block_options(embed_dim: int, mlp_ratio: float, **rates: float) -> None:
    """ValueError unless ``mlp_ratio`` gives the first stage's MLP at least one hidden unit and
    every dropout rate in ``rates`` (named as the net's argument) lies in [0, 1)."""
    if not mlp_ratio > 0 or int(embed_dim * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio must give at least one hidden unit, got {mlp_ratio!r}")
    for name, rate in rates.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {rate!r}")
