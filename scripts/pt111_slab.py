#!/usr/bin/env python
"""Write a periodic Pt(111) slab with one O adsorbate (OC20 tags, bottom layers fixed) for `flt-mol convert`.

    python scripts/pt111_slab.py 500 500 OUT.traj          # 500 x 500 x 4 Pt + O = 1,000,001 atoms
    flt-mol convert OUT.traj OUT.lmdb
    flt-mol predict CHECKPOINT --data OUT.lmdb --out OUT.npz

The slab is ``ase.build.fcc111('Pt', (nx, ny, layers), vacuum=10)``, O in the fcc hollow site of the
first cell 1.2 A above the surface; tags 0 sub-surface, 1 surface, 2 adsorbate; the bottom half of
the layers fixed. Sizes used in the README: 16x16 (1,025 atoms), 158x158 (99,857), 354x354
(501,265), 500x500 (1,000,001).
"""

from __future__ import annotations

import argparse


def build(nx: int, ny: int, layers: int = 4):
    import numpy as np
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms

    from flt_mol.data.oc20 import oc20_tags_from_ase_layers

    slab = fcc111("Pt", size=(nx, ny, layers), vacuum=10.0)
    bottom = slab.get_tags() > layers // 2  # ASE counts layers from the top
    add_adsorbate(slab, "O", 1.2, "fcc")
    slab.set_tags(oc20_tags_from_ase_layers(slab))
    slab.set_constraint(FixAtoms(indices=np.nonzero(np.append(bottom, False))[0]))
    slab.pbc = (True, True, False)
    return slab


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("nx", type=int)
    p.add_argument("ny", type=int)
    p.add_argument("out", help="output file (.traj recommended; any ASE-writable format)")
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args()
    atoms = build(a.nx, a.ny, a.layers)
    atoms.write(a.out)
    print(f"wrote {len(atoms)} atoms to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
