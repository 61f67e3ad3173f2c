"""Pre-LN transformer blocks with the attention injected.

One block class serves the IS2RE model, the LM and the ViT: the attention module is built by the
caller (``FLTAttention`` in any mode, or a baseline from :mod:`flt_mol.attention.baselines`) and
only has to honour ``attention(x[B,L,D], pos[B,L,l] | None, padding_mask[B,L] | None) -> [B,L,D]``.
"""

from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Module):
    """``W2 act(W1 x)`` with dropout; shapes ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        if activation not in ("gelu", "relu", "silu"):
            raise ValueError(f"activation must be gelu, relu or silu, got {activation!r}")
        act = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}[activation]
        self.net = nn.Sequential(
            nn.Linear(dim, hidden_dim), act(), nn.Dropout(dropout), nn.Linear(hidden_dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LN block.

    ``x <- x + Drop(Attn(LN(x), pos, padding_mask))``;  ``x <- x + Drop(FFN(LN(x)))``.

    Args:
        dim: model width D.
        attention: module with ``forward(x, pos, padding_mask) -> [B, L, D]``.
        ffn_dim: hidden width of the feed-forward network.
        dropout: residual dropout.

    Shapes: ``x [B, L, D]``, ``pos [B, L, l]`` or None, ``padding_mask [B, L]`` (True = pad).
    """

    def __init__(
        self,
        dim: int,
        attention: nn.Module,
        ffn_dim: int,
        *,
        dropout: float = 0.0,
        activation: str = "gelu",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = attention
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout=dropout, activation=activation)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        **geometry,
    ) -> torch.Tensor:
        """``geometry``: extra keyword arguments for the attention (e.g. ``lattice=`` of periodic
        structures), passed through only when given so any attention module fits."""
        x = x + self.dropout(self.attention(self.norm1(x), pos, padding_mask, **geometry))
        x = x + self.dropout(self.ffn(self.norm2(x)))
        return x
