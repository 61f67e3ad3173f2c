"""The IS2RE model with ``periodic: reciprocal`` (DESIGN §7): lattice-sum context and displacement
head against real-space references, and per-draw invariances of the whole model (wrapping,
rotation, translation, permutation, equivalent cells, padding / batch composition)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from e3nn.o3 import rand_matrix

from flt_mol.attention import GaussianBasisRPE
from flt_mol.attention.periodic import PeriodicLattice
from flt_mol.attention.rpe import features_from_angles
from flt_mol.data.collate import collate_atoms
from flt_mol.models.is2re import (
    IS2REModel,
    IS2REModelConfig,
    periodic_context,
    periodic_context_exact,
    periodic_displacement,
    periodic_displacement_exact,
)
from flt_mol.testing import assert_unbiased
from tests.train.helpers import make_items

D64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def items():
    return make_items(4, seed=21)


def tiny(attention: str = "flt", **kw) -> IS2REModel:
    cfg = dict(attention=attention, num_layers=1, embed_dim=16, ffn_dim=32, num_heads=2,
               num_kernel_features=16, num_rpe_features=8, num_kernels=4, blocks=2,
               attention_dropout=0.0, context_channels=4, context_features=8, periodic="reciprocal")
    cfg.update(kw)
    model = IS2REModel(IS2REModelConfig(**cfg)).eval()
    torch.nn.init.normal_(model.disp_query.weight, std=0.5)  # a non-zero displacement head
    return model.double()


def _double(batch):
    return dataclasses.replace(batch, pos=batch.pos.double(), cell=batch.cell.double())


def _oblique_slab_items(n: int = 2, seed: int = 0):
    """Random slabs on oblique (generic) plane lattices: no ties in the cell reduction."""
    from ase import Atoms

    from flt_mol.data.oc20 import atoms_to_data

    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        a = torch.tensor([5.3 + k * 0.2, 0.0, 0.0])
        b = torch.tensor([1.9, 4.7 + 0.3 * k, 0.0])
        c = torch.tensor([0.2, -0.1, 16.0])
        cell = torch.stack([a, b, c])
        frac = torch.rand(9 + k, 3, generator=g)
        frac[:, 2] = 0.2 + 0.3 * frac[:, 2]
        numbers = torch.randint(1, 30, (9 + k,), generator=g)
        atoms = Atoms(numbers=numbers.tolist(), scaled_positions=frac.double().numpy(), cell=cell.double().numpy(),
                      pbc=[True, True, False])
        tags = torch.ones(9 + k, dtype=torch.long)
        tags[0] = 2
        tags[-3:] = 0
        atoms.set_tags(tags.numpy())
        out.append(atoms_to_data(atoms, sid=k))
    return out


# --------------------------------------------------------------------------------------------
# Linear forms vs real-space lattice sums
# --------------------------------------------------------------------------------------------


def _periodic_setup():
    cell = torch.tensor([[[4.0, 0.3, 0.2], [0.9, 3.7, -0.4], [0.5, 0.6, 4.4]],
                         [[5.1, 0.0, 0.0], [1.7, 4.3, 0.0], [0.3, 0.1, 14.0]],
                         [[0.0] * 3] * 3], dtype=D64)
    pbc = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    lattice = PeriodicLattice.from_cell(cell, pbc)
    pos = torch.randn(3, 6, 3, dtype=D64) * 3
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 5] = pad[2, 4:] = True
    rpe = GaussianBasisRPE(3, 2, 3, init_scale_range=(0.8, 1.8)).double()
    return rpe, lattice, pos, pad


def test_periodic_context_is_unbiased_and_includes_own_images():
    rpe, lattice, pos, pad = _periodic_setup()
    exact = periodic_context_exact(rpe, pos, lattice, padding_mask=pad).detach()
    g = torch.Generator().manual_seed(3)

    def one():
        draw = rpe.periodic_draw(pos, rpe.draw_noise(8, g), lattice, padding_mask=pad)
        n1, n2 = features_from_angles(draw.phase, rpe.periodic_weights(draw), balanced=True)
        return periodic_context(n1, n2, k0=rpe.periodic_k0(lattice), f0=rpe.amplitudes.sum(-1),
                                periodic=lattice.periodic_dims > 0, padding_mask=pad).detach()

    assert_unbiased(one, exact, num_samples=1500, msg="periodic context")
    # A lone atom in a periodic cell still sees its own images; in a molecule it sees nothing.
    lone = torch.zeros(3, 1, 3, dtype=D64)
    c = periodic_context_exact(rpe, lone, lattice, padding_mask=torch.zeros(3, 1, dtype=torch.bool))
    assert float(c[0].min()) > 1e-3 and float(c[2].abs().max()) == 0.0


def test_periodic_displacement_is_unbiased():
    rpe, lattice, pos, pad = _periodic_setup()
    q = torch.randn(3, 6, 3, dtype=D64)
    k = torch.randn(3, 6, 3, dtype=D64)
    exact = periodic_displacement_exact(rpe, pos, lattice, query=q, key=k, padding_mask=pad).detach()
    g = torch.Generator().manual_seed(4)

    def one():
        draw = rpe.periodic_draw(pos, rpe.draw_noise(8, g), lattice, padding_mask=pad)
        k_lab = torch.einsum("bcfk,bxk->bcfx", draw.k, lattice.frame)
        return periodic_displacement(draw.phase, rpe.periodic_weights(draw, moment=2), k_lab, query=q, key=k,
                                     padding_mask=pad).detach()

    assert_unbiased(one, exact, num_samples=1500, msg="periodic displacement")
    # The exact periodic sum differs from the non-periodic one (images matter) on periodic rows.
    from flt_mol.models.is2re import displacement_sum_exact

    plain = displacement_sum_exact(lambda d: rpe.mask(d), pos=pos, query=q, key=k, padding_mask=pad)
    assert float((plain[:2] - exact[:2]).abs().max()) > 1e-3


# --------------------------------------------------------------------------------------------
# The model, per draw
# --------------------------------------------------------------------------------------------


def _wrap(item, index, shift):
    out = item.clone()
    out.pos = item.pos.clone()
    out.pos[index] += shift
    return out


@pytest.mark.parametrize("attention", ["flt", "performer", "exact"])
def test_reciprocal_model_is_invariant_per_draw(items, attention):
    model = tiny(attention)
    ref_items = items[:3]
    batch = _double(collate_atoms(ref_items))
    assert not bool(batch.is_image.any())  # one token per atom
    with torch.no_grad():
        ref = model(batch)
    g = torch.Generator().manual_seed(1)

    # The data path stores positions and cells in fp32: transformed inputs carry fp32 rounding
    # (~1e-6 A), so comparisons are at fp32 precision although the model runs in fp64.
    def check(new_items, what, *, rot=None, perm=None):
        with torch.no_grad():
            out = model(_double(collate_atoms(new_items)))
        torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-5, atol=1e-5, msg=what)
        disp = ref["displacement"]
        if rot is not None:
            disp = disp @ rot.T
        if perm is not None:
            disp = disp[:, perm]
        real = batch.real_mask
        torch.testing.assert_close(out["displacement"][real], disp[real], rtol=1e-5, atol=1e-5, msg=what)

    # wrapping: adsorbate by +a, a slab atom by -b, every atom by random in-plane lattice vectors
    moved = []
    for d in ref_items:
        cell = d.cell[0]
        e = _wrap(d, len(d.pos) - 1, cell[0])
        e = _wrap(e, 0, -cell[1])
        n = torch.randint(-2, 3, (len(d.pos), 2), generator=g).float()
        e.pos = e.pos + n @ cell[:2]
        moved.append(e)
    check(moved, "wrapping")
    # the whole structure shifted in-plane by a random fraction of the cell, atoms wrapped back
    shifted = []
    for d in ref_items:
        cell = d.cell[0].double()
        frac = torch.linalg.solve(cell.T, d.pos.double().T).T
        frac[:, :2] += torch.rand(2, generator=g, dtype=D64)
        frac[:, :2] -= torch.floor(frac[:, :2])
        e = d.clone()
        e.pos = (frac @ cell).float()
        shifted.append(e)
    check(shifted, "shift and wrap")
    # rotation with the cell (displacements rotate), and translation
    rot = rand_matrix(dtype=D64)
    turned = []
    for d in ref_items:
        e = d.clone()
        e.pos = (d.pos.double() @ rot.T + torch.tensor([1.0, -2.0, 3.0], dtype=D64)).float()
        e.cell = (d.cell.double() @ rot.T).float()
        turned.append(e)
    with torch.no_grad():
        out = model(_double(collate_atoms(turned)))
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-5, atol=1e-5, msg="rotation")
    # permutation of the atoms inside each structure
    n_atoms = min(len(d.pos) for d in ref_items)
    perm = torch.randperm(n_atoms, generator=g)
    permuted = []
    for d in ref_items:
        e = d.clone()
        full = torch.cat([perm, torch.arange(n_atoms, len(d.pos))])
        for key in ("pos", "atomic_numbers", "tags", "fixed", "pos_relaxed"):
            setattr(e, key, getattr(d, key)[full])
        permuted.append(e)
    with torch.no_grad():
        out = model(_double(collate_atoms(permuted)))
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-9, atol=1e-10, msg="permutation")
    torch.testing.assert_close(out["displacement"][:, :n_atoms], ref["displacement"][:, perm], rtol=1e-8, atol=1e-9)
    # an equivalent cell of the hexagonal slabs: (a, b) -> (a, b + a) reduces to the same basis
    equivalent = []
    for d in ref_items:
        e = d.clone()
        e.cell = d.cell.clone()
        e.cell[0, 1] = d.cell[0, 1] + d.cell[0, 0]
        equivalent.append(e)
    check(equivalent, "equivalent cell (b + a)")
    # padding and batch composition: each structure alone gives the same as in the batch
    for i, d in enumerate(ref_items):
        with torch.no_grad():
            alone = model(_double(collate_atoms([d])))
        torch.testing.assert_close(alone["energy"], ref["energy"][i : i + 1], rtol=1e-9, atol=1e-10)


def test_reciprocal_model_equivalent_cells_on_a_generic_lattice():
    """Random unimodular changes of the in-plane basis (and -(a, b)) of oblique slabs."""
    model = tiny("flt")
    base = _oblique_slab_items(2)
    with torch.no_grad():
        ref = model(_double(collate_atoms(base)))["energy"]
    g = torch.Generator().manual_seed(5)
    for trial in range(4):
        new = []
        for d in base:
            U = torch.eye(2, dtype=D64)
            for _ in range(3):
                i, j = torch.randperm(2, generator=g).tolist()
                E = torch.eye(2, dtype=D64)
                E[i, j] = float(torch.randint(-2, 3, (1,), generator=g))
                U = E @ U
            if trial % 2:
                U = -U
            e = d.clone()
            e.cell = d.cell.double().clone()
            e.cell[0, :2] = U @ d.cell[0, :2].double()
            new.append(e)
        with torch.no_grad():
            out = model(_double(collate_atoms(new)))["energy"]
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


def test_images_model_is_not_wrap_invariant(items):
    """Control: the image-token model (today's Graphormer-3D form) changes under the same wrap."""
    from flt_mol.data.collate import PeriodicImages

    model = tiny("flt", periodic="images")
    images = PeriodicImages(cutoff=4.0)
    d = items[0]
    moved = _wrap(d, len(d.pos) - 1, d.cell[0, 0])
    with torch.no_grad():
        a = model(_double(collate_atoms([d], images=images)))["energy"]
        b = model(_double(collate_atoms([moved], images=images)))["energy"]
    assert float((a - b).abs().max()) > 1e-4


def test_reciprocal_config_rules():
    from flt_mol.errors import ConfigError

    with pytest.raises(ConfigError, match="model.periodic"):
        IS2REModelConfig(periodic="ewald").validate()
