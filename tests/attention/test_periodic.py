"""Exactly periodic RPE (DESIGN §7): references, unbiasedness, sampler law, per-draw invariances,
gradients, variance bound, and the periodic FLTAttention.

Oracles are real-space lattice sums in fp64 (``gaussian_lattice_sum``).
"""

from __future__ import annotations

import math

import pytest
import torch
from e3nn.o3 import rand_matrix

from flt_mol.attention import FLTAttention, GaussianBasisRPE
from flt_mol.attention.periodic import (
    PeriodicLattice,
    gaussian_fourier_sum,
    gaussian_lattice_sum,
    periodic_mixture_log_density,
    reduce_cell_2d,
    reduce_cell_3d,
    snap_frequencies,
)
from flt_mol.testing import assert_unbiased

D64 = torch.float64
# A triclinic bulk cell and an oblique slab cell (no ties in the reduction: generic lattices).
TRICLINIC = [[4.0, 0.3, 0.2], [0.9, 3.7, -0.4], [0.5, 0.6, 4.4]]
SLAB = [[5.1, 0.0, 0.0], [1.7, 4.3, 0.0], [0.3, 0.1, 14.0]]


def _batch(dtype=D64):
    cell = torch.tensor([TRICLINIC, SLAB, [[0.0] * 3] * 3], dtype=dtype)
    pbc = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    return cell, pbc


def _unimodular(n: int, generator: torch.Generator, moves: int = 6) -> torch.Tensor:
    """A random integer matrix with det +-1 (a product of ``moves`` elementary moves)."""
    U = torch.eye(n, dtype=D64)
    for _ in range(moves):
        i, j = torch.randperm(n, generator=generator)[:2].tolist()
        E = torch.eye(n, dtype=D64)
        E[i, j] = float(torch.randint(-2, 3, (1,), generator=generator))
        U = E @ U
    if bool(torch.rand(1, generator=generator) < 0.5):
        U[0] = -U[0]
    return U


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [False, True])
def test_fourier_series_equals_lattice_sum(signed):
    cell, pbc = _batch()
    lattice = PeriodicLattice.from_cell(cell, pbc)
    amps = torch.tensor([[0.7, 0.3, 0.2], [1.0, 0.5, 0.1]], dtype=D64)
    if signed:
        amps = amps * torch.tensor([1.0, -1.0, 1.0], dtype=D64)
    scales = torch.tensor([[0.8, 1.5, 2.2], [1.0, 2.0, 0.9]], dtype=D64)
    delta = torch.randn(3, 6, 3, dtype=D64) * 4
    real = gaussian_lattice_sum(delta, lattice, amps, scales)
    fourier = gaussian_fourier_sum(delta, lattice, amps, scales)
    torch.testing.assert_close(fourier, real, rtol=0, atol=1e-12)
    # Sanity: the lattice sum is not f itself on periodic rows, and is f on the molecule row.
    f = (amps * torch.exp(-(delta**2).sum(-1)[..., None, None] / (2 * scales**2))).sum(-1)
    assert float((real[:2] - f[:2]).abs().max()) > 1e-3
    torch.testing.assert_close(real[2], f[2], rtol=0, atol=1e-14)


def test_lattice_sum_is_periodic_and_sums_images():
    """f_per(r + a) = f_per(r) and, for a narrow Gaussian, f_per(0) = f(0) + images only."""
    cell, pbc = _batch()
    lattice = PeriodicLattice.from_cell(cell[:2], pbc[:2])
    amps, scales = torch.ones(1, 1, dtype=D64), torch.full((1, 1), 1.3, dtype=D64)
    r = torch.randn(2, 4, 3, dtype=D64)
    shifted = r + lattice.basis[:, None, 0] + 2 * lattice.basis[:, None, 1]
    torch.testing.assert_close(gaussian_lattice_sum(shifted, lattice, amps, scales),
                               gaussian_lattice_sum(r, lattice, amps, scales), rtol=0, atol=1e-13)
    zero = torch.zeros(2, 1, 3, dtype=D64)
    brute = torch.zeros(2, dtype=D64)
    for b in range(2):
        rng = range(-6, 7)
        for i in rng:
            for j in rng:
                for k in (rng if b == 0 else [0]):
                    t = i * cell[b, 0] + j * cell[b, 1] + k * cell[b, 2]
                    brute[b] += torch.exp(-(t**2).sum() / (2 * 1.3**2))
    torch.testing.assert_close(gaussian_lattice_sum(zero, lattice, amps, scales)[:, 0, 0], brute, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Reduction and frames
# --------------------------------------------------------------------------------------------


def test_reduction_spans_the_same_lattice_and_is_reduced():
    g = torch.Generator().manual_seed(3)
    cell = torch.tensor(TRICLINIC, dtype=D64)
    for _ in range(10):
        U = _unimodular(3, g)
        red = reduce_cell_3d((U @ cell)[None])[0]
        M = red @ torch.linalg.inv(cell)  # integer, det +-1
        torch.testing.assert_close(M, torch.round(M), rtol=0, atol=1e-9)
        assert abs(abs(float(torch.linalg.det(M))) - 1) < 1e-9
        assert float(torch.linalg.det(red)) > 0
        torch.testing.assert_close(red, reduce_cell_3d(cell[None])[0], rtol=0, atol=1e-10)
    a = torch.tensor([[5.1, 0.0, 0.0]], dtype=D64)
    b = torch.tensor([[1.7 + 3 * 5.1, 4.3, 0.0]], dtype=D64)
    n = torch.tensor([[0.0, 0.0, 1.0]], dtype=D64)
    ra, rb = reduce_cell_2d(a, b, n)
    assert float(ra.norm()) <= float(rb.norm()) and abs(float((ra * rb).sum())) <= 0.5 * float((ra * ra).sum()) + 1e-12
    assert float((torch.linalg.cross(ra, rb) * n).sum()) > 0


def test_one_periodic_direction_and_degenerate_cells_are_refused():
    cell = torch.tensor([SLAB], dtype=D64)
    with pytest.raises(ValueError, match="one periodic direction"):
        PeriodicLattice.from_cell(cell, torch.tensor([True, False, False]))
    flat = torch.tensor([[[1.0, 0, 0], [2.0, 0, 0], [0, 0, 5.0]]], dtype=D64)
    with pytest.raises(ValueError, match="structure 0: periodic cell is degenerate"):
        PeriodicLattice.from_cell(flat, torch.tensor([True, True, False]))


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------


def test_snapped_frequencies_follow_p_chi_square():
    """Counts of the snapped integer triples match p(m) (closed-form box masses)."""
    from scipy import stats

    cell = torch.tensor([TRICLINIC], dtype=D64) * 0.6  # a small cell: few distinct m carry the mass
    lattice = PeriodicLattice.from_cell(cell, torch.tensor([True, True, True]))
    sigma = torch.tensor([[0.12, 0.3]], dtype=D64)  # [H = 1, T = 2]
    n = 200_000
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 2, (n,), generator=g)
    xi = torch.randn(n, 3, generator=g, dtype=D64) * sigma[0, t][:, None]
    q, k = snap_frequencies(xi[None, None], lattice.basis, lattice.periodic_dims)
    q = q[0, 0].round().long()
    uniq, counts = torch.unique(q, dim=0, return_counts=True)
    k_u = torch.linalg.solve(lattice.basis[0], uniq.double().T).T  # k L^T = q
    p = periodic_mixture_log_density(k_u[None, None], sigma, lattice.basis, lattice.periodic_dims)[0, 0].exp()
    assert float(p.sum()) <= 1.0 + 1e-9
    big = counts >= 20
    expected = p[big] * n
    other_obs = n - float(counts[big].sum())
    other_exp = n - float(expected.sum())
    chi2 = float(((counts[big] - expected) ** 2 / expected).sum()) + (other_obs - other_exp) ** 2 / max(other_exp, 1e-9)
    dof = int(big.sum())
    assert stats.chi2.sf(chi2, dof) > 1e-4, (chi2, dof)
    # k_q lies in the box that snaps to it: snapping k itself returns q.
    q2, _ = snap_frequencies(k_u[None, None], lattice.basis, lattice.periodic_dims)
    torch.testing.assert_close(q2[0, 0], uniq.double())


def _rpe(H=2, T=3, lo=0.7, hi=2.0, **kw):
    return GaussianBasisRPE(H, T, 3, init_scale_range=(lo, hi), **kw).double()


@pytest.mark.parametrize("sampler", ["mixture", "gaussian"])
def test_periodic_mask_is_unbiased(sampler):
    cell, pbc = _batch()
    lattice = PeriodicLattice.from_cell(cell, pbc)
    rpe = _rpe(sampler=sampler)
    pos = torch.randn(3, 5, 3, dtype=D64) * 3
    exact = rpe.exact_mask(pos, lattice=lattice, drop_k0=True).detach()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        samples = torch.stack([rpe.estimate_mask(pos, 8, g, lattice=lattice) for _ in range(1500)])
    assert_unbiased(samples, exact, msg=f"periodic mask ({sampler})")
    # The k = 0 term is what the features leave out: the full f_per differs from it on bulk rows.
    full = rpe.exact_mask(pos, lattice=lattice)
    k0 = rpe.periodic_k0(lattice)
    torch.testing.assert_close(full - exact, k0[:, :, None, None].expand_as(full).to(full.dtype))
    assert float(k0[0].detach().min()) > 0 and float(k0[1:].detach().abs().max()) == 0.0


def test_periodic_row_sums_are_unbiased_with_the_exact_k0_term():
    cell, pbc = _batch()
    rpe = _rpe()
    pos = torch.randn(3, 6, 3, dtype=D64) * 3
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    exact = rpe.exact_row_sums(pos, pad, cell=cell, pbc=pbc).detach()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        samples = torch.stack([rpe.row_sums(pos, 8, g, padding_mask=pad, cell=cell, pbc=pbc) for _ in range(1500)])
    assert_unbiased(samples, exact, msg="periodic row sums")


def test_molecule_rows_match_the_non_periodic_features():
    """A structure with no periodic direction and no cell gets today's features (same noise)."""
    rpe = _rpe()
    pos = torch.randn(1, 5, 3, dtype=D64)
    noise = rpe.draw_noise(8)
    cell = torch.zeros(1, 3, 3, dtype=D64)
    periodic = rpe.estimate_mask(pos, 8, noise=noise, cell=cell, pbc=torch.zeros(3, dtype=torch.bool))
    centred = pos - pos.mean(1, keepdim=True)
    plain = rpe.estimate_mask(centred, 8, noise=noise)
    torch.testing.assert_close(periodic, plain, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Per-draw invariances (same noise)
# --------------------------------------------------------------------------------------------


def _mask(rpe, pos, cell, pbc, noise):
    with torch.no_grad():
        return rpe.estimate_mask(pos, noise.shape[1], noise=noise, cell=cell, pbc=pbc)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_one_draw_is_invariant(dtype, tol):
    cell, pbc = _batch(dtype)
    cell, pbc = cell[:2], pbc[:2]
    rpe = _rpe().to(dtype)
    noise = rpe.draw_noise(16)
    pos = (torch.randn(2, 7, 3, dtype=D64) * 3).to(dtype)
    ref = _mask(rpe, pos, cell, pbc, noise)
    g = torch.Generator().manual_seed(4)

    def close(got, what):
        err = float((got - ref).abs().max())
        assert err < tol, f"{what}: max change {err:.3g} >= {tol}"

    # rotation of cell and positions together
    rot = rand_matrix(dtype=D64).to(dtype)
    close(_mask(rpe, pos @ rot.T, cell @ rot.T, pbc, noise), "rotation")
    # wrapping every atom by random lattice vectors (in-plane only on the slab)
    n = torch.randint(-3, 4, (2, 7, 3), generator=g).to(dtype)
    n[1, :, 2] = 0
    close(_mask(rpe, pos + torch.einsum("blj,bjx->blx", n, cell), cell, pbc, noise), "wrapping")
    # translation
    close(_mask(rpe, pos + torch.randn(1, 1, 3, generator=g, dtype=D64).to(dtype) * 5, cell, pbc, noise), "translation")
    # an equivalent cell: unimodular change of basis (the a-b block on the slab, c kept). In fp32
    # the new cell's own rounding (~1e-7 of its longest vector) moves the fractional coordinates,
    # so long skewed bases (6 moves: vectors ~10x the reduced ones) would measure the input's
    # precision, not the method: two moves there.
    moves = 6 if dtype == torch.float64 else 2
    new = cell.clone()
    new[0] = _unimodular(3, g, moves).to(dtype) @ cell[0]
    U2 = _unimodular(2, g, moves).to(dtype)
    new[1, :2] = U2 @ cell[1, :2]
    close(_mask(rpe, pos, new, pbc, noise), "equivalent cell")
    # (a, b) -> (-a, -b) on the slab: the rotation by pi the antithetic pairs make exact
    flip = cell.clone()
    flip[1, :2] = -cell[1, :2]
    close(_mask(rpe, pos, flip, pbc, noise), "(a, b) -> (-a, -b)")
    # permutation: rows and columns permute
    perm = torch.randperm(7, generator=g)
    got = _mask(rpe, pos[:, perm], cell, pbc, noise)
    close(got[..., perm.argsort(), :][..., perm.argsort()], "permutation")


def test_slab_basis_sign_is_chosen_by_the_structure():
    """(a, b) -> (-a, -b) leaves the features themselves unchanged (FAVOR+ sees features, not only
    the mask): the structure's odd probe picks the in-plane sign. A centrosymmetric arrangement
    (the probe is 0) gives the same features either way."""
    cell, pbc = _batch()
    cell, pbc = cell[1:2], pbc[1:2]
    rpe = _rpe()
    noise = rpe.draw_noise(7)  # odd: the last frequency has no antithetic partner
    pos = torch.randn(1, 6, 3, dtype=D64) * 3
    flip = cell.clone()
    flip[0, :2] = -cell[0, :2]
    with torch.no_grad():
        a, _ = rpe.features(pos, 7, noise=noise, cell=cell, pbc=pbc)
        b, _ = rpe.features(pos, 7, noise=noise, cell=flip, pbc=pbc)
    torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10)
    # and the chosen orientation is a real choice: the mirrored structure gets the other sign
    lattice = PeriodicLattice.from_cell(cell, pbc)
    _, frame = lattice.orient(pos)
    centre = pos.mean(1, keepdim=True)
    turned = 2 * centre - pos  # rotation by pi about the normal through the centre, z kept
    turned[..., 2] = pos[..., 2]
    _, frame2 = lattice.orient(turned)
    assert float((frame[..., :2] + frame2[..., :2]).abs().max()) < 1e-12


# --------------------------------------------------------------------------------------------
# Gradients: unbiased w.r.t. positions, amplitudes and widths
# --------------------------------------------------------------------------------------------


def _exact_scalar(rpe, pos, lattice, w):
    return (rpe.exact_mask(pos, lattice=lattice, drop_k0=True) * w).sum()


def test_gradients_are_unbiased():
    """Mean gradient of the estimate == gradient of the lattice sum (checked against finite
    differences), for positions, amplitudes and widths. The width gradient is unbiased only
    because p (and k) are detached: a pathwise gradient through the snapped k is biased."""
    cell, pbc = _batch()
    cell, pbc = cell[:2], pbc[:2]
    lattice = PeriodicLattice.from_cell(cell, pbc)
    rpe = _rpe(H=1, T=2, lo=0.9, hi=1.8)
    pos = (torch.randn(2, 4, 3, dtype=D64) * 2).requires_grad_(True)
    w = torch.randn(2, 1, 4, 4, dtype=D64)
    params = [pos, rpe.amplitude_raw, rpe.log_scale]
    exact = torch.autograd.grad(_exact_scalar(rpe, pos, lattice, w), params)
    # finite differences of the lattice sum confirm the reference gradient
    eps = 1e-6
    with torch.no_grad():
        for p_, g_ in zip(params, exact):
            idx = (0,) * p_.dim()
            old = p_[idx].item()
            p_[idx] = old + eps
            up = _exact_scalar(rpe, pos, lattice, w)
            p_[idx] = old - eps
            down = _exact_scalar(rpe, pos, lattice, w)
            p_[idx] = old
            assert abs(float((up - down) / (2 * eps)) - float(g_[idx])) < 1e-6
    gen = torch.Generator().manual_seed(7)

    def one():
        est = (rpe.estimate_mask(pos, 8, gen, lattice=lattice) * w).sum()
        return torch.cat([g.flatten() for g in torch.autograd.grad(est, params)])

    samples = torch.stack([one() for _ in range(1500)])
    assert_unbiased(samples, torch.cat([g.flatten() for g in exact]), msg="periodic gradients")


def test_not_detaching_p_biases_the_width_gradient():
    """The failure the rule prevents: weights ``ghat(k) / p_theta(k)`` with ``p`` attached to the
    widths give a width gradient whose mean is off the lattice-sum gradient."""
    cell, pbc = _batch()
    lattice = PeriodicLattice.from_cell(cell[:1], pbc[:1])
    rpe = _rpe(H=1, T=2, lo=0.9, hi=1.8)
    pos = torch.randn(1, 4, 3, dtype=D64) * 2
    w = torch.randn(1, 1, 4, 4, dtype=D64)
    exact = torch.autograd.grad(_exact_scalar(rpe, pos, lattice, w), rpe.log_scale)[0]
    gen = torch.Generator().manual_seed(8)
    from flt_mol.attention.rpe import features_from_angles

    def attached():
        noise = rpe.draw_noise(8, gen)
        draw = rpe.periodic_draw(pos, noise, lattice)
        sigma = 1.0 / (2.0 * math.pi * rpe.scales.double())  # NOT detached
        log_p = periodic_mixture_log_density(draw.k, sigma, lattice.basis, lattice.periodic_dims)
        a = rpe.periodic_spectrum(draw.k) * torch.exp(-log_p - torch.log(lattice.covolume)[:, None, None])
        a = torch.where(draw.zero, torch.zeros_like(a), a)
        n1, n2 = features_from_angles(draw.phase, a, balanced=True)
        est = ((n1 @ n2.transpose(-1, -2)) * w).sum()
        return torch.autograd.grad(est, rpe.log_scale)[0]

    samples = torch.stack([attached() for _ in range(1500)])
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(samples, exact)


# --------------------------------------------------------------------------------------------
# Variance bound on small cells
# --------------------------------------------------------------------------------------------


def test_small_cell_keeps_c_bounded_with_k0_exact():
    """A 4 A cubic cell with widths up to 3 A: max a / f(0) stays about 1.5 with k = 0 handled
    exactly, while the k = 0 weight alone would be ghat(0) / V ~ 7 f(0)."""
    cell = torch.eye(3, dtype=D64)[None] * 4.0
    lattice = PeriodicLattice.from_cell(cell, torch.tensor([True, True, True]))
    rpe = _rpe(H=1, T=1, lo=3.0, hi=3.0)
    f0 = float(rpe.amplitudes.detach().sum())
    g = torch.Generator().manual_seed(9)
    pos = torch.zeros(1, 1, 3, dtype=D64)
    with torch.no_grad():
        a = torch.cat([rpe.periodic_weights(rpe.periodic_draw(pos, rpe.draw_noise(256, g), lattice)).flatten()
                       for _ in range(40)])
    c = float(a.max()) / f0
    assert c < 2.0, c
    k0 = float(rpe.periodic_k0(lattice)) / f0
    assert k0 > 6.0, k0


# --------------------------------------------------------------------------------------------
# FLTAttention on periodic structures
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["flt", "exact"])
def test_periodic_attention_is_wrap_rotation_and_cell_invariant(mode):
    cell, pbc = _batch()
    cell, pbc = cell[:2], pbc[:2]
    rpe = GaussianBasisRPE(2, 3, 3, init_scale_range=(0.7, 2.0))
    attn = FLTAttention(16, 2, rpe=rpe, mode=mode, num_rpe_features=8, num_kernel_features=16).double().eval()
    x = torch.randn(2, 6, 16, dtype=D64)
    pos = torch.randn(2, 6, 3, dtype=D64) * 3
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 5] = True
    with torch.no_grad():
        ref = attn(x, pos, pad, cell=cell, pbc=pbc)
        n = torch.randint(-2, 3, (2, 6, 3)).double()
        n[1, :, 2] = 0
        wrapped = attn(x, pos + torch.einsum("blj,bjx->blx", n, cell), pad, cell=cell, pbc=pbc)
        rot = rand_matrix(dtype=D64)
        rotated = attn(x, pos @ rot.T, pad, cell=cell @ rot.T, pbc=pbc)
        new = cell.clone()
        new[1, 1] = cell[1, 1] + 2 * cell[1, 0]
        equivalent = attn(x, pos, pad, cell=new, pbc=pbc)
        flipped_cell = cell.clone()
        flipped_cell[1, :2] = -cell[1, :2]
        flipped = attn(x, pos, pad, cell=flipped_cell, pbc=pbc)
        translated = attn(x, pos + torch.tensor([0.7, -1.3, 2.1], dtype=D64), pad, cell=cell, pbc=pbc)
        plain = attn(x, pos, pad)
    keep = ~pad
    for got, what in ((wrapped, "wrap"), (rotated, "rotation"), (equivalent, "equivalent cell"),
                      (flipped, "(a, b) -> (-a, -b)"), (translated, "translation")):
        torch.testing.assert_close(got[keep], ref[keep], rtol=1e-9, atol=1e-10, msg=what)
    assert float((plain - ref)[keep].abs().max()) > 1e-4  # the periodic call is a different function


def test_periodic_attention_errors():
    rpe = GaussianBasisRPE(2, 3, 3)
    attn = FLTAttention(16, 2, rpe=rpe, num_rpe_features=8, num_kernel_features=16)
    x, pos = torch.randn(2, 4, 16), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="pbc was given without cell"):
        attn(x, pos, pbc=torch.tensor([True, True, False]))
    with pytest.raises(ValueError, match="cell must be"):
        attn(x, pos, cell=torch.zeros(2, 3, 4))
    causal = FLTAttention(16, 2, rpe=rpe, num_rpe_features=8, num_kernel_features=16, causal=True)
    with pytest.raises(ValueError, match="causal=False"):
        causal(x, pos, cell=torch.eye(3).expand(2, 3, 3) * 5)
    from flt_mol.attention import GaussianMixtureRPE

    gm = GaussianMixtureRPE(2, 2, 3)
    with pytest.raises(NotImplementedError, match="GaussianMixtureRPE has no periodic"):
        gm.features(pos, 4, cell=torch.eye(3) * 5)


def test_periodic_estimate_converges_to_the_lattice_sum():
    """The max-norm error falls like 1/sqrt(r): 64x the frequencies, about 8x less error."""
    cell, pbc = _batch()
    lattice = PeriodicLattice.from_cell(cell[:2], pbc[:2])
    rpe = _rpe()
    pos = torch.randn(2, 10, 3, dtype=D64) * 3
    exact = rpe.exact_mask(pos, lattice=lattice, drop_k0=True).detach()
    g = torch.Generator().manual_seed(11)

    def err(r):
        with torch.no_grad():
            return sum(float((rpe.estimate_mask(pos, r, g, lattice=lattice) - exact).abs().max()) for _ in range(6)) / 6

    small, large = err(8), err(512)
    assert large < small / 4, (small, large)


def test_basis_sign_mode_keeps_the_reduced_basis():
    """``periodic_sign = "basis"`` (smooth in the positions, for potentials): the mask is still
    invariant to (a, b) -> (-a, -b), the features follow the basis; a bad mode is refused."""
    cell, pbc = _batch()
    cell, pbc = cell[1:2], pbc[1:2]
    rpe = _rpe()
    rpe.periodic_sign = "basis"
    noise = rpe.draw_noise(8)
    pos = torch.randn(1, 6, 3, dtype=D64) * 3
    flip = cell.clone()
    flip[0, :2] = -cell[0, :2]
    lat, lat_flip = PeriodicLattice.from_cell(cell, pbc), PeriodicLattice.from_cell(flip, pbc)
    same_basis = bool(torch.allclose(lat.frame, lat_flip.frame))
    with torch.no_grad():
        a, _ = rpe.features(pos, 8, noise=noise, lattice=lat)
        b, _ = rpe.features(pos, 8, noise=noise, lattice=lat_flip)
    torch.testing.assert_close(_mask(rpe, pos, flip, pbc, noise), _mask(rpe, pos, cell, pbc, noise), rtol=1e-9, atol=1e-10)
    assert not same_basis  # the reduction keeps the input's sign here
    assert float((a - b).abs().max()) > 1e-6  # so the features differ; the mask does not
    with pytest.raises(ValueError, match="sign must be"):
        lat.orient(pos, sign="flip")


@pytest.mark.parametrize("sampler", ["mixture", "gaussian"])
@pytest.mark.parametrize("split", ["balanced", "signed_balanced"])
def test_stacked_draws_equal_one_draw_per_noise(sampler, split):
    cell, pbc = _batch()
    lattice = PeriodicLattice.from_cell(cell, pbc)
    rpe = _rpe(H=3, sampler=sampler)
    g = torch.Generator().manual_seed(5)
    pos = torch.randn(3, 6, 3, dtype=D64, generator=g) * 3
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[2, 4:] = True
    noises = [rpe.draw_noise(8, generator=g).double() for _ in range(3)]
    many = rpe.periodic_features_many(pos, noises, lattice, split=split, padding_mask=pad)
    assert len(many) == 3
    for noise, (n1, n2) in zip(noises, many):
        r1, r2 = rpe.features(pos, 8, noise=noise, split=split, lattice=lattice, padding_mask=pad)
        torch.testing.assert_close(n1, r1, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(n2, r2, rtol=1e-12, atol=1e-12)
    # The amplitude and width gradients are those of the separate draws.
    loss = lambda feats: sum((n1 * n2.flip(-2)).sum() for n1, n2 in feats)  # noqa: E731
    params = list(rpe.parameters())
    got = torch.autograd.grad(loss(many), params, allow_unused=True)
    ref = torch.autograd.grad(loss([rpe.features(pos, 8, noise=n, split=split, lattice=lattice, padding_mask=pad)
                                    for n in noises]), params, allow_unused=True)
    assert sum(a is not None for a in got) >= 2  # amplitudes and widths
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="noise must be"):
        rpe.periodic_features_many(pos, [noises[0], noises[0][:, :4]], lattice)


def test_lattice_cache_gives_the_fresh_reduction_and_remembers_rows():
    from flt_mol.attention.periodic import LatticeCache

    cell, pbc = _batch()
    g = torch.Generator().manual_seed(2)
    other = cell.clone()
    other[:2] = torch.einsum("ij,bjk->bik", _unimodular(3, g).double(), cell[:2])  # equivalent cells
    cache = LatticeCache(max_entries=4)

    def same(a, b):
        for name in ("frame", "basis", "periodic_dims", "covolume"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12)

    same(cache(cell, pbc), PeriodicLattice.from_cell(cell, pbc))
    assert len(cache) == 3
    # A batch of remembered rows in another order, and one with a new row.
    perm = torch.tensor([2, 0, 1])
    same(cache(cell[perm], pbc[perm]), PeriodicLattice.from_cell(cell[perm], pbc[perm]))
    assert len(cache) == 3
    mixed = torch.stack([cell[0], other[1], cell[2]])
    same(cache(mixed, pbc), PeriodicLattice.from_cell(mixed, pbc))
    assert len(cache) == 4
    same(cache(other, pbc), PeriodicLattice.from_cell(other, pbc))
    assert len(cache) == 4  # least recently used rows evicted
    # The same cell with other periodic flags is another row.
    flags = pbc.clone()
    flags[1] = True  # the slab's cell read as a 3D crystal
    same(cache(cell, flags), PeriodicLattice.from_cell(cell, flags))
    # Errors name the structure of the batch, cached rows or not.
    bad = torch.stack([cell[0], torch.zeros(3, 3, dtype=D64), cell[0]])
    with pytest.raises(ValueError, match="structure 1"):
        cache(bad, torch.tensor([[True] * 3] * 3))
    # A cell that needs gradients is reduced afresh (nothing remembered).
    before = len(cache)
    grad_cell = (cell + 0.01).requires_grad_(True)
    same(cache(grad_cell, pbc), PeriodicLattice.from_cell(grad_cell, pbc))
    assert len(cache) == before
