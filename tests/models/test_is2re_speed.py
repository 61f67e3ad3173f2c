"""Fast paths of the reciprocal IS2RE model against their plain forms: the context / displacement
as products on ``[cos, sin]``, the sampler's box masses, and chunked inference (equal up to float
rounding)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flt_mol.attention.periodic import PeriodicLattice, _log_box_mass_tail, log_box_mass, periodic_mixture_log_density
from flt_mol.attention import GaussianBasisRPE
from flt_mol.attention.rpe import features_from_angles
from flt_mol.data.collate import collate_atoms
from flt_mol.models.chunked import chunked_energy, supports_chunked
from flt_mol.models.is2re import (
    IS2REModel,
    IS2REModelConfig,
    periodic_context,
    periodic_context_cs,
    periodic_displacement,
)
from tests.train.helpers import make_items


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**kw) -> IS2REModel:
    cfg = dict(attention="flt", num_layers=2, embed_dim=16, ffn_dim=32, num_heads=2, num_kernel_features=16,
               num_rpe_features=8, num_kernels=4, blocks=2, attention_dropout=0.0, context_channels=4,
               context_features=8, periodic="reciprocal")
    cfg.update(kw)
    return IS2REModel(IS2REModelConfig(**cfg)).eval().double()


def _double(batch):
    return dataclasses.replace(batch, pos=batch.pos.double(), cell=batch.cell.double())


def test_log_box_mass_matches_the_log_space_form_in_every_tail():
    c = torch.randn(20000, dtype=torch.float64) * torch.logspace(-3, 2.5, 20000, dtype=torch.float64)
    w = torch.rand(20000, dtype=torch.float64) * 2 + 1e-4
    s = torch.rand(20000, dtype=torch.float64) + 0.05
    lo, hi = (c - w) / s, (c + w) / s
    flip = lo > 0
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    ref = _log_box_mass_tail(lo, hi)
    assert bool((ref < -700).any()), "the test must reach the far tail"
    torch.testing.assert_close(log_box_mass(c, w, s), ref, rtol=1e-12, atol=1e-11)


def test_mixture_density_matches_the_plain_form():
    k = torch.randn(4, 3, 50, 3, dtype=torch.float64) * 2
    sig = torch.rand(3, 5, dtype=torch.float64) + 0.1
    basis = torch.tril(torch.rand(4, 3, 3, dtype=torch.float64) + 0.5)
    dims = torch.tensor([2, 3, 0, 2])
    s, kk = sig[None, :, None, :, None], k[..., None, :]
    half = 0.5 / torch.diagonal(basis, dim1=-2, dim2=-1)[:, None, None, None, :]
    lo, hi = (kk - half) / s, (kk + half) / s
    flip = lo > 0
    box = _log_box_mass_tail(torch.where(flip, -hi, lo), torch.where(flip, -lo, hi))
    gauss = -0.5 * (kk / s) ** 2 - 0.5 * math.log(2 * math.pi) - torch.log(s)
    snapped = (torch.arange(3)[None, :] < dims[:, None])[:, None, None, None, :]
    ref = torch.logsumexp(torch.where(snapped, box, gauss).sum(-1), -1) - math.log(5)
    torch.testing.assert_close(periodic_mixture_log_density(k, sig, basis, dims), ref, rtol=1e-13, atol=1e-13)


def test_mixture_density_direct_form_equals_the_log_space_form(monkeypatch):
    import flt_mol.attention.periodic as periodic

    g = torch.Generator().manual_seed(3)
    k = torch.randn(4, 3, 50, 3, dtype=torch.float64, generator=g) * 0.3
    sig = torch.rand(3, 5, dtype=torch.float64, generator=g) + 0.1
    basis = torch.tril(torch.rand(4, 3, 3, dtype=torch.float64, generator=g) + 0.5)
    dims = torch.tensor([2, 3, 0, 2])
    ref = periodic._periodic_mixture_log_density_log_space(k, sig, basis, dims)

    def refuse(*args):
        raise AssertionError("moderate frequencies must take the direct form")

    monkeypatch.setattr(periodic, "_periodic_mixture_log_density_log_space", refuse)
    for d in (dims, torch.tensor([2, 2, 2, 2]), torch.tensor([3, 3, 3, 3]), torch.tensor([0, 0, 0, 0])):
        if d is not dims:
            monkeypatch.undo()
            ref = periodic._periodic_mixture_log_density_log_space(k, sig, basis, d)
            monkeypatch.setattr(periodic, "_periodic_mixture_log_density_log_space", refuse)
        torch.testing.assert_close(periodic_mixture_log_density(k, sig, basis, d), ref, rtol=1e-13, atol=1e-13)


def test_context_and_displacement_on_cos_sin_equal_the_feature_forms():
    B, C, L, F = 3, 4, 7, 6
    phase = torch.rand(B, C, L, F, dtype=torch.float64) * 6.3
    a = torch.rand(B, C, F, dtype=torch.float64) + 0.1
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 5:] = True
    k0, f0 = torch.rand(B, C, dtype=torch.float64), torch.rand(C, dtype=torch.float64)
    periodic = torch.tensor([True, False, True])
    n1, n2 = features_from_angles(phase, a, balanced=True)
    cs = torch.cat([torch.cos(phase), torch.sin(phase)], -1)
    torch.testing.assert_close(
        periodic_context_cs(cs, a, k0=k0, f0=f0, periodic=periodic, padding_mask=pad),
        periodic_context(n1, n2, k0=k0, f0=f0, periodic=periodic, padding_mask=pad))
    # The displacement head's sine series, written out element by element.
    kvec = torch.randn(B, C, F, 3, dtype=torch.float64)
    q, key = torch.randn(B, L, C, dtype=torch.float64), torch.randn(B, L, C, dtype=torch.float64)
    keep = (~pad).double()
    diff = phase[:, :, None, :, :] - phase[:, :, :, None, :]  # [B, C, i, j, F]: t_j - t_i
    ref = torch.einsum("bcijf,bcf,bcfx,bjc,bj,bic->bix", torch.sin(diff), (2 * math.pi / F) * a, kvec, key, keep, q)
    ref = ref * keep[..., None]
    got = periodic_displacement(phase, a, kvec, query=q, key=key, padding_mask=pad)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(periodic_displacement(phase, a, kvec, query=q, key=key, padding_mask=pad, cos_sin=cs), ref)


@pytest.mark.parametrize("attention", ["flt", "performer"])
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_energy_equals_the_full_forward(attention, chunk):
    items = make_items(3, seed=5)
    batch = _double(collate_atoms(items))
    assert bool(batch.padding_mask.any()), "padding must be exercised"
    model = tiny(attention=attention)
    assert supports_chunked(model)
    with torch.no_grad():
        full = model(batch)["energy"]
    got = chunked_energy(model, batch, chunk_size=chunk)
    torch.testing.assert_close(got, full, rtol=1e-10, atol=1e-10)


def test_chunked_energy_fp32_and_refusals():
    batch = collate_atoms(make_items(2, seed=6))
    model = tiny().float()
    with torch.no_grad():
        full = model(batch)["energy"]
    torch.testing.assert_close(chunked_energy(model, batch, chunk_size=8), full, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="eval"):
        chunked_energy(model.train(), batch)
    assert not supports_chunked(tiny(periodic="images"))
    assert not supports_chunked(tiny(attention="exact"))


def test_compile_blocks_keeps_parameter_names():
    from flt_mol.train.loop import compile_blocks

    model = tiny()
    keys = list(model.state_dict())
    assert compile_blocks(model) == model.config.num_layers  # lazy: nothing is compiled until called
    assert list(model.state_dict()) == keys


def test_spectrum_moments_at_once_equal_one_at_a_time():
    rpe = GaussianBasisRPE(3, 4, 3).double()
    k = torch.randn(2, 3, 5, 3, dtype=torch.float64)
    both = rpe.periodic_spectrum(k, (0, 2))
    torch.testing.assert_close(both[0], rpe.periodic_spectrum(k, 0), rtol=1e-14, atol=0)
    torch.testing.assert_close(both[1], rpe.periodic_spectrum(k, 2), rtol=1e-14, atol=0)
    # The definition: sum_t A_t s_t^(2 moment / 2) (2 pi s_t^2)^(3/2) exp(-2 pi^2 s_t^2 |k|^2).
    s2, amps = rpe.scales.double() ** 2, rpe.amplitudes.double()
    terms = amps[None, :, None, :] * (2 * math.pi * s2[None, :, None, :]) ** 1.5 * torch.exp(
        -2 * math.pi**2 * s2[None, :, None, :] * (k**2).sum(-1)[..., None])
    torch.testing.assert_close(both[0], terms.sum(-1), rtol=1e-12, atol=0)
    torch.testing.assert_close(both[1], (terms * s2[None, :, None, :]).sum(-1), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="moment"):
        rpe.periodic_spectrum(k, (0, 1))
