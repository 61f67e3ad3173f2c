"""Small OC20-style LMDBs written with ASE (fcc(111) slab + adsorbate, EMT single points).

No relaxation: ``pos_relaxed`` is the initial structure plus a small deterministic displacement of
the free atoms and ``y_relaxed`` is the EMT energy of that displaced structure minus the clean slab.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
ADSORBATES = ("O", "H", "C", "N")


SIZES = ((2, 2, 3), (3, 2, 3), (2, 2, 4))


def make_items(n: int, *, seed: int = 0, with_targets: bool = True) -> list:
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.emt import EMT
    from ase.constraints import FixAtoms

    from flt_mol.data.oc20 import atoms_to_data

    rng = np.random.default_rng(seed)
    items = []
    for k in range(n):
        metal = METALS[rng.integers(len(METALS))]
        ads = ADSORBATES[rng.integers(len(ADSORBATES))]
        size = SIZES[rng.integers(len(SIZES))]  # structures of different sizes: padding matters
        slab = fcc111(metal, size=size, vacuum=6.0)
        layer = slab.get_tags()  # 1 = top layer ... nlayers = bottom
        clean = slab.copy()
        clean.calc = EMT()
        e_clean = clean.get_potential_energy()
        add_adsorbate(slab, ads, height=1.2 + 0.6 * rng.random(), position=tuple(rng.random(2) * 2.0))
        tags = np.where(layer == 1, 1, 0)
        tags = np.append(tags, 2)
        slab.set_tags(tags)
        nlayers = size[2]
        fixed = [i for i, t in enumerate(layer) if t == nlayers]
        slab.set_constraint(FixAtoms(indices=fixed))
        relaxed = slab.copy()
        free = np.ones(len(slab), dtype=bool)
        free[fixed] = False
        relaxed.positions[free] += 0.1 * rng.standard_normal((int(free.sum()), 3))
        relaxed.calc = EMT()
        y = float(relaxed.get_potential_energy() - e_clean)
        if with_targets:
            data = atoms_to_data(slab, relaxed=relaxed, y_relaxed=y, sid=1000 + k)
        else:
            data = atoms_to_data(slab, sid=1000 + k)
        items.append(data)
    return items


def make_lmdb(path: str | Path, n: int, *, seed: int = 0, with_targets: bool = True) -> Path:
    from flt_mol.data.oc20 import write_lmdb

    path = Path(path)
    write_lmdb(make_items(n, seed=seed, with_targets=with_targets), path, overwrite=True)
    return path


def make_s2ef_items(n: int, *, seed: int = 0) -> list:
    """S2EF frames: the structures of :func:`make_items`, free atoms rattled (0.05 A), with EMT's
    total energy ``y``, ``y_adsorption`` (``y`` minus the clean slab's energy) and ``force``."""
    import torch
    from ase.calculators.emt import EMT

    from flt_mol.data.oc20 import data_to_atoms

    rng = np.random.default_rng(seed + 17)
    items = make_items(n, seed=seed)
    for d in items:
        atoms = data_to_atoms(d)
        free = np.asarray(d.fixed) == 0
        atoms.positions[free] += 0.05 * rng.standard_normal((int(free.sum()), 3))
        atoms.calc = EMT()
        y = float(atoms.get_potential_energy())
        forces = atoms.get_forces(apply_constraint=False)
        d.pos = torch.tensor(atoms.positions, dtype=torch.float32)
        d.y = y
        d.y_adsorption = y - 1.0  # a referenced energy (a constant shift is enough for the code paths)
        d.force = torch.tensor(forces, dtype=torch.float32)
    return items


def make_s2ef_lmdb(path: str | Path, n: int, *, seed: int = 0) -> Path:
    from flt_mol.data.oc20 import write_lmdb

    path = Path(path)
    write_lmdb(make_s2ef_items(n, seed=seed), path, overwrite=True)
    return path
