"""FLTCalculator: an ASE calculator whose forces are the gradient of its energy, with ASE's
constraints, optimisers and MD integrators, and batched inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flt_mol import FLTCalculator
from flt_mol.data.oc20 import OC20LMDB, data_to_atoms
from flt_mol.errors import CheckpointError


def _atoms(path, i=0):
    atoms = data_to_atoms(OC20LMDB(path)[i])
    atoms.calc = None
    return atoms


def test_forces_are_finite_differences_of_the_energy_through_ase(s2ef_run):
    calc = FLTCalculator(s2ef_run["ckpt"], dtype=torch.float64)
    atoms = _atoms(s2ef_run["val"])
    atoms.calc = calc
    forces = atoms.get_forces(apply_constraint=False)
    tags = atoms.get_tags()
    eps = 1e-5
    for i, x in ((int(np.flatnonzero(tags == 0)[0]), 0), (int(np.flatnonzero(tags == 1)[0]), 1),
                 (int(np.flatnonzero(tags == 2)[0]), 2)):
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.calc = calc
            moved.positions[i, x] += sign * eps
            energies.append(moved.get_potential_energy())
        fd = -(energies[0] - energies[1]) / (2 * eps)
        assert abs(fd - forces[i, x]) <= 1e-7 + 1e-6 * abs(fd), (i, x, fd, forces[i, x])
    assert calc.get_property("free_energy", atoms) == atoms.get_potential_energy()


def test_fixed_atoms_read_zero_force_through_ase_constraints(s2ef_run):
    atoms = _atoms(s2ef_run["val"])
    atoms.calc = FLTCalculator(s2ef_run["ckpt"])
    fixed = atoms.constraints[0].index
    assert len(fixed) > 0
    assert np.all(atoms.get_forces()[fixed] == 0)
    assert np.abs(atoms.get_forces(apply_constraint=False)[fixed]).max() > 0


def test_predict_many_equals_one_at_a_time(s2ef_run):
    calc = FLTCalculator(s2ef_run["ckpt"], batch_size=3)
    structures = [_atoms(s2ef_run["val"], i) for i in range(4)] + [_atoms(s2ef_run["is2re"], 0)]
    many = calc.predict_many(structures)
    for atoms, got in zip(structures, many):
        atoms.calc = calc
        assert got["energy"] == pytest.approx(atoms.get_potential_energy(), rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(got["forces"], atoms.get_forces(apply_constraint=False), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["BFGS", "FIRE", "LBFGS"])
def test_ase_optimisers_lower_the_energy_and_keep_fixed_atoms(s2ef_run, name):
    from ase import optimize

    atoms = _atoms(s2ef_run["val"], 1)
    atoms.calc = FLTCalculator(s2ef_run["ckpt"], dtype=torch.float64)
    start = atoms.positions.copy()
    e0 = atoms.get_potential_energy()
    getattr(optimize, name)(atoms, logfile=None).run(fmax=1e-4, steps=8)
    fixed = atoms.constraints[0].index
    np.testing.assert_array_equal(atoms.positions[fixed], start[fixed])
    assert atoms.get_potential_energy() < e0


def test_lockstep_relaxation_equals_ase_one_structure_at_a_time(s2ef_run):
    from ase.optimize import BFGS

    from flt_mol.relax import relax_many

    calc = FLTCalculator(s2ef_run["ckpt"], dtype=torch.float64)
    batched = [_atoms(s2ef_run["val"], i) for i in range(3)]
    info = relax_many(calc, batched, optimizer="BFGS", fmax=1e-6, steps=4)
    assert all(r["steps"] == 4 and not r["converged"] for r in info)
    for i, got in enumerate(batched):
        ref = _atoms(s2ef_run["val"], i)
        ref.calc = calc
        BFGS(ref, logfile=None).run(fmax=1e-6, steps=4)
        np.testing.assert_allclose(got.positions, ref.positions, rtol=0, atol=1e-9)
        assert info[i]["energy"] == pytest.approx(ref.get_potential_energy(), abs=1e-9)


def test_nve_conserves_the_models_energy(s2ef_run):
    """Velocity Verlet with the calculator: the total energy stays at the integrator's error."""
    from flt_mol.relax import nve_run

    atoms = _atoms(s2ef_run["val"], 2)
    report = nve_run(atoms, FLTCalculator(s2ef_run["ckpt"], dtype=torch.float64), steps=20, timestep_fs=0.5,
                     temperature_K=300.0)
    kinetic_scale = 1.5 * 8.617e-5 * 300.0  # eV per moving atom
    assert report["max_abs_deviation_ev_per_atom"] < 1e-3 * kinetic_scale
    assert report["moving_atoms"] < report["natoms"] and len(report["energy"]) == 21


def test_refuses_a_checkpoint_of_another_task(files_is2re_ckpt):
    with pytest.raises(CheckpointError, match="S2EF checkpoint"):
        FLTCalculator(files_is2re_ckpt)


@pytest.fixture
def files_is2re_ckpt(tmp_path):
    path = tmp_path / "is2re.pt"
    torch.save({"version": 1, "config": {"task": "is2re"}, "task": {}, "model": {}}, path)
    return path


def test_translation_sensitivity_finds_one_flt_draw_invariant(s2ef_run):
    from flt_mol.calculator import translation_sensitivity

    calc = FLTCalculator(s2ef_run["ckpt"], dtype=torch.float64)
    report = translation_sensitivity(calc, [_atoms(s2ef_run["val"], 0)], shifts=2)
    assert report["n"] == 1 and report["force_norm"] > 0
    # The canonical origin makes one FLT draw translation invariant: float rounding only.
    assert report["energy_std"] < 1e-8 and report["net_force"] < 1e-8 * max(1.0, report["force_norm"])
    assert report["force_change"] < 1e-7


@pytest.fixture(scope="module")
def local_ckpt(s2ef_run, tmp_path_factory):
    """A tiny `context: local` S2EF model (the recipe's context, KD-tree neighbour search) trained
    through `flt-mol train` from a YAML recipe."""
    import yaml

    from flt_mol.cli import main
    from tests.s2ef_fixtures import tiny_s2ef_raw_config

    root = tmp_path_factory.mktemp("s2ef_local")
    raw = tiny_s2ef_raw_config(s2ef_run["train"], s2ef_run["val"])
    raw["model"].update(context="local", context_cutoff=4.0)
    (root / "recipe.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(root / "recipe.yaml"), "--out", str(root / "run")]) == 0
    return root / "run" / "checkpoint.pt"


def test_local_context_checkpoint_is_invariant_end_to_end(local_ckpt, s2ef_run):
    """Through the public door (a checkpoint from `flt-mol train`, energies and forces from
    FLTCalculator, fp64): rotating atoms and cell rotates the forces, and wrapping an atom by a
    lattice vector, translating in the plane and permuting the atoms change nothing."""
    from scipy.spatial.transform import Rotation

    calc = FLTCalculator(local_ckpt, dtype=torch.float64)
    atoms = _atoms(s2ef_run["val"], 0)
    ref = calc.predict_many([atoms])[0]
    assert np.abs(ref["forces"]).max() > 0

    rot = Rotation.from_euler("zyx", [0.7, -0.4, 1.9]).as_matrix()
    rotated = atoms.copy()
    rotated.set_cell(atoms.cell.array @ rot.T)
    rotated.positions = atoms.positions @ rot.T
    wrapped = atoms.copy()
    wrapped.positions[3] += atoms.cell.array[0] - 2 * atoms.cell.array[1]
    shifted = atoms.copy()
    shifted.positions += 0.37 * atoms.cell.array[0] + 0.61 * atoms.cell.array[1]
    perm = np.random.default_rng(0).permutation(len(atoms))
    permuted = atoms[perm]
    got = calc.predict_many([rotated, wrapped, shifted, permuted])
    expected = [ref["forces"] @ rot.T, ref["forces"], ref["forces"], ref["forces"][perm]]
    for name, out, want in zip(["rotation", "wrap", "translation", "permutation"], got, expected):
        assert out["energy"] == pytest.approx(ref["energy"], rel=1e-9, abs=1e-9), name
        np.testing.assert_allclose(out["forces"], want, rtol=1e-7, atol=1e-8, err_msg=name)
