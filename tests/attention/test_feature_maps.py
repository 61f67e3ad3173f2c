"""Kernel feature maps: FAVOR+ unbiasedness, orthogonal blocks, stabilisers, padding, dtypes."""

import math

import pytest
import torch

from flt_mol.attention import (
    EluFeatureMap,
    FavorPlusFeatureMap,
    LearnableReLUFeatureMap,
    ReLUFeatureMap,
    build_feature_map,
    favor_plus_features,
    linear_attention,
    orthogonal_gaussian_matrix,
)
from flt_mol.testing import assert_unbiased


def test_orthogonal_blocks_and_chi_norms():
    d, m = 8, 20
    w = orthogonal_gaussian_matrix(m, d, dtype=torch.float64)
    assert w.shape == (m, d)
    for start in range(0, m, d):
        blk = w[start : start + d]
        unit = blk / blk.norm(dim=1, keepdim=True)
        gram = unit @ unit.T
        torch.testing.assert_close(gram, torch.eye(blk.shape[0], dtype=torch.float64), atol=1e-10, rtol=0)
    # Rows are marginally N(0, I): E|w|^2 = d.
    g = torch.Generator().manual_seed(0)
    sq = torch.stack([orthogonal_gaussian_matrix(16, d, generator=g).pow(2).sum(1) for _ in range(200)])
    assert_unbiased(sq.reshape(200, -1).mean(1, keepdim=True), torch.tensor([float(d)]))


@pytest.mark.parametrize("orthogonal", [True, False])
def test_favor_plus_kernel_unbiased(orthogonal):
    d, m = 6, 16
    q = 0.5 * torch.randn(1, 1, 4, d)
    k = 0.5 * torch.randn(1, 1, 5, d)
    exact = torch.exp(q @ k.transpose(-1, -2))
    g = torch.Generator().manual_seed(1)

    def estimate():
        w = orthogonal_gaussian_matrix(m, d, generator=g) if orthogonal else torch.randn(m, d, generator=g)
        fq = favor_plus_features(q, projection=w, is_query=True, stabilize=False)
        fk = favor_plus_features(k, projection=w, is_query=False, stabilize=False)
        return fq @ fk.transpose(-1, -2)

    assert_unbiased(estimate, exact, num_samples=500)


def test_stabilisers_cancel_in_attention_and_are_per_example():
    d, m = 8, 32
    w = orthogonal_gaussian_matrix(m, d, dtype=torch.float64)
    q = torch.randn(2, 3, 10, d, dtype=torch.float64)
    k = torch.randn(2, 3, 10, d, dtype=torch.float64)
    k[1] *= 3.0  # a second example with larger keys must not affect the first
    v = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    raw = linear_attention(
        favor_plus_features(q, projection=w, is_query=True, stabilize=False).double(),
        favor_plus_features(k, projection=w, is_query=False, stabilize=False).double(),
        v,
    )
    stab = linear_attention(
        favor_plus_features(q, projection=w, is_query=True),
        favor_plus_features(k, projection=w, is_query=False),
        v.float(),
    )
    torch.testing.assert_close(stab.double(), raw, rtol=1e-4, atol=1e-5)
    fk = favor_plus_features(k, projection=w, is_query=False)
    # Per (batch, head) key stabiliser: the max feature of every example is exactly 1/sqrt(m).
    torch.testing.assert_close(fk.amax(dim=(-2, -1)), torch.full((2, 3), 1 / math.sqrt(m), dtype=fk.dtype))


def test_padded_keys_are_zero_and_excluded_from_the_stabiliser():
    d, m = 4, 8
    w = orthogonal_gaussian_matrix(m, d)
    k = torch.randn(1, 2, 6, d)
    pad = torch.tensor([[False, False, False, False, True, True]])
    k_big = k.clone()
    k_big[:, :, 4:] = 1e4  # huge padded keys must not underflow the real ones
    f = favor_plus_features(k_big, projection=w, is_query=False, padding_mask=pad)
    assert torch.all(f[:, :, 4:] == 0)
    ref = favor_plus_features(k[:, :, :4], projection=w, is_query=False)
    torch.testing.assert_close(f[:, :, :4], ref)


def test_large_inputs_stay_finite_and_bf16_inputs_compute_in_fp32():
    w = orthogonal_gaussian_matrix(16, 8)
    x = 1e3 * torch.randn(2, 2, 5, 8)
    for is_query in (True, False):
        f = favor_plus_features(x, projection=w, is_query=is_query)
        assert torch.isfinite(f).all() and f.dtype == torch.float32
        assert float(f.max()) > 0
    f = favor_plus_features(x.bfloat16(), projection=w, is_query=True)
    assert f.dtype == torch.float32


@pytest.mark.parametrize("kernel", ["favor+", "relu", "learnable_relu", "elu+1"])
def test_feature_map_modules(kernel):
    fm = build_feature_map(kernel, 6, 12)
    x = torch.randn(2, 3, 5, 6)
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    fq = fm(x, is_query=True)
    fk = fm(x, is_query=False, padding_mask=pad)
    assert fq.shape[-1] == fm.out_features and torch.all(fq >= 0) and torch.all(fk >= 0)
    assert torch.all(fk[0, :, 4] == 0)
    before = fm(x, is_query=True)
    fm.redraw(torch.Generator().manual_seed(5))
    after = fm(x, is_query=True)
    if kernel in ("favor+", "relu"):
        assert not torch.equal(before, after)
    else:
        assert torch.equal(before, after)
    assert repr(fm)


def test_learnable_relu_has_gradients_and_bad_kernel_raises():
    fm = LearnableReLUFeatureMap(4, 8)
    fm(torch.randn(1, 1, 3, 4), is_query=True).sum().backward()
    assert fm.linear.weight.grad is not None and float(fm.linear.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="kernel"):
        build_feature_map("softmax", 4, 8)
    with pytest.raises(ValueError, match="width"):
        FavorPlusFeatureMap(4, 8)(torch.randn(1, 1, 2, 5), is_query=True)
    with pytest.raises(ValueError, match="padding_mask"):
        ReLUFeatureMap(4, 8)(torch.randn(1, 1, 2, 4), is_query=False, padding_mask=torch.zeros(1, 3, dtype=torch.bool))
    assert EluFeatureMap(4).out_features == 4


@pytest.mark.parametrize("is_query", [True, False])
@pytest.mark.parametrize("stabilize", [True, False])
def test_favor_plus_prefix_equals_the_concatenated_input(is_query, stabilize):
    from flt_mol.attention.feature_maps import favor_plus_prefix

    g = torch.Generator().manual_seed(0)
    p = torch.randn(2, 3, 7, 6, dtype=torch.float64, generator=g) * 0.5
    x = torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=g) * 0.5
    w = orthogonal_gaussian_matrix(12, 10, dtype=torch.float64, generator=g)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    ref = favor_plus_features(torch.cat([p, x], -1), projection=w, is_query=is_query, padding_mask=pad,
                              stabilize=stabilize)
    out = favor_plus_features(x, projection=w, is_query=is_query, padding_mask=pad, stabilize=stabilize,
                              prefix=favor_plus_prefix(p, w))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    # A prefix shared by the batch (leading dimension 1) broadcasts.
    out1 = favor_plus_features(x, projection=w, is_query=is_query, stabilize=stabilize,
                               prefix=favor_plus_prefix(p[:1], w))
    ref1 = favor_plus_features(torch.cat([p[:1].expand_as(p), x], -1), projection=w, is_query=is_query,
                               stabilize=stabilize)
    torch.testing.assert_close(out1, ref1, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="narrower"):
        favor_plus_features(torch.cat([p, x], -1), projection=w, is_query=is_query, prefix=favor_plus_prefix(p, w))
