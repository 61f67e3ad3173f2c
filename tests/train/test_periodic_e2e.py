"""A physicist's invariances end to end, through the public commands (train, convert, predict):
the same crystal written in another representation gets the same predicted energy from a
``periodic: reciprocal`` model, and not from an image-token model (the control).

Representations (ASE structures written as extxyz, converted with ``flt-mol convert``): the
adsorbate moved by +a, a slab atom moved by -b, the whole structure shifted in-plane by a random
fraction of the cell and wrapped back, rotated with its cell, atoms permuted, and an equivalent
cell ((a, b) -> (a, b + a) and -(a, b)).
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from flt_mol.cli import main
from tests.train.helpers import make_items


def _variants(atoms, rng):
    from ase.geometry import wrap_positions

    cell = np.asarray(atoms.get_cell())
    tags = atoms.get_tags()
    out = {}
    a = atoms.copy()
    a.positions[np.flatnonzero(tags == 2)] += cell[0]
    out["adsorbate +a"] = a
    a = atoms.copy()
    a.positions[np.flatnonzero(tags < 2)[0]] -= cell[1]
    out["slab atom -b"] = a
    a = atoms.copy()
    shift = rng.random(2) @ cell[:2]
    a.positions = wrap_positions(a.positions + shift, cell, pbc=[True, True, False])
    out["shift and wrap"] = a
    a = atoms.copy()
    a.rotate(rng.random() * 360, v=rng.normal(size=3), rotate_cell=True)
    out["rotation"] = a
    a = atoms[rng.permutation(len(atoms))]
    out["permutation"] = a
    a = atoms.copy()
    a.set_cell([cell[0], cell[1] + cell[0], cell[2]], scale_atoms=False)
    out["cell (a, b + a)"] = a
    a = atoms.copy()
    a.set_cell([-cell[0], -cell[1], cell[2]], scale_atoms=False)
    out["cell -(a, b)"] = a
    return out


def _predict(checkpoint, structures, folder, name):
    from ase.io import write

    xyz, lmdb, npz = folder / f"{name}.extxyz", folder / f"{name}.lmdb", folder / f"{name}.npz"
    write(xyz, structures, format="extxyz")
    assert main(["convert", str(xyz), str(lmdb)]) == 0
    assert main(["predict", str(checkpoint), "--data", str(lmdb), "--out", str(npz)]) == 0
    return np.load(npz)["energy"]


@pytest.fixture(scope="module")
def structures():
    from flt_mol.data.oc20 import data_to_atoms

    return [data_to_atoms(d) for d in make_items(4, seed=31)]


def _train(tiny_data, folder, periodic: str):
    from tests.train.conftest import tiny_raw_config

    raw = tiny_raw_config(tiny_data, steps=3, eval_interval=3, ckpt_interval=3)
    raw["model"]["periodic"] = periodic
    raw["data"]["periodic_images"] = periodic == "images"
    recipe = folder / f"{periodic}.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--out", str(folder / periodic)]) == 0
    return folder / periodic / "checkpoint.pt"


def test_reciprocal_predictions_are_invariant_to_the_representation(tiny_data, structures, tmp_path):
    ckpt = _train(tiny_data, tmp_path, "reciprocal")
    ref = _predict(ckpt, structures, tmp_path, "ref")
    assert np.all(np.isfinite(ref)) and np.ptp(ref) > 0
    rng = np.random.default_rng(0)
    variants = [_variants(s, rng) for s in structures]
    for what in variants[0]:
        got = _predict(ckpt, [v[what] for v in variants], tmp_path, what.replace(" ", "_").replace("(", "").replace(")", "").replace(",", ""))
        assert np.abs(got - ref).max() < 1e-4, (what, np.abs(got - ref).max())


def test_image_token_model_is_not_invariant(tiny_data, structures, tmp_path):
    """Control: the same check fails for the image-token model (a function of the unit cell)."""
    ckpt = _train(tiny_data, tmp_path, "images")
    ref = _predict(ckpt, structures, tmp_path, "ref")
    rng = np.random.default_rng(0)
    moved = [_variants(s, rng)["adsorbate +a"] for s in structures]
    got = _predict(ckpt, moved, tmp_path, "moved")
    assert np.abs(got - ref).max() > 1e-3
