"""RPE families: unbiasedness, the 1/sqrt(r) rate, c bounds, gradients, invariances, errors."""

import math

import numpy as np
import pytest
import torch
from e3nn import o3

from flt_mol.attention import GaussianBasisRPE, GaussianMixtureRPE, KernelRPE, LocalRPE
from flt_mol.attention.rpe import cos_sin, features_from_angles, irwin_hall_pdf, rpe_features
from flt_mol.testing import assert_unbiased


def _cont_pos(dim, L=5, scale=1.0):
    return scale * torch.randn(1, L, dim)


def _lattice_pos(dim, L=6):
    return torch.randint(-4, 5, (1, L, dim)).float()


# (id, factory -> (rpe, pos), split)
CASES = [
    ("gb_gaussian_balanced", lambda: (GaussianBasisRPE(2, 3, 3, sampler="gaussian", init_scale_range=(0.5, 1.0)), _cont_pos(3)), "balanced"),
    ("gb_gaussian_onesided", lambda: (GaussianBasisRPE(2, 3, 3, sampler="gaussian", init_scale_range=(0.5, 1.0)), _cont_pos(3)), "one_sided"),
    ("gb_standard", lambda: (GaussianBasisRPE(2, 2, 3, sampler="standard", init_scale_range=(0.2, 0.3)), _cont_pos(3, scale=0.3)), "auto"),
    ("gb_mixture", lambda: (GaussianBasisRPE(2, 4, 3, sampler="mixture"), _cont_pos(3)), "auto"),
    ("gb_signed", lambda: (GaussianBasisRPE(2, 3, 2, nonnegative=False, sampler="mixture"), _cont_pos(2)), "auto"),
    ("gm_mixture_signed", lambda: (GaussianMixtureRPE(2, 3, 1, init_std=0.1), _cont_pos(1, scale=3.0)), "auto"),
    ("gm_standard", lambda: (GaussianMixtureRPE(2, 2, 2, sampler="standard", init_std=0.5), _cont_pos(2)), "auto"),
    ("gm_nonneg_balanced", lambda: (GaussianMixtureRPE(2, 3, 2, nonnegative=True, init_std=0.2), _cont_pos(2)), "balanced"),
    ("gm_nonneg_onesided", lambda: (GaussianMixtureRPE(2, 3, 2, nonnegative=True, init_std=0.2), _cont_pos(2)), "one_sided"),
    ("local_lattice_1d", lambda: (LocalRPE(2, 3, 1, lattice=True, init_half_width_range=(0.5, 3.0)), _lattice_pos(1)), "auto"),
    ("local_lattice_2d", lambda: (LocalRPE(2, 2, 2, lattice=True, init_half_width_range=(1.3, 2.0)), _lattice_pos(2)), "auto"),
    ("local_cont_k2", lambda: (LocalRPE(2, 2, 1, lattice=False, order=2, init_half_width_range=(0.7, 1.5)), _cont_pos(1)), "auto"),
    ("local_cont_k3_2d", lambda: (LocalRPE(2, 2, 2, lattice=False, order=3, init_half_width_range=(0.7, 1.5)), _cont_pos(2)), "auto"),
    ("kernel_gaussian_balanced", lambda: (KernelRPE(2, "gaussian", 3), _cont_pos(3)), "balanced"),
    ("kernel_gaussian_onesided", lambda: (KernelRPE(2, "gaussian", 3), _cont_pos(3)), "one_sided"),
    ("kernel_laplace", lambda: (KernelRPE(2, "laplace", 2, init_length_scale=0.7), _cont_pos(2)), "auto"),
    ("local_lattice_1d_signed_balanced", lambda: (LocalRPE(2, 3, 1, lattice=True, init_half_width_range=(0.5, 3.0)), _lattice_pos(1)), "signed_balanced"),
    ("gm_mixture_signed_balanced", lambda: (GaussianMixtureRPE(2, 3, 1, init_std=0.1), _cont_pos(1, scale=3.0)), "signed_balanced"),
    ("gb_signed_balanced", lambda: (GaussianBasisRPE(2, 3, 2, nonnegative=False, sampler="mixture"), _cont_pos(2)), "signed_balanced"),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_features_unbiased(case):
    _, factory, split = case
    rpe, pos = factory()
    exact = rpe.exact_mask(pos).detach()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        samples = torch.stack([rpe.estimate_mask(pos, 4, g, split=split) for _ in range(400)])
    assert samples.shape == (400, 1, rpe.num_heads, pos.shape[1], pos.shape[1])
    assert_unbiased(samples, exact, msg=case[0])


def test_unbiasedness_check_detects_a_wrong_split():
    """Using a (not sqrt(a)) on both sides is biased: the same check must fail."""
    rpe = GaussianBasisRPE(2, 3, 3, sampler="mixture", init_peak=3.0)
    pos = _cont_pos(3)
    g = torch.Generator().manual_seed(1)
    samples = []
    with torch.no_grad():
        for _ in range(400):
            xi, a = rpe.sample(rpe.draw_noise(4, g))
            n1, n2 = rpe_features(pos, xi, a**2, balanced=True)
            samples.append(n1 @ n2.transpose(-1, -2))
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(torch.stack(samples), rpe.exact_mask(pos).detach())


@pytest.mark.parametrize("case", CASES[::2] + [CASES[-1]], ids=IDS[::2] + [IDS[-1]])
def test_error_decays_like_inverse_sqrt_r(case):
    _, factory, split = case
    rpe, pos = factory()
    exact = rpe.exact_mask(pos).detach()
    g = torch.Generator().manual_seed(2)
    rs = [4, 16, 64, 256]
    rmse = []
    with torch.no_grad():
        for r in rs:
            err = torch.stack([rpe.estimate_mask(pos, r, g, split=split) - exact for _ in range(40)])
            rmse.append(float(err.pow(2).mean().sqrt()))
    slope = np.polyfit(np.log(rs), np.log(rmse), 1)[0]
    assert abs(slope + 0.5) < 0.12, (case[0], slope, rmse)


def test_c_bound_holds_and_is_finite_or_infinite_as_theory_says():
    families = [
        GaussianBasisRPE(3, 4, 3, sampler="gaussian"),
        GaussianBasisRPE(3, 4, 3, sampler="mixture"),
        GaussianMixtureRPE(3, 3, 2),
        GaussianMixtureRPE(3, 3, 2, sampler="standard", init_std=0.4),
        LocalRPE(3, 2, 1, lattice=True),
        LocalRPE(3, 2, 2, lattice=False, order=2),
        KernelRPE(3, "laplace", 3, init_scale=0.7),
    ]
    g = torch.Generator().manual_seed(3)
    for rpe in families:
        c = rpe.c_bound()
        assert math.isfinite(c), rpe
        with torch.no_grad():
            _, a = rpe.sample(rpe.draw_noise(20000, g))
        assert float(a.abs().max()) <= c * (1 + 1e-4), (rpe, float(a.abs().max()), c)
    assert KernelRPE(2, "gaussian", 1, init_scale=0.7).c_bound() == pytest.approx(0.7)
    # N(0, I) cannot bound g/p once a spectral component is wider than p.
    assert GaussianBasisRPE(2, 2, 3, sampler="standard", init_scale_range=(0.05, 0.1)).c_bound() == math.inf
    assert GaussianMixtureRPE(2, 2, 1, sampler="standard", init_std=1.5).c_bound() == math.inf


def test_learnable_sigma_respects_the_lower_bound():
    rpe = GaussianBasisRPE(2, 3, 3, sampler="gaussian", init_scale_range=(0.3, 2.0))
    with torch.no_grad():
        rpe.sigma_raw.fill_(-30.0)
    s_min = rpe.scales.min(dim=-1).values
    assert torch.all(rpe.sigma >= 1.0 / (2 * math.pi * s_min) - 1e-7)
    assert math.isfinite(rpe.c_bound())


GRAD_CASES = [
    (GaussianBasisRPE(2, 3, 3, sampler="gaussian"), 3, False),
    (GaussianBasisRPE(2, 3, 3), 3, False),
    (GaussianBasisRPE(2, 3, 3, sampler="mixture", nonnegative=False), 3, False),
    (GaussianMixtureRPE(2, 3, 2), 2, False),
    (LocalRPE(2, 3, 1, lattice=True, init_half_width_range=(1.5, 3.5)), 1, True),
    (LocalRPE(2, 2, 2, lattice=False, order=2), 2, False),
    (KernelRPE(2, "gaussian", 3), 3, False),
    (KernelRPE(2, "laplace", 1), 1, False),
]


@pytest.mark.parametrize("rpe,dim,lattice", GRAD_CASES, ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else None)
def test_gradients_reach_every_parameter(rpe, dim, lattice):
    pos = _lattice_pos(dim, 7) if lattice else _cont_pos(dim, 7)
    noise = rpe.draw_noise(8)
    n1, n2 = rpe.features(pos, 8, noise=noise)
    w = torch.randn(1, 2, 7, 7)
    (w * (n1 @ n2.transpose(-1, -2))).sum().backward()
    for name, p in rpe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().sum()) > 0, name
    # The exact mask is differentiable too (the reference path of exact mode).
    rpe.zero_grad()
    (w * rpe.exact_mask(pos)).sum().backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in rpe.parameters() if p.grad is not None)


def test_learnable_sigma_gets_gradient():
    rpe = GaussianBasisRPE(2, 3, 3, sampler="gaussian")
    pos = _cont_pos(3, 7)
    n1, n2 = rpe.features(pos, 8, noise=rpe.draw_noise(8))
    ((n1 @ n2.transpose(-1, -2)) ** 2).sum().backward()
    assert float(rpe.sigma_raw.grad.abs().sum()) > 0


def test_gaussian_basis_mask_rotation_translation_invariant():
    rpe = GaussianBasisRPE(3, 4, 3, sampler="gaussian")
    pos = torch.randn(2, 9, 3) * 3
    R = o3.rand_matrix()
    t = torch.randn(1, 1, 3) * 5
    exact = rpe.exact_mask(pos)
    torch.testing.assert_close(rpe.exact_mask(pos @ R.T), exact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rpe.exact_mask(pos + t), exact, rtol=1e-5, atol=1e-6)
    delta = torch.randn(50, 3)
    torch.testing.assert_close(rpe.mask(delta @ R.T), rpe.mask(delta), rtol=1e-5, atol=1e-6)
    # The estimate with fixed noise: exactly translation invariant; rotating positions equals
    # rotating the frequencies the other way (so it is rotation invariant in distribution).
    noise = rpe.draw_noise(16)
    est = rpe.estimate_mask(pos, 16, noise=noise)
    torch.testing.assert_close(rpe.estimate_mask(pos + t, 16, noise=noise), est, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rpe.estimate_mask(pos @ R.T, 16, noise=noise @ R.T), est, rtol=1e-4, atol=1e-4)


def test_mask_matches_closed_forms():
    # Gaussian basis: f(0) = sum_t A_t; Kernel: f = C exp(-|x|/ell).
    gb = GaussianBasisRPE(2, 3, 3)
    torch.testing.assert_close(gb.mask(torch.zeros(3)), gb.amplitudes.sum(-1))
    k = KernelRPE(2, "laplace", 2, init_length_scale=2.0, init_scale=0.5)
    x = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(k.mask(x), torch.full((2,), 0.5 * math.exp(-2.5)))
    # Lattice box: 1 inside |n| <= v (integer v), 0 outside; continuous k=2: triangle of half-width 2v.
    loc = LocalRPE(1, 1, 1, lattice=True, init_half_width_range=(2.0, 2.0))
    with torch.no_grad():
        loc.amplitudes.fill_(1.0)
        loc.half_width_raw.fill_(2.0 - 1e-3 + math.log(-math.expm1(-(2.0 - 1e-3))))
    vals = loc.mask(torch.arange(-4.0, 5.0)[:, None])[:, 0]
    torch.testing.assert_close(vals, torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0.0]), atol=1e-4, rtol=0)
    cont = LocalRPE(1, 1, 1, lattice=False, order=2, init_half_width_range=(1.0, 1.0))
    with torch.no_grad():
        cont.amplitudes.fill_(1.0)
    v = float(cont.half_widths.detach()[0, 0, 0])
    x = torch.tensor([[0.0], [v], [2 * v], [3 * v]])
    torch.testing.assert_close(cont.mask(x)[:, 0], torch.tensor([1.0, 0.5, 0.0, 0.0]), atol=1e-5, rtol=0)
    # Irwin-Hall integrates to one.
    y = torch.linspace(-1, 5, 60001, dtype=torch.float64)
    assert abs(float(torch.trapezoid(irwin_hall_pdf(y, 4), y)) - 1.0) < 1e-6


def test_bad_inputs_raise_clear_errors():
    gb = GaussianBasisRPE(2, 3, 3)
    with pytest.raises(ValueError, match="pos must be"):
        gb.features(torch.randn(1, 4, 2), 4)
    with pytest.raises(ValueError, match="pos must be"):
        gb.features(torch.randn(4, 3), 4)
    with pytest.raises(ValueError, match="delta"):
        gb.mask(torch.randn(4, 2))
    with pytest.raises(ValueError, match="num_features"):
        gb.features(torch.randn(1, 4, 3), 0)
    with pytest.raises(ValueError, match="noise must be"):
        gb.features(torch.randn(1, 4, 3), 4, noise=torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="split"):
        gb.features(torch.randn(1, 4, 3), 4, split="both")
    with pytest.raises(ValueError, match="nonnegative"):
        GaussianMixtureRPE(2, 2, 1).features(torch.randn(1, 4, 1), 4, split="balanced")
    with pytest.raises(ValueError, match="integer positions"):
        LocalRPE(2, 2, 1, lattice=True).features(torch.rand(1, 4, 1), 4)
    with pytest.raises(ValueError, match="order"):
        LocalRPE(2, 2, 1, lattice=False, order=1)
    with pytest.raises(ValueError, match="sampler"):
        GaussianBasisRPE(2, 3, 3, sampler="uniform")
    with pytest.raises(ValueError, match="num_kernels"):
        GaussianBasisRPE(2, 0, 3)
    with pytest.raises(ValueError, match="num_heads"):
        KernelRPE(0, "gaussian", 1)
    with pytest.raises(ValueError, match="kernel"):
        KernelRPE(2, "matern7", 1)
    with pytest.raises(ValueError, match="init_scale_range"):
        GaussianBasisRPE(2, 3, 3, init_scale_range=(2.0, 1.0))


def test_initial_mask_is_order_one():
    for rpe, dim in [(GaussianBasisRPE(8, 32, 3), 3), (GaussianMixtureRPE(8, 8, 1), 1), (LocalRPE(8, 4, 1), 1), (KernelRPE(8, "gaussian", 3), 3)]:
        assert float(rpe.mask(torch.zeros(dim)).detach().abs().max()) <= 3.0


def test_row_sums_unbiased_and_translation_invariant():
    """Per-atom context sum_j f_k(r_i - r_j) from K single-term channels, linear in L."""
    rpe = GaussianBasisRPE(4, 1, 3, init_scale_range=(1.0, 1.0))
    pos = 2.0 * torch.randn(2, 6, 3)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    exact = rpe.exact_row_sums(pos, pad).detach()
    assert exact.shape == (2, 6, 4)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        samples = torch.stack([rpe.row_sums(pos, 4, g, padding_mask=pad) for _ in range(400)])
    assert_unbiased(samples, exact)
    noise = rpe.draw_noise(8)
    torch.testing.assert_close(
        rpe.row_sums(pos + 3.0, 8, noise=noise, padding_mask=pad),
        rpe.row_sums(pos, 8, noise=noise, padding_mask=pad), rtol=1e-4, atol=1e-4,
    )


@pytest.mark.parametrize("init_peak", [0.1, 1.0, 5.0])
def test_signed_balanced_split_has_smaller_norms(init_peak):
    """Same draw, same estimate n1 . n2 (exactly), and |n1|^2 + |n2|^2 never above the one-sided split's
    (2|a| <= a^2 + 1 per feature): the quantity FAVOR+'s variance grows with."""
    rpe = LocalRPE(3, 4, 1, lattice=True, init_half_width_range=(1.0, 8.0), init_peak=init_peak)
    pos = torch.arange(40.0).view(1, 40, 1)
    noise = rpe.draw_noise(16, torch.Generator().manual_seed(0))
    with torch.no_grad():
        o1, o2 = rpe.features(pos, 16, noise=noise, split="one_sided")
        s1, s2 = rpe.features(pos, 16, noise=noise, split="signed_balanced")
    torch.testing.assert_close(s1 @ s2.transpose(-1, -2), o1 @ o2.transpose(-1, -2), rtol=1e-4, atol=1e-5)
    one_sided = o1.pow(2).sum(-1) + o2.pow(2).sum(-1)
    signed = s1.pow(2).sum(-1) + s2.pow(2).sum(-1)
    assert bool((signed <= one_sided + 2e-4).all())


def test_signed_balanced_split_gradients_are_finite_at_zero_weight():
    rpe = LocalRPE(2, 2, 1, lattice=True)
    with torch.no_grad():
        rpe.amplitudes.zero_()
    n1, n2 = rpe.features(torch.arange(6.0).view(1, 6, 1), 4, split="signed_balanced")
    (n1 @ n2.transpose(-1, -2)).sum().backward()
    assert torch.isfinite(rpe.amplitudes.grad).all() and torch.isfinite(rpe.half_width_raw.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cos_sin_matches_the_two_ops_and_their_concatenation(dtype):
    torch.manual_seed(0)
    ang = (40.0 * torch.randn(3, 5, 4, 7, dtype=dtype)).transpose(1, 2)  # non-contiguous, large turns
    ref = torch.cat([torch.cos(ang), torch.sin(ang)], dim=-1)
    out = cos_sin(ang)
    assert out.shape == (3, 4, 5, 14) and out.dtype == dtype
    tol = 4 * torch.finfo(dtype).eps  # NumPy's fp32 kernels: within an ulp or so of torch's
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    assert cos_sin(ang[:, :, :0]).shape == (3, 4, 0, 14)  # no atoms


def test_cos_sin_gradients_to_second_order():
    # Force training differentiates the energy twice: the custom backward must itself be differentiable.
    ang = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cos_sin, (ang,))
    assert torch.autograd.gradgradcheck(cos_sin, (ang,))


def test_cos_sin_works_under_torch_func_transforms():
    """vmap, jacrev, jacfwd and hessian (a user's phonons or batched Jacobians) give what the plain
    cos / sin give."""
    ref = lambda t: torch.cat([torch.cos(t), torch.sin(t)], dim=-1)  # noqa: E731
    energy = lambda f: lambda t: (f(t) * torch.linspace(-1.0, 1.0, 2 * t.shape[-1], dtype=t.dtype)).sum()  # noqa: E731
    for dtype in (torch.float32, torch.float64):
        t = torch.randn(3, 4, dtype=dtype)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        x = torch.randn(3, 5, 4, dtype=dtype)  # mapped over the middle axis
        torch.testing.assert_close(torch.vmap(cos_sin, in_dims=1, out_dims=1)(x), ref(x), **tol)
        torch.testing.assert_close(torch.func.jacrev(cos_sin)(t[0]), torch.func.jacrev(ref)(t[0]), **tol)
        torch.testing.assert_close(torch.func.jacfwd(cos_sin)(t[0]), torch.func.jacfwd(ref)(t[0]), **tol)
        torch.testing.assert_close(torch.func.hessian(energy(cos_sin))(t[0]), torch.func.hessian(energy(ref))(t[0]), **tol)


def test_features_from_angles_keep_their_kernel():
    # n1_i . n2_j = (1/F) sum_f a_f cos(t_if - t_jf), every split (the fused cos/sin must not move it).
    torch.manual_seed(1)
    ang = 3.0 * torch.randn(1, 2, 5, 6, dtype=torch.float64)
    a = torch.randn(1, 2, 6, dtype=torch.float64)
    exact = (a[:, :, None, None, :] * torch.cos(ang[:, :, :, None] - ang[:, :, None, :])).mean(-1)
    for balanced, signed, w in [(False, False, a), (True, True, a), (True, False, a.abs())]:
        n1, n2 = features_from_angles(ang, w, balanced=balanced, signed=signed)
        want = exact if w is a else (w[:, :, None, None, :] * torch.cos(ang[:, :, :, None] - ang[:, :, None, :])).mean(-1)
        torch.testing.assert_close(n1 @ n2.transpose(-1, -2), want, rtol=0, atol=1e-12 if not signed else 1e-9)
