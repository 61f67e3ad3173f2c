"""Linear attention (bidirectional, chunked causal) and exact softmax attention."""

import math

import pytest
import torch

from flt_mol.attention import (
    causal_linear_attention,
    linear_attention,
    linear_attention_weights,
    softmax_attention,
    softmax_attention_weights,
)


def _feats(B=2, H=3, L=11, m=5, d=4, dtype=torch.float64):
    q = torch.rand(B, H, L, m, dtype=dtype) + 0.1
    k = torch.rand(B, H, L, m, dtype=dtype) + 0.1
    v = torch.randn(B, H, L, d, dtype=dtype)
    return q, k, v


def _naive(q, k, v, causal, pad=None):
    a = q @ k.transpose(-1, -2)
    if causal:
        a = a * torch.ones(a.shape[-1], a.shape[-1], dtype=torch.bool).tril()
    if pad is not None:
        a = a * (~pad)[:, None, None, :]
    return (a @ v) / a.sum(-1, keepdim=True)


def test_bidirectional_matches_the_quadratic_form():
    q, k, v = _feats()
    torch.testing.assert_close(linear_attention(q, k, v), _naive(q, k, v, False))
    torch.testing.assert_close(linear_attention_weights(q, k) @ v, _naive(q, k, v, False))


@pytest.mark.parametrize("chunk", [1, 3, 4, 11, 64])
def test_causal_chunked_matches_the_quadratic_form(chunk):
    q, k, v = _feats()
    pad = torch.zeros(2, 11, dtype=torch.bool)
    pad[1, 8:] = True
    torch.testing.assert_close(causal_linear_attention(q, k, v, chunk_size=chunk), _naive(q, k, v, True))
    got = causal_linear_attention(q, k, v, chunk_size=chunk, padding_mask=pad)
    torch.testing.assert_close(got, _naive(q, k, v, True, pad))


def test_value_keep_scales_numerator_only():
    q, k, v = _feats()
    keep = (torch.rand(2, 3, 11) > 0.3).double() / 0.7
    a = q @ k.transpose(-1, -2)
    ref = ((a * keep[:, :, None, :]) @ v) / a.sum(-1, keepdim=True)
    torch.testing.assert_close(linear_attention(q, k, v, value_keep=keep), ref)
    a = a * torch.ones(11, 11, dtype=torch.bool).tril()
    ref = ((a * keep[:, :, None, :]) @ v) / a.sum(-1, keepdim=True)
    torch.testing.assert_close(causal_linear_attention(q, k, v, value_keep=keep, chunk_size=4), ref)


def test_zero_features_give_zero_not_nan():
    q, k, v = _feats()
    q[0, 0, 0] = 0.0
    out = linear_attention(q, k, v)
    assert torch.isfinite(out).all() and torch.all(out[0, 0, 0] == 0)
    out = causal_linear_attention(q, k, v)
    assert torch.isfinite(out).all()


def test_exact_attention_reference():
    B, H, L, d = 2, 2, 7, 4
    q, k, v = (torch.randn(B, H, L, d, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(B, H, L, L, dtype=torch.float64)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 5:] = True
    logits = q @ k.transpose(-1, -2) / math.sqrt(d) + bias
    logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), -math.inf)
    ref = torch.softmax(logits, -1) @ v
    got = softmax_attention(q, k, v, bias=bias, causal=True, padding_mask=pad)
    torch.testing.assert_close(got, ref)
    w = softmax_attention_weights(q, k, bias=bias, causal=True, padding_mask=pad)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, L, dtype=torch.float64))
    # A fully padded example yields finite (uniform) weights, not NaN.
    w = softmax_attention_weights(q, k, padding_mask=torch.ones(B, L, dtype=torch.bool))
    assert torch.isfinite(w).all()


def test_shape_errors():
    q, k, v = _feats()
    with pytest.raises(ValueError, match="expected q, k"):
        linear_attention(q, k[..., :3], v)
    with pytest.raises(ValueError, match="chunk_size"):
        causal_linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="padding_mask"):
        linear_attention(q, k, v, padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="q and k"):
        softmax_attention(q, k[..., :3], v)


def test_inference_paths_match_autograd_paths():
    """The in-place no-grad paths (exact weights, Gaussian-basis mask) equal the autograd ones."""
    from flt_mol.attention import GaussianBasisRPE

    rpe = GaussianBasisRPE(2, 3, 3)
    pos = torch.randn(2, 9, 3)
    q, k = torch.randn(2, 2, 2, 9, 4).unbind(0)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    bias = rpe.exact_mask(pos)
    w = softmax_attention_weights(q, k, bias=bias, causal=True, padding_mask=pad)
    assert bias.requires_grad and w.requires_grad
    with torch.no_grad():
        bias0 = rpe.exact_mask(pos)
        w0 = softmax_attention_weights(q, k, bias=bias0, causal=True, padding_mask=pad)
    torch.testing.assert_close(bias0, bias.detach())
    torch.testing.assert_close(w0, w.detach())
