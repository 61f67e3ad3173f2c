"""Exact O(L^2) softmax attention with an explicit additive RPE mask: the reference / test oracle.

``A = softmax(Q K^T * scale + N)`` (``N`` the RPE mask, e.g. ``rpe.exact_mask(pos)``), key padding
and causal masking by exclusion, ``out = A V``. ``scale`` defaults to ``1/sqrt(d)``.

Einsum letters: b batch, h heads, i/j positions, d head width.
"""

from __future__ import annotations

import math

import torch

__all__ = ["softmax_attention_weights", "softmax_attention"]


def softmax_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention probabilities ``softmax(q k^T scale + bias)`` with exclusions.

    Args:
        q, k: ``[B, H, L, d]``.
        bias: additive mask ``[B, H, L, L]`` (or broadcastable), e.g. the RPE mask ``N``.
        causal: exclude ``j > i``.
        padding_mask: ``[B, L]`` True = pad (excluded as keys).
        scale: logit scale, default ``1/sqrt(d)``.

    Shapes: returns ``[B, H, L, L]`` (fp32 or wider). A row with every key excluded (only a
    fully padded example) becomes uniform instead of NaN.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B,H,L,d], got {tuple(q.shape)} and {tuple(k.shape)}")
    dtype = torch.promote_types(q.dtype, torch.float32)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    B, H, L, _ = q.shape
    if padding_mask is not None and padding_mask.shape != (B, L):
        raise ValueError(f"padding_mask must be [B, L] = {(B, L)}, got {tuple(padding_mask.shape)}")
    # The O(L^2) buffers dominate memory, so update the logits in place: matmul, add and
    # masked_fill do not need their outputs for backward, so this is autograd-safe.
    logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2))
    logits.mul_(scale)
    if bias is not None:
        bias = bias.to(dtype)
        if torch.broadcast_shapes(bias.shape, logits.shape) == logits.shape:
            logits.add_(bias)
        else:
            logits = logits + bias
    neg = torch.finfo(dtype).min
    if padding_mask is not None:
        logits.masked_fill_(padding_mask.bool()[:, None, None, :], neg)
    if causal:
        future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        logits.masked_fill_(future, neg)
    if torch.is_grad_enabled() and logits.requires_grad:
        return torch.softmax(logits, dim=-1)
    # No graph: a softmax in place saves one [B, H, L, L] buffer.
    logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=-1, keepdim=True))


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """Exact RPE attention ``softmax(q k^T/sqrt d + N) v`` (see :func:`softmax_attention_weights`).

    Shapes: ``q, k [B,H,L,d]``, ``v [B,H,L,dv]`` -> ``[B,H,L,dv]`` (fp32 or wider).
    """
    attn = softmax_attention_weights(
        q, k, bias=bias, causal=causal, padding_mask=padding_mask, scale=scale
    )
    if dropout > 0.0 and training:
        attn = torch.nn.functional.dropout(attn, p=dropout, training=True)
    return torch.matmul(attn, v.to(attn.dtype))
