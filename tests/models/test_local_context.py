"""The local, exact context (``model.context: local``, flt_mol.models.local): against the full
lattice sum and a brute-force reference, invariances, continuity across the cutoff, and the S2EF
model's forces with it (fp64)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from e3nn.o3 import rand_matrix

from flt_mol.attention import GaussianBasisRPE
from flt_mol.attention.periodic import PeriodicLattice
from flt_mol.data.collate import collate_atoms
from flt_mol.errors import ConfigError
from flt_mol.models.is2re import IS2REModelConfig, periodic_context_exact
from flt_mol.models.local import (
    cutoff_envelope,
    local_context,
    local_context_exact,
    neighbour_pairs_ase,
    neighbour_pairs_brute,
    neighbour_pairs_kdtree,
)
from flt_mol.models.s2ef import S2EFModel, S2EFModelConfig
from tests.train.helpers import make_items

D64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _setup(L: int = 7):
    """A triclinic 3D cell, an oblique slab and a molecule in one batch, with padding."""
    cell = torch.tensor([[[4.0, 0.3, 0.2], [0.9, 3.7, -0.4], [0.5, 0.6, 4.4]],
                         [[5.1, 0.0, 0.0], [1.7, 4.3, 0.0], [0.3, 0.1, 14.0]],
                         [[0.0] * 3] * 3], dtype=D64)
    pbc = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    pos = torch.randn(3, L, 3, dtype=D64) * 3  # not wrapped into the cell: any image works
    pad = torch.zeros(3, L, dtype=torch.bool)
    pad[1, L - 1] = pad[2, L - 3:] = True
    return cell, pbc, pos, pad


def _basis(C: int = 3, T: int = 2, widths=(0.5, 1.4)):
    rpe = GaussianBasisRPE(C, T, 3, init_scale_range=widths).double()
    with torch.no_grad():
        rpe.amplitude_raw.add_(torch.randn_like(rpe.amplitude_raw))
        rpe.log_scale.add_(0.1 * torch.randn_like(rpe.log_scale))
    return rpe


def _ctx(pos, cell, pbc, pad, rpe, rc, **kw):
    return local_context(pos, PeriodicLattice.from_cell(cell, pbc), amplitudes=rpe.amplitudes, scales=rpe.scales,
                         cutoff=rc, padding_mask=pad, **kw)


def test_envelope_is_flat_inside_and_c1_at_the_cutoff():
    rc = 5.0
    d = torch.tensor([0.0, 1.0, 2.5, 3.75, 5.0, 6.0], dtype=D64, requires_grad=True)
    f = cutoff_envelope(d, rc)
    torch.testing.assert_close(f.detach(), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0, 0.0], dtype=D64))
    (g,) = torch.autograd.grad(f.sum(), d)
    assert abs(float(g[2])) < 1e-12 and abs(float(g[4])) < 1e-12 and float(g[3]) < -0.1


def test_local_context_equals_the_full_lattice_sum_when_widths_fit_inside_rc():
    """Widths <= 0.6 A and rc = 9 A: the Gaussians are < 1e-20 where the envelope starts (4.5 A),
    so the truncated sum is the exact periodic context of DESIGN §7 (own images included)."""
    cell, pbc, pos, pad = _setup()
    rpe = _basis(widths=(0.3, 0.6))
    with torch.no_grad():
        rpe.log_scale.clamp_(max=math.log(0.6))
    lattice = PeriodicLattice.from_cell(cell, pbc)
    ref = periodic_context_exact(rpe, pos, lattice, padding_mask=pad)
    got = _ctx(pos, cell, pbc, pad, rpe, 9.0)
    assert float(ref.detach().abs().max()) > 0.1  # atoms do see their neighbours / own images
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rc", [2.5, 4.0, 6.5])
def test_local_context_equals_the_brute_force_reference(rc):
    cell, pbc, pos, pad = _setup(L=9)
    rpe = _basis()
    lattice = PeriodicLattice.from_cell(cell, pbc)
    ref = local_context_exact(pos, lattice, amplitudes=rpe.amplitudes, scales=rpe.scales, cutoff=rc, padding_mask=pad)
    assert float(ref.detach().abs().max()) > 0.05
    torch.testing.assert_close(_ctx(pos, cell, pbc, pad, rpe, rc), ref, rtol=1e-10, atol=1e-12)
    # The cell-list search (large structures) finds the same pairs.
    pairs = neighbour_pairs_ase(pos, lattice, cutoff=rc, padding_mask=pad)
    torch.testing.assert_close(_ctx(pos, cell, pbc, pad, rpe, rc, pairs=pairs), ref, rtol=1e-10, atol=1e-12)
    brute = neighbour_pairs_brute(pos, lattice, cutoff=rc, padding_mask=pad)
    assert len(pairs) == len(brute)
    # So does the KD-tree (the CPU default): the same pairs, shifts included.
    assert _pair_set(neighbour_pairs_kdtree(pos, lattice, cutoff=rc, padding_mask=pad)) == _pair_set(brute)
    # Padding contributes nothing and gets nothing; each structure alone gives its own rows.
    assert float(ref[pad].abs().max()) == 0.0
    for b in range(3):
        alone = local_context(pos[b:b + 1], PeriodicLattice.from_cell(cell[b:b + 1], pbc[b:b + 1]),
                              amplitudes=rpe.amplitudes, scales=rpe.scales, cutoff=rc, padding_mask=pad[b:b + 1])
        torch.testing.assert_close(alone[0], ref[b], rtol=1e-10, atol=1e-12)


def _pair_set(pairs) -> set:
    shift = torch.round(pairs.shift * 1e6).long().tolist()
    return set(zip(pairs.batch.tolist(), pairs.first.tolist(), pairs.second.tolist(), map(tuple, shift)))


@pytest.mark.parametrize("rc", [1.5, 5.0, 9.0])
def test_kdtree_search_finds_the_brute_force_pairs_in_skewed_cells_with_unwrapped_atoms(rc):
    """Many images (a cutoff of up to 2-3 cells), atoms up to ~3 cells outside the cell, a sharply
    skewed cell, padding: the KD-tree's pairs and shifts equal the brute force's exactly."""
    cell, pbc, pos, pad = _setup(L=30)
    cell[0, 1] = torch.tensor([3.1, 1.2, 0.4], dtype=D64)  # a and b at ~20 degrees
    pos = pos * 3
    lattice = PeriodicLattice.from_cell(cell, pbc)
    brute = neighbour_pairs_brute(pos, lattice, cutoff=rc, padding_mask=pad)
    kd = neighbour_pairs_kdtree(pos, lattice, cutoff=rc, padding_mask=pad)
    assert len(brute) > 0 and len(kd) == len(brute)
    assert _pair_set(kd) == _pair_set(brute)
    # Every pair is inside rc for the input coordinates and none involves padding.
    r = torch.einsum("blx,bxk->blk", pos, lattice.frame)
    d = r[kd.batch, kd.second] - r[kd.batch, kd.first] + kd.shift
    assert float(d.norm(dim=-1).max()) < rc and not bool(pad[kd.batch, kd.first].any() | pad[kd.batch, kd.second].any())


def test_local_context_invariances():
    cell, pbc, pos, pad = _setup()
    rpe = _basis()
    rc = 4.5
    ref = _ctx(pos, cell, pbc, pad, rpe, rc)
    # wrap: every atom by a different lattice vector (periodic axes only)
    n = torch.randint(-3, 4, pos.shape[:2] + (3,)).to(D64) * pbc[:, None, :]
    torch.testing.assert_close(_ctx(pos + torch.einsum("blk,bkx->blx", n, cell), cell, pbc, pad, rpe, rc), ref,
                               rtol=1e-9, atol=1e-10)
    # translation
    torch.testing.assert_close(_ctx(pos + torch.tensor([0.7, -2.1, 1.3], dtype=D64), cell, pbc, pad, rpe, rc), ref,
                               rtol=1e-9, atol=1e-10)
    # rotation with the cell
    rot = rand_matrix(dtype=D64)
    torch.testing.assert_close(_ctx(pos @ rot.T, cell @ rot.T, pbc, pad, rpe, rc), ref, rtol=1e-9, atol=1e-10)
    # permutation (of the atoms before the first padding slot; the rest stay in place)
    perm = torch.cat([torch.randperm(pos.shape[1] - 3), torch.arange(pos.shape[1] - 3, pos.shape[1])])
    torch.testing.assert_close(_ctx(pos[:, perm], cell, pbc, pad[:, perm], rpe, rc), ref[:, perm], rtol=1e-9, atol=1e-10)
    # equivalent cell (a, b + a, c - b) on the periodic structures
    cell2 = cell.clone()
    cell2[:2, 1] = cell[:2, 1] + cell[:2, 0]
    cell2[0, 2] = cell[0, 2] - cell[0, 1]
    torch.testing.assert_close(_ctx(pos, cell2, pbc, pad, rpe, rc), ref, rtol=1e-9, atol=1e-10)


def _dimer_context(d: torch.Tensor, rpe, rc: float) -> torch.Tensor:
    pos = torch.stack([torch.zeros(3, dtype=D64), torch.stack([d, d.new_zeros(()), d.new_zeros(())])])[None]
    pad = torch.zeros(1, 2, dtype=torch.bool)
    return _ctx(pos, torch.zeros(1, 3, 3, dtype=D64), torch.zeros(1, 3, dtype=torch.bool), pad, rpe, rc)[0, 0]


def test_context_and_its_gradient_are_continuous_across_the_cutoff():
    """A dimer pulled through rc: the context goes to 0 with zero slope (no jump in E or F)."""
    rpe = _basis(widths=(1.0, 1.6))  # broad enough that f_c(rc) is far from 0
    rc = 4.0
    vals, grads = [], []
    for x in (rc - 1e-4, rc - 1e-7, rc + 1e-7):
        d = torch.tensor(x, dtype=D64, requires_grad=True)
        c = _dimer_context(d, rpe, rc)
        (g,) = torch.autograd.grad(c.sum(), d)
        vals.append(c.detach())
        grads.append(float(g))
    assert float(rpe.mask(torch.tensor([rc, 0, 0], dtype=D64)).min()) > 1e-3
    assert float(vals[0].abs().max()) < 1e-6 and float(vals[1].abs().max()) < 1e-12
    assert float(vals[2].abs().max()) == 0.0
    assert abs(grads[0]) < 1e-3 and abs(grads[1]) < 1e-6 and grads[2] == 0.0


# --------------------------------------------------------------------------------------------
# The S2EF model with context: local
# --------------------------------------------------------------------------------------------


def tiny(attention: str = "flt", **kw) -> S2EFModel:
    cfg = dict(attention=attention, num_layers=1, embed_dim=16, ffn_dim=32, num_heads=2,
               num_kernel_features=16, num_rpe_features=8, num_kernels=4, blocks=2,
               attention_dropout=0.0, context_channels=4, context_features=16,
               context="local", context_cutoff=4.0)
    cfg.update(kw)
    return S2EFModel(S2EFModelConfig(**cfg)).to(D64).eval()


def batch64(items):
    b = collate_atoms(items)
    return dataclasses.replace(b, pos=b.pos.to(D64), cell=b.cell.to(D64))


@pytest.fixture(scope="module")
def items():
    return make_items(3, seed=5)


def _energy(model, batch):
    with torch.no_grad():
        return model(batch, forces=False)["energy"]


@pytest.mark.parametrize("attention", ["flt", "exact"])
def test_s2ef_forces_with_local_context_equal_finite_differences(items, attention):
    model = tiny(attention)
    batch = batch64(items[:2])
    forces = model(batch)["forces"]
    eps = 1e-5
    tags = batch.tags[0]
    picks = [(0, int((tags == 0).nonzero()[0]), 0), (0, int((tags == 1).nonzero()[0]), 2),
             (0, int((tags == 2).nonzero()[0]), 1), (1, int(batch.natoms[1]) - 1, 2)]
    for b, i, x in picks:
        plus, minus = batch.pos.clone(), batch.pos.clone()
        plus[b, i, x] += eps
        minus[b, i, x] -= eps
        e_p = _energy(model, dataclasses.replace(batch, pos=plus))[b]
        e_m = _energy(model, dataclasses.replace(batch, pos=minus))[b]
        fd = -(e_p - e_m) / (2 * eps)
        assert abs(float(fd) - float(forces[b, i, x])) <= 1e-7 + 1e-6 * abs(float(fd)), (b, i, x)
    assert float(forces.abs().max()) > 0


def test_s2ef_local_model_invariances(items):
    model = tiny("exact")  # exact attention: every part of the model is then exactly invariant
    batch = batch64(items[:2])
    ref = model(batch)
    rot = rand_matrix(dtype=D64)
    moved = batch.pos.clone()
    moved[0, 3] += batch.cell[0, 0] - 2 * batch.cell[0, 1]
    cases = {
        "wrap": (dataclasses.replace(batch, pos=moved), None),
        "translation": (dataclasses.replace(batch, pos=batch.pos + torch.tensor([0.37, -1.21, 0.9], dtype=D64)), None),
        "rotation": (dataclasses.replace(batch, pos=batch.pos @ rot.T, cell=batch.cell @ rot.T), rot),
    }
    for name, (b, r) in cases.items():
        out = model(b)
        torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-9, atol=1e-10, msg=name)
        want = ref["forces"] @ r.T if r is not None else ref["forces"]
        torch.testing.assert_close(out["forces"], want, rtol=1e-7, atol=1e-9, msg=name)
    real = (~batch.padding_mask)[..., None].to(D64)
    assert float((ref["forces"] * real).sum(1).abs().max()) < 1e-9  # no net force


def test_s2ef_energy_is_smooth_when_an_atom_crosses_the_cutoff(items):
    """Pull the adsorbate up through the cutoff of its nearest surface atoms: the energy along the
    path has no jump and the forces are continuous (|F(x + h) - F(x)| = O(h) everywhere)."""
    model = tiny("exact", context_cutoff=3.0)
    batch = batch64(items[:1])
    ads = int((batch.tags[0] == 2).nonzero()[0])
    start = batch.pos[0, ads].clone()
    others = torch.cat([batch.pos[0, :ads], batch.pos[0, ads + 1:int(batch.natoms[0])]])
    heights = torch.linspace(0.0, 3.0, 151, dtype=D64)
    energies, forces = [], []
    for h in heights:
        pos = batch.pos.clone()
        pos[0, ads] = start + torch.tensor([0.0, 0.0, float(h)], dtype=D64)
        out = model(dataclasses.replace(batch, pos=pos))
        energies.append(float(out["energy"][0]))
        forces.append(out["forces"][0, ads].clone())
    # The path crosses rc for some pair (the nearest-neighbour distance grows past 3 A).
    dmin = [(others - (start + torch.tensor([0.0, 0.0, float(h)], dtype=D64))).norm(dim=-1).min() for h in heights]
    assert float(dmin[0]) < 3.0 < float(dmin[-1])
    e = torch.tensor(energies, dtype=D64)
    f = torch.stack(forces)
    step = float(heights[1] - heights[0])
    # Finite differences along the path match -F_z (no jump hidden between samples) ...
    fd = -(e[2:] - e[:-2]) / (2 * step)
    torch.testing.assert_close(fd, f[1:-1, 2], rtol=0.0, atol=5e-3 * max(1.0, float(f[:, 2].abs().max())))
    # ... and the forces never jump from one sample to the next.
    assert float((f[1:] - f[:-1]).abs().max()) < 0.05 * max(1.0, float(f.abs().max()))


def test_local_context_config_rules():
    with pytest.raises(ConfigError, match="context_cutoff"):
        S2EFModelConfig(context="local", context_cutoff=0.0).validate()
    with pytest.raises(ConfigError, match="context_cutoff"):
        S2EFModelConfig(context="local", context_cutoff=-1.0).validate()
    with pytest.raises(ConfigError, match="periodic: reciprocal"):
        IS2REModelConfig(context="local", periodic="images", displacement_head=False).validate()
    with pytest.raises(ConfigError, match="displacement_head"):
        IS2REModelConfig(context="local", periodic="reciprocal").validate()
    with pytest.raises(ConfigError, match="context must be"):
        S2EFModelConfig(context="nearby").validate()
    # Old configs (no context_cutoff) keep their meaning; local widths start inside rc / 3.
    assert S2EFModelConfig().context_cutoff == 6.0
    model = tiny(context_cutoff=3.0)
    assert float(model.context_rpe.scales.max()) <= 1.0 + 1e-6
