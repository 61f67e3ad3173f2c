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
from flt_mol.train.representation import predict_structures, representations
from tests.train.helpers import make_items


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
    ref = predict_structures(ckpt, structures, tmp_path, "ref")
    assert np.all(np.isfinite(ref)) and np.ptp(ref) > 0
    rng = np.random.default_rng(0)
    variants = [representations(s, rng) for s in structures]
    assert len(variants[0]) == 7
    for what in variants[0]:
        got = predict_structures(ckpt, [v[what] for v in variants], tmp_path, what)
        assert np.abs(got - ref).max() < 1e-4, (what, np.abs(got - ref).max())


def test_image_token_model_is_not_invariant(tiny_data, structures, tmp_path):
    """Control: the same check fails for the image-token model (a function of the unit cell)."""
    ckpt = _train(tiny_data, tmp_path, "images")
    ref = predict_structures(ckpt, structures, tmp_path, "ref")
    rng = np.random.default_rng(0)
    moved = [representations(s, rng)["adsorbate +a"] for s in structures]
    got = predict_structures(ckpt, moved, tmp_path, "moved")
    assert np.abs(got - ref).max() > 1e-3
