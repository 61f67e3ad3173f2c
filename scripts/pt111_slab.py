#!/usr/bin/env python
"""Write a periodic Pt(111) slab with one O adsorbate (OC20 tags, bottom layers fixed) for `flt-mol convert`.

    python scripts/pt111_slab.py 500 500 OUT.traj          # 500 x 500 x 4 Pt + O = 1,000,001 atoms
    flt-mol convert OUT.traj OUT.lmdb
    flt-mol predict CHECKPOINT --data OUT.lmdb --out OUT.npz

The slab is :func:`flt_mol.bench.scaling.pt111_slab` (``ase.build.fcc111``, O in the fcc hollow
1.2 A above the surface). Sizes in the README: 16 (1,025 atoms), 158 (99,857), 354 (501,265),
500 (1,000,001).
"""

from __future__ import annotations

import argparse


def main() -> int:
    from flt_mol.bench.scaling import pt111_slab

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("nx", type=int)
    p.add_argument("ny", type=int)
    p.add_argument("out", help="output file (.traj recommended; any ASE-writable format)")
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args()
    atoms = pt111_slab(a.nx, a.ny, a.layers)
    atoms.write(a.out)
    print(f"wrote {len(atoms)} atoms to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
