"""Cost of one relaxation step (energy + forces) of the S2EF model as slabs grow, FLT vs exact attention.

    python -m flt_mol.bench.forces --recipe recipes/emt_s2ef_flt.yaml --sizes 3 4 6 8 11 16 --out FILE.json
    python -m flt_mol.bench.forces --modes flt --context features   # the random-feature context instead

A relaxation step costs one model evaluation of the energy and its gradient with respect to the
positions (no parameter gradients): what :class:`flt_mol.FLTCalculator` does per ASE optimiser
step. Structures: fcc(111) Cu slabs of ``n x n x 4`` atoms with an O adsorbate (``4 n^2 + 1``
atoms, 15 A vacuum, bottom two layers fixed, OC20 tags), periodic in the surface plane. The
recipe's model (untrained: timing only) runs with ``attention: flt`` and ``attention: exact``,
everything else equal (both use the recipe's context, or ``--context``); the median of ``--repeats`` calls
after one warm-up is reported. Timings depend on the machine and its load: numbers, not
assertions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path


def slab(n: int):
    """An ``n x n x 4`` Cu(111) slab with an O atom in an fcc hollow site (OC20 tags, FixAtoms)."""
    import numpy as np
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms

    atoms = fcc111("Cu", size=(n, n, 4), vacuum=7.5)
    layer = atoms.get_tags()  # 1 = top ... 4 = bottom
    add_adsorbate(atoms, "O", height=1.2, position="fcc")
    tags = np.append(np.where(layer == 1, 1, 0), 2)
    atoms.set_tags(tags)
    atoms.set_constraint(FixAtoms(indices=[i for i, t in enumerate(layer) if t >= 3]))
    atoms.pbc = (True, True, False)
    return atoms


def time_step(calc, atoms, *, repeats: int) -> float:
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        calc.predict_many([atoms])
        if i > 0:  # the first call warms up allocators
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import torch

    from flt_mol.calculator import FLTCalculator
    from flt_mol.models.s2ef import S2EFModel
    from flt_mol.train.config import load_config
    from flt_mol.train.tasks import EnergyNormalizer, build_task

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=Path("recipes/emt_s2ef_flt.yaml"))
    p.add_argument("--sizes", type=int, nargs="+", default=[3, 4, 6, 8, 11, 16],
                   help="slab widths n (4 n^2 + 1 atoms)")
    p.add_argument("--modes", nargs="+", default=["flt", "exact"])
    p.add_argument("--max-exact-atoms", type=int, default=600, help="skip exact attention above this size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--context", choices=["features", "exact", "local"], default=None,
                   help="override the recipe's model.context")
    p.add_argument("--out", type=Path, default=None, help="rows as JSON")
    args = p.parse_args(argv)
    config = load_config(args.recipe, [f"model.context={args.context}"] if args.context else None)
    task = build_task(config)
    task.normalizer = EnergyNormalizer(torch.zeros(101, dtype=torch.float64), 0.0, 0.0, 1.0)
    rows = []
    print(f"{'atoms':>6} " + " ".join(f"{m + ' s/step':>14}" for m in args.modes), flush=True)
    for n in args.sizes:
        atoms = slab(n)
        row = {"n": n, "atoms": len(atoms)}
        for mode in args.modes:
            if mode == "exact" and len(atoms) > args.max_exact_atoms:
                row[mode] = None
                continue
            torch.manual_seed(0)
            model = S2EFModel(dataclasses.replace(config.model, attention=mode)).eval()
            row[mode] = time_step(FLTCalculator.from_model(task, model), atoms, repeats=args.repeats)
        rows.append(row)
        cells = [f"{row[m]:>14.4f}" if row[m] is not None else f"{'-':>14}" for m in args.modes]
        print(f"{len(atoms):>6} " + " ".join(cells), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
