"""Multi-head self-attention on a token grid with a pluggable attention pattern.

``x (B, D, H, W, C) -> qkv Linear -> heads (B, heads, D, H, W, head_dim) -> pattern(q, k, v)
-> heads merged -> proj Linear``. The pattern (full, window, dilated, stripe attention of this
package, bound with :func:`functools.partial`) decides which keys each token attends and so
the cost per token; the projections add ``4 * C`` multiply-adds per channel per token.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

__all__ = ["GridAttention"]


class GridAttention(nn.Module):
    """Multi-head self-attention whose attention pattern is chosen per call.

    Attention dropout is the pattern's ``dropout_p``: bind ``dropout_p=module.dropout_p`` when
    building the pattern (``attn_drop`` in training, 0 in evaluation), e.g.
    ``attn(x, partial(window_attention, window=(2, 8, 8), dropout_p=attn.dropout_p))``.

    Args:
        dim: channels ``C`` of the tokens, a multiple of ``num_heads``.
        num_heads: attention heads; ``head_dim = dim / num_heads``.
        qkv_bias: bias in ``self.qkv = Linear(dim, 3 * dim)``.
        attn_drop: attention dropout probability in training (see ``dropout_p``).
        proj_drop: dropout after ``self.proj = Linear(dim, dim)``.

    Raises:
        ValueError: ``dim`` or ``num_heads`` < 1, ``dim`` not divisible by ``num_heads``, or a
            dropout probability outside [0, 1].
    """

    def __init__(
        self, dim: int, num_heads: int, *, qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0
    ) -> None:
        super().__init__()
        if dim < 1 or num_heads < 1:
            raise ValueError(f"dim and num_heads must be >= 1, got dim={dim}, num_heads={num_heads}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must divide by num_heads={num_heads}")
        if not (0.0 <= attn_drop <= 1.0 and 0.0 <= proj_drop <= 1.0):
            raise ValueError(f"dropout probabilities must be in [0, 1], got attn_drop={attn_drop}, proj_drop={proj_drop}")
        self.dim = dim
        self.num_heads = num_heads
        self.attn_drop = float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    @property
    def dropout_p(self) -> float:
        """The attention dropout to bind into the pattern: ``attn_drop`` in training, else 0."""
        return self.attn_drop if self.training else 0.0

    def check_tokens(self, x: Tensor) -> None:
        """ValueError unless ``x`` is ``(B, D, H, W, dim)``."""
        if x.ndim != 5 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (B, D, H, W, {self.dim}), got {tuple(x.shape)}")

    def forward(self, x: Tensor, pattern: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """Args:
            x: tokens ``(B, D, H, W, dim)``.
            pattern: ``pattern(q, k, v)`` on ``(B, heads, D, H, W, head_dim)`` tensors, returning
                the same shape.

        Returns:
            ``(B, D, H, W, dim)``.

        Raises:
            ValueError: ``x`` is not 5D or its last axis is not ``dim``.
        """
        self.check_tokens(x)
        b, d, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, d, h, w, 3, self.num_heads, self.dim // self.num_heads)
        q, k, v = qkv.permute(4, 0, 5, 1, 2, 3, 6).unbind(0)
        out = pattern(q, k, v)
        out = out.permute(0, 2, 3, 4, 1, 5).reshape(b, d, h, w, self.dim)
        return self.proj_drop(self.proj(out))
