"""The S2EF model: forces are the gradient of the energy (fp64 finite differences), rotate with
the structure, ignore lattice wraps and translations, vanish on padding and do not depend on the
rest of the batch."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from flt_mol.data.collate import collate_atoms
from flt_mol.errors import ConfigError
from flt_mol.models.s2ef import S2EFModel, S2EFModelConfig
from tests.train.helpers import make_items

D64 = torch.float64


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def items():
    return make_items(3, seed=5)


def tiny(attention: str = "flt", **kw) -> S2EFModel:
    cfg = dict(attention=attention, num_layers=1, embed_dim=16, ffn_dim=32, num_heads=2,
               num_kernel_features=16, num_rpe_features=8, num_kernels=4, blocks=2,
               attention_dropout=0.0, context_channels=4, context_features=16)
    cfg.update(kw)
    return S2EFModel(S2EFModelConfig(**cfg)).to(D64).eval()


def batch64(items):
    b = collate_atoms(items)
    return replace(b, pos=b.pos.to(D64), cell=b.cell.to(D64))


def _energy(model, batch):
    with torch.no_grad():
        return model(batch, forces=False)["energy"]


@pytest.mark.parametrize("attention", ["flt", "exact"])
def test_forces_equal_finite_differences_of_the_energy(items, attention):
    model = tiny(attention)
    batch = batch64(items[:2])
    forces = model(batch)["forces"]
    eps = 1e-5
    tags = batch.tags[0]
    # a fixed sub-surface atom, a surface atom and the adsorbate of structure 0; the last atom of 1
    picks = [(0, int((tags == 0).nonzero()[0]), 0), (0, int((tags == 1).nonzero()[0]), 2),
             (0, int((tags == 2).nonzero()[0]), 1), (1, int(batch.natoms[1]) - 1, 2)]
    for b, i, x in picks:
        plus, minus = batch.pos.clone(), batch.pos.clone()
        plus[b, i, x] += eps
        minus[b, i, x] -= eps
        fd = -(_energy(model, replace(batch, pos=plus))[b] - _energy(model, replace(batch, pos=minus))[b]) / (2 * eps)
        assert abs(float(fd) - float(forces[b, i, x])) <= 1e-7 + 1e-6 * abs(float(fd)), (b, i, x, float(fd), float(forces[b, i, x]))
    assert float(forces.abs().max()) > 0


def _rotated(items, rot):
    out = []
    for d in items:
        d = d.clone()
        d.pos = d.pos.double() @ rot.T
        d.cell = d.cell.double() @ rot.T
        out.append(d)
    return out


@pytest.mark.parametrize("attention", ["flt", "performer", "exact"])
def test_forces_rotate_with_the_structure_and_its_cell(items, attention):
    from e3nn.o3 import rand_matrix

    model = tiny(attention)
    rot = rand_matrix(dtype=D64)
    a = model(batch64(items))
    b = model(batch64(_rotated(items, rot)))
    torch.testing.assert_close(b["energy"], a["energy"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(b["forces"], a["forces"] @ rot.T, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("attention", ["flt", "performer", "exact"])
def test_wrapping_an_atom_by_a_lattice_vector_changes_nothing(items, attention):
    model = tiny(attention)
    batch = batch64(items[:2])
    cell = batch.cell
    moved = batch.pos.clone()
    moved[0, 3] += cell[0, 0] - 2 * cell[0, 1]  # an in-plane lattice vector
    moved[1, -1] += 3 * cell[1, 1]
    a, b = model(batch), model(replace(batch, pos=moved))
    torch.testing.assert_close(b["energy"], a["energy"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b["forces"], a["forces"], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("attention", ["flt", "performer", "exact"])
def test_translation_along_the_normal_changes_nothing(items, attention):
    model = tiny(attention)
    batch = batch64(items[:2])
    shift = torch.tensor([0.0, 0.0, 1.7], dtype=D64)  # the slabs' normal (cell c is along z)
    a, b = model(batch), model(replace(batch, pos=batch.pos + shift))
    torch.testing.assert_close(b["energy"], a["energy"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b["forces"], a["forces"], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("attention", ["performer", "exact"])
def test_in_plane_translation_changes_nothing_and_forces_sum_to_zero(items, attention):
    """Without FAVOR+ on the RPE features (exact attention; Performer has no RPE in attention) the
    energy is exactly translation invariant: forces sum to zero (no net force on the structure)."""
    model = tiny(attention)
    batch = batch64(items[:2])
    shift = torch.tensor([0.37, -1.21, 0.0], dtype=D64)
    a, b = model(batch), model(replace(batch, pos=batch.pos + shift))
    torch.testing.assert_close(b["energy"], a["energy"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(b["forces"], a["forces"], rtol=1e-7, atol=1e-9)
    assert float(a["forces"].sum(1).abs().max()) < 1e-9


def test_flt_in_plane_translation_is_exact_per_draw(items):
    """One FLT draw: the attention features' phases are measured from a canonical origin, so an
    in-plane translation by a fraction of a lattice vector changes neither energy nor forces, and
    the forces sum to zero (the gradient of a translation-invariant energy)."""
    model = tiny("flt")
    batch = batch64(items[:2])
    shift = torch.tensor([0.37, -1.21, 0.0], dtype=D64)
    a, b = model(batch), model(replace(batch, pos=batch.pos + shift))
    torch.testing.assert_close(b["energy"], a["energy"], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(b["forces"], a["forces"], rtol=1e-7, atol=1e-9)
    real = (~batch.padding_mask)[..., None].to(D64)
    net = (a["forces"] * real).sum(1)
    assert float(net.abs().max()) < 1e-8 * max(1.0, float(a["forces"].abs().max()))


def test_forces_vanish_on_padding_and_ignore_the_rest_of_the_batch(items):
    model = tiny("flt")
    big = max(items, key=lambda d: d.pos.shape[0])
    small = min(items, key=lambda d: d.pos.shape[0])
    assert small.pos.shape[0] < big.pos.shape[0]
    alone = model(batch64([small]))
    together = model(batch64([small, big]))
    n = small.pos.shape[0]
    pad = together["forces"][0, n:]
    assert pad.numel() > 0 and float(pad.abs().max()) == 0.0
    torch.testing.assert_close(together["forces"][0, :n], alone["forces"][0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(together["energy"][0], alone["energy"][0], rtol=1e-9, atol=1e-11)


def test_training_mode_keeps_the_graph_of_the_forces(items):
    """A force loss reaches the parameters (double backward) in training mode; eval mode and
    ``torch.no_grad()`` still give forces, without a graph."""
    model = tiny("flt").train()
    batch = batch64(items[:2])
    out = model(batch)
    assert out["forces"].requires_grad
    out["forces"].square().sum().backward()
    grad = model.energy_head[0].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    model.eval()
    with torch.no_grad():
        f = model(batch)["forces"]
    assert not f.requires_grad and float(f.abs().max()) > 0


def test_config_refuses_forces_without_the_periodic_lattice_sums():
    with pytest.raises(ConfigError, match="periodic: reciprocal"):
        S2EFModelConfig(periodic="images").validate()
    with pytest.raises(ConfigError, match="forces"):
        S2EFModelConfig(forces="direct").validate()
    S2EFModelConfig(periodic="images", forces="none").validate()
    model = tiny("flt", forces="none")
    assert model(batch64(make_items(1, seed=2)))["forces"] is None
