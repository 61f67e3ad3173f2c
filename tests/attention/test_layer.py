"""FLTAttention: the three modes, causality, padding, symmetries, convergence, numerics, errors."""

import pytest
import torch
from e3nn import o3

from flt_mol.attention import FLTAttention, GaussianBasisRPE, GaussianMixtureRPE, KernelRPE, LocalRPE
from flt_mol.testing import assert_invariant

B, L, D, H = 2, 12, 16, 2
MODES = ["flt", "performer", "exact"]


def _layer(mode, causal=False, rpe=None, **kw):
    rpe = rpe if rpe is not None else GaussianBasisRPE(H, 3, 3)
    return FLTAttention(D, H, rpe=rpe, mode=mode, causal=causal, **kw).double()


def _inputs(dtype=torch.float64):
    return torch.randn(B, L, D, dtype=dtype), 2.0 * torch.randn(B, L, 3, dtype=dtype)


@pytest.mark.parametrize("mode", MODES)
def test_causality(mode):
    layer = _layer(mode, causal=True)
    x, pos = _inputs()
    y = layer(x, pos)
    x2, pos2 = x.clone(), pos.clone()
    x2[:, 7:] = 5 * torch.randn_like(x2[:, 7:])
    pos2[:, 7:] += 3.0
    y2 = layer(x2, pos2)
    torch.testing.assert_close(y2[:, :7], y[:, :7])
    assert not torch.allclose(y2[:, 7:], y[:, 7:])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_padding_changes_nothing_for_real_tokens(mode, causal):
    layer = _layer(mode, causal=causal)
    x, pos = _inputs()
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, 9:] = True
    pad[1, 5:] = True
    y = layer(x, pos, pad)
    x2, pos2 = x.clone(), pos.clone()
    x2[pad] = 100 * torch.randn_like(x2[pad])
    pos2[pad] = 50 * torch.randn_like(pos2[pad])
    y2 = layer(x2, pos2, pad)
    torch.testing.assert_close(y2[~pad], y[~pad])
    # Same as running the real tokens alone.
    y0 = layer(x[1:, :5], pos[1:, :5])
    torch.testing.assert_close(y[1, :5], y0[0])


@pytest.mark.parametrize("mode", MODES)
def test_permutation_equivariance(mode):
    layer = _layer(mode)
    x, pos = _inputs()
    perm = torch.randperm(L)
    assert_invariant(layer, lambda a, b: (a[:, perm], b[:, perm]), x, pos, out_transform=lambda y: y[:, perm])


@pytest.mark.parametrize("mode", ["flt", "exact"])
def test_translation_and_rotation(mode):
    layer = _layer(mode)
    x, pos = _inputs()
    R = o3.rand_matrix(dtype=torch.float64)
    t = 4.0 * torch.randn(1, 1, 3, dtype=torch.float64)
    assert_invariant(layer, lambda a, b: (a, b + t), x, pos, rtol=1e-5, atol=1e-6)
    if mode == "exact":
        assert_invariant(layer, lambda a, b: (a, b @ R.T), x, pos)
        return
    # With fixed noise, rotating the positions equals rotating the frequencies with them, so the
    # FLT output is rotation invariant in distribution (exactly so for the exact mode above).
    y = layer(x, pos)
    layer.rpe_noise[..., :3] = layer.rpe_noise[..., :3] @ R.T  # the Gaussian part; the last column picks the term
    torch.testing.assert_close(layer(x, pos @ R.T), y, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_flt_converges_to_exact_rpe_attention():
    torch.manual_seed(3)
    rpe = GaussianBasisRPE(H, 2, 3, sampler="mixture", init_peak=1.0)
    exact = FLTAttention(D, H, rpe=rpe, mode="exact").double()
    x, pos = _inputs()
    x = 0.5 * x
    y_ref = exact(x, pos)
    errs = []
    for m, r in [(8, 2), (128, 32), (2048, 512)]:
        flt = FLTAttention(D, H, rpe=rpe, mode="flt", num_kernel_features=m, num_rpe_features=r).double()
        flt.load_state_dict({n: p for n, p in exact.named_parameters()}, strict=False)
        e = []
        for s in range(6):
            flt.redraw_features(torch.Generator().manual_seed(s))
            e.append(float((flt(x, pos) - y_ref).pow(2).mean().sqrt()))
        errs.append(sum(e) / len(e))
    # Error falls like 1/sqrt(features): a 16x step should shrink it by about 4.
    assert errs[0] / errs[1] > 2.0 and errs[1] / errs[2] > 2.0 and errs[0] / errs[2] > 6.0, errs


def test_same_parameters_in_all_modes_and_shared_rpe():
    rpe = GaussianBasisRPE(H, 3, 3)
    layers = [FLTAttention(D, H, rpe=rpe, mode=mode) for mode in MODES]
    names = [{n for n, _ in layer.named_parameters()} for layer in layers]
    assert names[0] == names[1] == names[2]
    stack = torch.nn.ModuleList(layers)
    n_rpe = sum(p.numel() for p in rpe.parameters())
    n_proj = sum(p.numel() for n, p in layers[0].named_parameters() if not n.startswith("rpe."))
    assert sum(p.numel() for p in stack.parameters()) == 3 * n_proj + n_rpe


def test_redraw_is_explicit():
    layer = _layer("flt")
    x, pos = _inputs()
    y1, y2 = layer(x, pos), layer(x, pos)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    layer.redraw_features(torch.Generator().manual_seed(9))
    assert not torch.allclose(layer(x, pos), y1)


@pytest.mark.parametrize("mode", MODES)
def test_attention_weights_reproduce_forward(mode):
    layer = _layer(mode, causal=(mode == "performer"))
    x, pos = _inputs()
    w = layer.attention_weights(x, pos)
    assert w.shape == (B, H, L, L)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, L, dtype=w.dtype))
    _, _, v = layer._project(x)
    out = (w @ v.to(w.dtype)).transpose(1, 2).reshape(B, L, D)
    torch.testing.assert_close(layer.out(out.to(x.dtype)), layer(x, pos))


@pytest.mark.parametrize("kernel", ["favor+", "relu", "learnable_relu", "elu+1"])
@pytest.mark.parametrize("causal", [False, True])
def test_kernels_large_inputs_and_long_sequences_are_finite(kernel, causal):
    layer = FLTAttention(8, 2, rpe=GaussianBasisRPE(2, 2, 3), kernel=kernel, causal=causal, num_kernel_features=16, num_rpe_features=8)
    x = 1e3 * torch.randn(1, 64, 8)
    pos = 1e3 * torch.randn(1, 64, 3)
    assert torch.isfinite(layer(x, pos)).all()
    if kernel == "favor+":
        x = torch.randn(1, 4096, 8)
        pos = 20 * torch.rand(1, 4096, 3)
        y = layer(x, pos)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("sampler", ["mixture", "gaussian"])
def test_gradients_reach_rpe_through_the_layer_and_dropout_is_train_only(sampler):
    rpe = GaussianBasisRPE(H, 3, 3, sampler=sampler)
    layer = FLTAttention(D, H, rpe=rpe, dropout=0.3)
    x, pos = _inputs(torch.float32)
    layer(x, pos).pow(2).sum().backward()
    for name, p in rpe.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
    layer.eval()
    torch.testing.assert_close(layer(x, pos), layer(x, pos), rtol=0, atol=0)
    layer.train()
    assert not torch.allclose(layer(x, pos), layer(x, pos))


@pytest.mark.parametrize("mode", MODES)
@torch.no_grad()
def test_bf16_autocast(mode):
    layer = FLTAttention(D, H, rpe=GaussianBasisRPE(H, 3, 3), mode=mode)
    x, pos = _inputs(torch.float32)
    y32 = layer(x, pos)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x, pos)
    assert torch.isfinite(y16).all()
    rel = float((y16.float() - y32).norm() / y32.norm())
    assert rel < 0.05, rel


@pytest.mark.parametrize("causal", [False, True])
def test_lattice_rpe_layer_keeps_integer_positions(causal):
    layer = FLTAttention(D, H, rpe=LocalRPE(H, 2, 1, lattice=True), causal=causal).double()
    x = torch.randn(B, L, D, dtype=torch.float64)
    tpos = torch.arange(L, dtype=torch.float64)[None, :, None].expand(B, L, 1)
    y = layer(x, tpos)
    torch.testing.assert_close(layer(x, tpos + 7.0), y)  # integer shifts: exactly invariant


def test_other_families_in_the_layer():
    text = FLTAttention(D, H, rpe=LocalRPE(H, 2, 1, lattice=True), causal=True)
    tpos = torch.arange(L).float()[None, :, None].expand(B, L, 1)
    assert torch.isfinite(text(torch.randn(B, L, D), tpos)).all()
    gm = FLTAttention(D, H, rpe=GaussianMixtureRPE(H, 3, 1))
    assert torch.isfinite(gm(torch.randn(B, L, D), tpos)).all()
    img = FLTAttention(D, H, rpe=KernelRPE(H, "laplace", 2))
    assert torch.isfinite(img(torch.randn(B, L, D), torch.randn(B, L, 2))).all()


def test_errors():
    rpe = GaussianBasisRPE(H, 3, 3)
    with pytest.raises(ValueError, match="divisible"):
        FLTAttention(15, 2, rpe=rpe)
    with pytest.raises(ValueError, match="mode"):
        FLTAttention(D, H, rpe=rpe, mode="fast")
    with pytest.raises(ValueError, match="kernel"):
        FLTAttention(D, H, rpe=rpe, kernel="softmax")
    with pytest.raises(ValueError, match="needs an rpe"):
        FLTAttention(D, H, mode="flt")
    with pytest.raises(ValueError, match="num_heads"):
        FLTAttention(D, 4, rpe=rpe)
    with pytest.raises(TypeError, match="SpectralRPE"):
        FLTAttention(D, H, rpe=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="dropout"):
        FLTAttention(D, H, rpe=rpe, dropout=1.0)
    with pytest.raises(ValueError, match="num_rpe_features"):
        FLTAttention(D, H, rpe=rpe, num_rpe_features=0)
    layer = FLTAttention(D, H, rpe=rpe)
    x = torch.randn(B, L, D)
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(B, L, D + 1), torch.randn(B, L, 3))
    with pytest.raises(ValueError, match="pos .* is required"):
        layer(x)
    with pytest.raises(ValueError, match="rpe has dim=3"):
        layer(x, torch.randn(B, L, 2))
    with pytest.raises(ValueError, match="pos must be"):
        layer(x, torch.randn(B, L + 1, 3))
    with pytest.raises(ValueError, match="padding_mask"):
        layer(x, torch.randn(B, L, 3), torch.zeros(B, L + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        layer(x, torch.randn(B, L, 3), torch.zeros(B, L))
    # performer mode ignores the RPE and needs no positions.
    assert FLTAttention(D, H, rpe=rpe, mode="performer")(x).shape == x.shape
    assert "mode='flt'" in repr(layer)


@pytest.mark.parametrize("rpe_factory", [lambda: LocalRPE(2, 3, 1, lattice=True), lambda: GaussianMixtureRPE(2, 3, 1)])
def test_exact_mode_batch_shared_positions_equal_per_example_positions(rpe_factory):
    """An expand-ed (stride-0) position tensor takes the one-mask shortcut; values and gradients
    equal those of the same positions materialised per example."""
    torch.manual_seed(0)
    rpe = rpe_factory()
    attn = FLTAttention(16, 2, rpe=rpe, mode="exact", causal=True)
    x = torch.randn(3, 10, 16)
    shared = torch.arange(10.0).view(1, 10, 1).expand(3, -1, -1)
    assert shared.stride(0) == 0
    outs, grads = [], []
    for pos in (shared, shared.contiguous()):
        attn.zero_grad()
        out = attn(x, pos)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in rpe.parameters()])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", ["favor+", "relu"])
def test_prepared_rpe_features_equal_the_plain_ones_values_and_gradients(kernel):
    layer = _layer("flt", kernel=kernel)
    x, pos = _inputs()
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 9:] = True
    x.requires_grad_(True)

    def run(prepare):
        feats = layer.rpe_features(pos, pad)
        if prepare:
            feats = layer.prepare_rpe(feats)
            assert (feats.query is None) == (kernel == "relu")
        out = layer(x, pos, pad, rpe_features=feats)
        grads = torch.autograd.grad(out[~pad].square().sum(), [x, *layer.rpe.parameters()])
        return out, grads

    out, grads = run(False)
    out_p, grads_p = run(True)
    torch.testing.assert_close(out_p, out, rtol=1e-10, atol=1e-12)
    for g, g_p in zip(grads, grads_p):
        torch.testing.assert_close(g_p, g, rtol=1e-9, atol=1e-12)
