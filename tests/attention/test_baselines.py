"""cosFormer and log-linear Performer against their exact quadratic definitions."""

from __future__ import annotations

import math

import pytest
import torch

from flt_mol.attention.feature_maps import favor_plus_features, orthogonal_gaussian_matrix
from flt_mol.attention.baselines import (
    CosFormerAttention,
    LogLinearAttention,
    cosformer_angles,
    cosformer_attention,
    cosformer_attention_exact,
    loglinear_attention,
    loglinear_attention_exact,
    toeplitz_dense,
    toeplitz_matvec,
    toeplitz_softmax_attention_exact,
)

# float64 throughout the identities: the fast and the dense paths are the same sums in another
# order, so they agree to a few ulps of the largest term; 1e-10 leaves room for L ~ 100.
TOL64 = dict(rtol=1e-9, atol=1e-10)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("length", [1, 2, 9, 33])
def test_toeplitz_fft_matches_dense(length):
    coeffs = torch.randn(3, 2 * length - 1, dtype=torch.float64)
    x = torch.randn(2, 3, 4, length, dtype=torch.float64)
    dense = toeplitz_dense(coeffs)
    # Entry check of the dense matrix itself: T_ij = t_{i-j}, t_0 at index L-1.
    i, j = length - 1, 0
    assert dense[1, i, j] == coeffs[1, (i - j) + length - 1]
    ref = (dense[None] @ x.transpose(-1, -2)).transpose(-1, -2)  # T applied along the last axis
    torch.testing.assert_close(toeplitz_matvec(coeffs[:, None], x), ref, **TOL64)


def test_toeplitz_rejects_wrong_length():
    with pytest.raises(ValueError, match="2L-1"):
        toeplitz_matvec(torch.zeros(3, 8), torch.zeros(1, 3, 2, 5))
    with pytest.raises(ValueError, match="odd"):
        toeplitz_dense(torch.zeros(4))


@pytest.mark.parametrize("causal", [False, True])
def test_loglinear_matches_dense_toeplitz(causal):
    b, h, length, m, e = 2, 3, 20, 8, 4
    qf = torch.rand(b, h, length, m, dtype=torch.float64)
    kf = torch.rand(b, h, length, m, dtype=torch.float64)
    v = torch.randn(b, h, length, e, dtype=torch.float64)
    bias = torch.randn(h, 2 * length - 1, dtype=torch.float64)
    fast = loglinear_attention(qf, kf, v, rel_bias=bias, causal=causal)
    ref = loglinear_attention_exact(qf, kf, v, rel_bias=bias, causal=causal)
    torch.testing.assert_close(fast, ref, **TOL64)


def test_loglinear_estimates_toeplitz_softmax():
    """FAVOR+ with the Toeplitz mask is an unbiased estimate of exp(qk/sqrt d + b): averaged over
    independent projections the (unnormalised) numerator matches the exact one within 5 standard
    errors of the Monte-Carlo mean."""
    h, length, d, m, draws = 1, 6, 4, 64, 400
    q = 0.5 * torch.randn(1, h, length, d, dtype=torch.float64)
    k = 0.5 * torch.randn(1, h, length, d, dtype=torch.float64)
    bias = 0.3 * torch.randn(h, 2 * length - 1, dtype=torch.float64)
    exact = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(d) + toeplitz_dense(bias))[0, 0]
    gen = torch.Generator().manual_seed(1)
    samples = []
    for _ in range(draws):
        w = orthogonal_gaussian_matrix(m, d, generator=gen, dtype=torch.float64)
        x_q, x_k = q * d**-0.25, k * d**-0.25
        qf = favor_plus_features(x_q, projection=w, is_query=True).double()
        kf = favor_plus_features(x_k, projection=w, is_query=False).double()
        # Undo the stabilisers to compare unnormalised kernels.
        sq = lambda x: (x @ w.T - 0.5 * x.pow(2).sum(-1, keepdim=True))  # noqa: E731
        qf = qf * torch.exp(sq(x_q).amax(-1, keepdim=True))
        kf = kf * torch.exp(sq(x_k).amax(dim=(-1, -2), keepdim=True))
        a = (qf @ kf.transpose(-1, -2))[0, 0] * torch.exp(toeplitz_dense(bias))[0]
        samples.append(a)
    s = torch.stack(samples)
    se = s.std(dim=0) / math.sqrt(draws)
    assert ((s.mean(0) - exact).abs() <= 5 * se + 1e-12).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_len", [None, 40])
def test_cosformer_matches_quadratic(causal, max_len):
    b, h, length, d = 2, 3, 30, 6
    q, k, v = (torch.randn(b, h, length, d, dtype=torch.float64) for _ in range(3))
    pad = torch.zeros(b, length, dtype=torch.bool)
    pad[1, 22:] = True
    angles = cosformer_angles(length, num_valid=(~pad).sum(1), max_len=max_len, dtype=torch.float64)
    fast = cosformer_attention(q, k, v, angles=angles, key_padding_mask=pad, causal=causal, chunk_size=8)
    ref = cosformer_attention_exact(q, k, v, angles=angles, key_padding_mask=pad, causal=causal)
    torch.testing.assert_close(fast, ref, **TOL64)
    # The definition itself, written out for one entry: A_ij = relu q . relu k cos(pi(i-j)/2M).
    i = 5
    j = int((torch.relu(q[1, 0, i]) @ torch.relu(k[1, 0, : i + 1]).T).argmax())  # a non-zero entry
    mm = 22 if max_len is None else max_len
    a_ij = torch.relu(q[1, 0, i]) @ torch.relu(k[1, 0, j]) * math.cos(math.pi * (i - j) / (2 * mm))
    row = torch.relu(q[1, 0, i]) @ torch.relu(k[1, 0, :22]).T * torch.cos(
        math.pi * (i - torch.arange(22, dtype=torch.float64)) / (2 * mm)
    )
    if causal:
        row = row[: i + 1]
    ref_manual = (row / row.sum()) @ v[1, 0, : row.shape[0]]
    torch.testing.assert_close(fast[1, 0, i], ref_manual, **TOL64)
    assert torch.isclose(row[j], a_ij)


def test_cosformer_angles_bad_length():
    with pytest.raises(ValueError, match="max_len"):
        cosformer_angles(10, num_valid=torch.tensor([10]), max_len=5)


# The modules compute their features in float32 (flt_mol.attention.feature_maps), so outputs of
# O(1) carry ~1e-7 relative rounding per operation; sums over <= 20 keys stay below 1e-5. (The
# log-linear FFT runs in float64 by default; in float32 its rounding, relative to the largest
# channel of the whole sequence, reached ~1e-4 on early causal rows.)
MODULE_TOL = {"cosformer": dict(rtol=1e-5, atol=1e-6), "loglinear": dict(rtol=1e-5, atol=1e-6)}

MODULES = {
    "cosformer": lambda causal: CosFormerAttention(16, 2, causal=causal),
    "loglinear": lambda causal: LogLinearAttention(16, 2, causal=causal, max_len=32, num_features=32),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_causality(name):
    attn = MODULES[name](True).double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    y = attn(x)
    x2 = x.clone()
    # Same scale as the rest: a much larger future would raise the key stabiliser and push the
    # past's features far below the FFT's float32 rounding of the largest channel.
    x2[:, 12:] = torch.randn(2, 8, 16, dtype=torch.float64)
    y2 = attn(x2)
    # Positions before the change are untouched up to rounding (the FAVOR+ key stabiliser is a
    # per-(batch, head) constant that cancels exactly in the ratio).
    torch.testing.assert_close(y2[:, :12], y[:, :12], **MODULE_TOL[name])
    assert not torch.allclose(y2[:, 12:], y[:, 12:])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_padding_equals_unpadded(name, causal):
    attn = MODULES[name](causal).double()
    x = torch.randn(1, 13, 16, dtype=torch.float64)
    ref = attn(x)
    xp = torch.cat([x, torch.randn(1, 5, 16, dtype=torch.float64)], dim=1)
    pad = torch.zeros(1, 18, dtype=torch.bool)
    pad[:, 13:] = True
    out = attn(xp, None, pad)
    torch.testing.assert_close(out[:, :13], ref, **MODULE_TOL[name])
    assert torch.isfinite(out).all()


def test_loglinear_module_rejects_long_input_and_bad_mask():
    attn = LogLinearAttention(16, 2, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        attn(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="padding_mask"):
        attn(torch.randn(1, 4, 16), None, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="divisible"):
        CosFormerAttention(10, 3)


def test_loglinear_redraw_is_explicit():
    attn = LogLinearAttention(16, 2, max_len=8)
    x = torch.randn(1, 8, 16)
    assert torch.equal(attn(x), attn(x))
    before = attn.feature_map.projection.clone()
    attn.redraw_features()
    assert not torch.equal(before, attn.feature_map.projection)


@pytest.mark.parametrize("causal", [False, True])
def test_loglinear_with_exact_features_is_toeplitz_softmax(causal):
    """With features that factor exp(q.k/sqrt d) exactly (kf_j = e_j, qf_i[j] = exp(q_i.k_j/sqrt d)),
    the FFT path must reproduce softmax(q k^T/sqrt d + b_{i-j}) v, the definition it estimates."""
    b, h, length, d = 2, 2, 12, 4
    q, k, v = (torch.randn(b, h, length, d, dtype=torch.float64) for _ in range(3))
    bias = 0.5 * torch.randn(h, 2 * length - 1, dtype=torch.float64)
    qf = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(d))  # [b,h,i,j]: feature j of query i
    kf = torch.eye(length, dtype=torch.float64).expand(b, h, length, length)
    fast = loglinear_attention(qf, kf, v, rel_bias=bias, causal=causal)
    ref = toeplitz_softmax_attention_exact(q, k, v, rel_bias=bias, causal=causal)
    torch.testing.assert_close(fast, ref, **TOL64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_loglinear_feature_chunks_equal_dense_with_gradients(causal, chunk):
    """Chunking the FFT over features (any chunk, also one that does not divide m) changes only
    the memory: values and gradients equal the dense O(L^2) definition."""
    b, h, length, m, e = 2, 2, 17, 7, 3
    inputs = [
        torch.rand(b, h, length, m, dtype=torch.float64),
        torch.rand(b, h, length, m, dtype=torch.float64),
        torch.randn(b, h, length, e, dtype=torch.float64),
        0.5 * torch.randn(h, 2 * length - 1, dtype=torch.float64),
    ]
    grads = []
    for fn in (
        lambda qf, kf, v, bias: loglinear_attention(qf, kf, v, rel_bias=bias, causal=causal, feature_chunk=chunk),
        lambda qf, kf, v, bias: loglinear_attention_exact(qf, kf, v, rel_bias=bias, causal=causal),
    ):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        (out * torch.linspace(-1, 1, e, dtype=torch.float64)).sum().backward()
        grads.append((out.detach(), [t.grad for t in leaves]))
    (fast, g_fast), (ref, g_ref) = grads
    torch.testing.assert_close(fast, ref, **TOL64)
    for a, r in zip(g_fast, g_ref):
        torch.testing.assert_close(a, r, **TOL64)


def test_loglinear_rejects_bad_chunk_and_bias_length():
    qf = kf = torch.rand(1, 1, 4, 2)
    v = torch.randn(1, 1, 4, 3)
    with pytest.raises(ValueError, match="feature_chunk"):
        loglinear_attention(qf, kf, v, rel_bias=torch.zeros(1, 7), feature_chunk=0)
    with pytest.raises(ValueError, match="2L-1"):
        loglinear_attention(qf, kf, v, rel_bias=torch.zeros(1, 5))
    with pytest.raises(ValueError, match="algorithm"):
        LogLinearAttention(16, 2, algorithm="direct")


@pytest.mark.parametrize("causal", [False, True])
def test_loglinear_module_algorithms_are_one_function(causal):
    """fft, dense and auto evaluate the same attention (same parameters, same feature draw)."""
    torch.manual_seed(1)
    ref = LogLinearAttention(16, 2, causal=causal, max_len=24, num_features=8, algorithm="fft").double()
    with torch.no_grad():
        ref.rel_bias.normal_(0.0, 0.5)  # a non-trivial Toeplitz mask
    x = torch.randn(2, 24, 16, dtype=torch.float64)
    out_fft = ref(x)
    for algorithm, dense_max_len in (("dense", 256), ("auto", 256), ("auto", 8)):
        other = LogLinearAttention(16, 2, causal=causal, max_len=24, num_features=8, algorithm=algorithm,
                                   dense_max_len=dense_max_len).double()
        other.load_state_dict(ref.state_dict())
        torch.testing.assert_close(other(x), out_fft, **TOL64)
