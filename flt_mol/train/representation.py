"""Same crystal, other representation: does a checkpoint predict the same energy? Measured through
the public commands (``flt-mol convert`` then ``flt-mol predict``), as a user would.

    python -m flt_mol.train.representation CHECKPOINT --data emt:val_id --max-items 200 --out rep.json

Each structure is written as extxyz in its original form and in these equivalent forms (ASE):

* ``adsorbate +a``: every adsorbate atom (tag 2) moved by the first lattice vector;
* ``slab atom -b``: the first slab atom moved by minus the second lattice vector;
* ``shift and wrap``: the structure shifted in-plane by a random fraction of the cell, atoms
  wrapped back into it;
* ``rotation``: rotated with its cell by a random rotation;
* ``permutation``: atoms in a random order;
* ``cell (a, b + a)`` and ``cell -(a, b)``: equivalent in-plane bases.

Reported per form: mean and max ``|E - E_original|`` in eV over the structures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["representations", "main"]


def representations(atoms, rng: np.random.Generator) -> dict:
    """Equivalent representations of a periodic slab (``ase.Atoms``, OC20 tags), by name."""
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
    a.positions = wrap_positions(a.positions + rng.random(2) @ cell[:2], cell, pbc=[True, True, False])
    out["shift and wrap"] = a
    a = atoms.copy()
    a.rotate(rng.random() * 360, v=rng.normal(size=3), rotate_cell=True)
    out["rotation"] = a
    out["permutation"] = atoms[rng.permutation(len(atoms))]
    a = atoms.copy()
    a.set_cell([cell[0], cell[1] + cell[0], cell[2]], scale_atoms=False)
    out["cell (a, b + a)"] = a
    a = atoms.copy()
    a.set_cell([-cell[0], -cell[1], cell[2]], scale_atoms=False)
    out["cell -(a, b)"] = a
    return out


def predict_structures(checkpoint: Path, structures: list, folder: Path, name: str) -> np.ndarray:
    """``flt-mol convert`` the structures (as extxyz), then ``flt-mol predict``; the energies in eV."""
    from ase.io import write

    from flt_mol.cli import main as cli

    stem = "".join(ch if ch.isalnum() else "_" for ch in name)
    xyz, lmdb, npz = folder / f"{stem}.extxyz", folder / f"{stem}.lmdb", folder / f"{stem}.npz"
    write(xyz, structures, format="extxyz")
    if cli(["convert", str(xyz), str(lmdb)]) != 0:
        raise RuntimeError(f"flt-mol convert failed on {xyz}")
    if cli(["predict", str(checkpoint), "--data", str(lmdb), "--out", str(npz)]) != 0:
        raise RuntimeError(f"flt-mol predict failed on {lmdb}")
    return np.load(npz)["energy"]


def measure(checkpoint: Path, structures: list, *, seed: int = 0) -> dict:
    """``{form: {"mean_abs_change_eV", "max_abs_change_eV"}}`` over the structures."""
    rng = np.random.default_rng(seed)
    forms = [representations(s, rng) for s in structures]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ref = predict_structures(checkpoint, structures, folder, "original")
        out = {}
        for name in forms[0]:
            got = predict_structures(checkpoint, [f[name] for f in forms], folder, name)
            change = np.abs(got - ref)
            out[name] = {"mean_abs_change_eV": float(change.mean()), "max_abs_change_eV": float(change.max())}
    return out


def main(argv: list[str] | None = None) -> int:
    from flt_mol.data.oc20 import data_to_atoms
    from flt_mol.train.tasks import open_split

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="trained IS2RE checkpoint")
    p.add_argument("--data", default="emt:val_id", help="structures: an LMDB, a folder of shards or emt:SPLIT")
    p.add_argument("--max-items", type=int, default=200, help="first N structures of --data")
    p.add_argument("--seed", type=int, default=0, help="seed of the random shifts, rotations and permutations")
    p.add_argument("--out", type=Path, default=None, help="also write the result here (JSON)")
    args = p.parse_args(argv)
    ds = open_split(args.data)
    structures = [data_to_atoms(ds[i]) for i in range(min(len(ds), args.max_items))]
    result = {"checkpoint": str(args.checkpoint), "n": len(structures), "forms": measure(args.checkpoint, structures, seed=args.seed)}
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
