"""``flt-mol convert``: extxyz, traj and ASE db inputs to OC20 LMDB."""

from __future__ import annotations

import ase.db
import ase.io
import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc111
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from ase.io.trajectory import Trajectory

from flt_mol.cli import main
from flt_mol.data.oc20 import OC20LMDB


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def run(argv: list[str]) -> int:
    """``flt-mol convert ARGV`` through the command line's own error handling."""
    return main(["convert", *argv])


def slab(i: int):
    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, "O", 1.5 + 0.1 * i, "fcc")
    atoms.set_constraint(FixAtoms(mask=atoms.get_tags() == 3))
    return atoms


def test_extxyz_frames_with_info_keys(tmp_path, capsys):
    frames = []
    for i in range(3):
        atoms = slab(i)
        atoms.info["sid"] = 40 + i
        if i == 0:
            atoms.info["y_relaxed"] = -1.5  # an explicit target wins over the energy
        atoms.new_array("pos_relaxed", atoms.positions + 0.01 * (i + 1))
        atoms.calc = SinglePointCalculator(atoms, energy=2.0 + i)
        frames.append(atoms)
    src = tmp_path / "in.extxyz"
    ase.io.write(src, frames, format="extxyz")
    out = tmp_path / "out.lmdb"
    assert run([str(src), str(out)]) == 0
    assert "wrote 3 structures" in capsys.readouterr().out
    ds = OC20LMDB(out)
    assert len(ds) == 3
    assert [d.sid for d in (ds[0], ds[1], ds[2])] == [40, 41, 42]
    assert [ds[i].y_relaxed for i in range(3)] == [-1.5, 3.0, 4.0]
    assert all("y_init" not in ds[i].keys() for i in range(3))  # the energy went to y_relaxed only
    for i in range(3):
        np.testing.assert_allclose(ds[i].pos.numpy(), frames[i].positions, atol=1e-5)
        np.testing.assert_allclose(
            ds[i].pos_relaxed.numpy(), frames[i].positions + 0.01 * (i + 1), atol=1e-5
        )
        np.testing.assert_array_equal(ds[i].tags.numpy(), frames[i].get_tags())
        np.testing.assert_array_equal(ds[i].fixed.numpy(), frames[i].get_tags() == 3)
    # --index selects frames; --calc-energy routes a frame's own energy.
    out2 = tmp_path / "out2.lmdb"
    assert run([str(src), str(out2), "--index", "1:", "--calc-energy", "y_init"]) == 0
    ds2 = OC20LMDB(out2)
    assert len(ds2) == 2 and ds2[0].y_init == 3.0 and "y_relaxed" not in ds2[0].keys()


def test_traj_is_one_relaxation(tmp_path):
    src = tmp_path / "relax.traj"
    initial = slab(0)
    with Trajectory(src, "w") as traj:
        for step in range(4):
            atoms = initial.copy()
            atoms.positions[-1, 2] += 0.05 * step
            atoms.calc = SinglePointCalculator(atoms, energy=1.0 - 0.25 * step)
            traj.write(atoms)
    out = tmp_path / "out.lmdb"
    assert run([str(src), str(src), str(out)]) == 0  # two inputs: two relaxations
    ds = OC20LMDB(out)
    assert len(ds) == 2 and [ds[0].sid, ds[1].sid] == [0, 1]
    d = ds[0]
    assert d.y_init == 1.0 and d.y_relaxed == 0.25
    np.testing.assert_allclose(d.pos.numpy(), initial.positions, atol=1e-5)
    assert float(d.pos_relaxed[-1, 2] - d.pos[-1, 2]) == pytest.approx(0.15, abs=1e-5)
    assert d.fixed.sum() == 4
    # --mode frames: every frame is a structure
    out2 = tmp_path / "frames.lmdb"
    assert run([str(src), str(out2), "--mode", "frames"]) == 0
    assert len(OC20LMDB(out2)) == 4


def test_ase_db_frames(tmp_path):
    src = tmp_path / "structures.db"
    with ase.db.connect(src) as db:
        for i in range(2):
            atoms = slab(i)
            atoms.calc = SinglePointCalculator(atoms, energy=-3.0 + i)
            db.write(atoms, y_init=5.0 + i)
    out = tmp_path / "out.lmdb"
    assert run([str(src), str(out)]) == 0
    ds = OC20LMDB(out)
    assert [ds[0].y_relaxed, ds[1].y_relaxed] == [-3.0, -2.0]
    assert [ds[0].y_init, ds[1].y_init] == [5.0, 6.0]


def test_clear_errors(tmp_path, capsys):
    out = tmp_path / "out.lmdb"
    assert run([str(tmp_path / "missing.xyz"), str(out)]) == 2
    assert "missing.xyz" in capsys.readouterr().err
    junk = tmp_path / "junk.extxyz"
    junk.write_text("this is not\na structure file\n")
    assert run([str(junk), str(out)]) == 1  # the file exists but is not a structure file
    err = capsys.readouterr().err
    assert "junk.extxyz" in err and "cannot be read" in err
    good = tmp_path / "good.xyz"
    ase.io.write(good, slab(0), format="extxyz")
    assert run([str(good), str(out), "--format", "no-such-format"]) == 2
    assert "no-such-format" in capsys.readouterr().err
    assert not out.exists()
    assert run([str(good), str(out)]) == 0
    assert run([str(good), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert run([str(good), str(out), "--overwrite"]) == 0
