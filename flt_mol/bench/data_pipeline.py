"""``flt-mol bench data``: structures per second through read + periodic images + collate.

Writes a temporary OC20 LMDB of synthetic ~50-atom slabs (ASE ``fcc111`` 4x4x3 of a random
EMT metal plus one adsorbate, rattled), then, in this one process, times

* ``read``:     ``OC20LMDB.__getitem__`` (LMDB get + allow-list unpickling + validation),
* ``collate``:  ``collate_atoms`` with periodic images on already-read items,
* ``pipeline``: both together, batch by batch (the figure the issue asks for).

Each is run ``--repeats`` times over all structures; the best and median rates are reported,
both per wall-clock second and per CPU second of this process (``time.process_time``): on a
shared machine the wall-clock rate also measures the other tenants, the CPU rate does not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "run", "main"]

_METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
_ADSORBATES = ("O", "H", "C", "N", "OH", "CO", "NO")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``flt-mol bench data``."""
    parser.add_argument("--num-structures", type=int, default=2048, help="structures written")
    parser.add_argument("--batch-size", type=int, default=32, help="structures per batch")
    parser.add_argument("--cutoff", type=float, default=8.0, help="periodic-image cutoff (A)")
    parser.add_argument("--no-images", action="store_true", help="collate without images")
    parser.add_argument(
        "--no-validate", action="store_true", help="skip per-entry value checks in the reader"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the data")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic structures")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON (default: print only)")
    parser.set_defaults(func=run)
    return parser


def _synthetic_structures(n: int, seed: int) -> list[Any]:
    import numpy as np
    from ase.build import add_adsorbate, fcc111, molecule
    from ase.constraints import FixAtoms

    from flt_mol.data.oc20 import atoms_to_data, oc20_tags_from_ase_layers

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        slab = fcc111(_METALS[rng.integers(len(_METALS))], size=(4, 4, 3), vacuum=10.0)
        name = _ADSORBATES[rng.integers(len(_ADSORBATES))]
        ads = molecule(name) if len(name) > 1 else name
        add_adsorbate(slab, ads, 1.2 + rng.random(), position=tuple(rng.random(2) * 5.0))
        slab.set_constraint(FixAtoms(mask=slab.get_tags() == 3))
        slab.set_tags(oc20_tags_from_ase_layers(slab))
        slab.positions += rng.normal(scale=0.05, size=slab.positions.shape)
        relaxed = slab.copy()
        relaxed.positions += rng.normal(scale=0.1, size=slab.positions.shape)
        out.append(
            atoms_to_data(slab, relaxed=relaxed, y_relaxed=float(rng.normal()), y_init=1.0, sid=i)
        )
    return out


def _rate(n: int, seconds: list[float]) -> dict[str, float]:
    return {"best_per_s": n / min(seconds), "median_per_s": n / statistics.median(seconds)}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print a summary (and write JSON with ``--out``); return 0."""
    import torch

    from flt_mol.data.collate import PeriodicImages, collate_atoms
    from flt_mol.data.oc20 import OC20LMDB, close_environments, write_lmdb

    if args.num_structures < 1 or args.batch_size < 1 or args.repeats < 1:
        from flt_mol.errors import UsageError

        raise UsageError("--num-structures, --batch-size and --repeats must be >= 1")
    images = None if args.no_images else PeriodicImages(cutoff=args.cutoff)
    n, bs = args.num_structures, args.batch_size
    t0 = time.perf_counter()
    structures = _synthetic_structures(n, args.seed)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="flt_mol_bench_") as tmp:
        path = Path(tmp) / "bench.lmdb"
        t0 = time.perf_counter()
        write_lmdb(structures, path)
        write_s = time.perf_counter() - t0
        size_mb = path.stat().st_size / 2**20
        ds = OC20LMDB(path, validate=not args.no_validate)
        batches = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
        ds[0]  # open the environment outside the timed region

        read_s, collate_s, pipeline_s, pipeline_cpu_s = [], [], [], []
        tokens = images_total = 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            items = [ds[i] for i in range(n)]
            read_s.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            for idx in batches:
                collate_atoms([items[i] for i in idx], images=images)
            collate_s.append(time.perf_counter() - t0)

            c0, t0 = time.process_time(), time.perf_counter()
            tokens = images_total = 0
            for idx in batches:
                batch = collate_atoms([ds[i] for i in idx], images=images)
                tokens += int((~batch.padding_mask).sum())
                images_total += int(batch.is_image.sum())
            pipeline_s.append(time.perf_counter() - t0)
            pipeline_cpu_s.append(time.process_time() - c0)
        close_environments()

    natoms = [int(d.natoms) for d in structures]
    result = {
        "benchmark": "data_pipeline",
        "num_structures": n,
        "batch_size": bs,
        "images": images is not None,
        "cutoff": args.cutoff if images is not None else None,
        "validate": not args.no_validate,
        "mean_atoms": sum(natoms) / n,
        "mean_images": images_total / n,
        "mean_tokens": tokens / n,
        "lmdb_mb": size_mb,
        "build_s": build_s,
        "write_per_s": n / write_s,
        "read": _rate(n, read_s),
        "collate": _rate(n, collate_s),
        "pipeline": _rate(n, pipeline_s),
        "pipeline_cpu": _rate(n, pipeline_cpu_s),
        "structures_per_s": n / min(pipeline_s),
        "structures_per_cpu_s": n / min(pipeline_cpu_s),
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    print(
        f"data pipeline: {n} structures, {result['mean_atoms']:.1f} atoms + "
        f"{result['mean_images']:.1f} images each, batch {bs}, threads {result['torch_threads']}\n"
        f"  read            {result['read']['best_per_s']:9.0f} /s (median {result['read']['median_per_s']:.0f})\n"
        f"  images+collate  {result['collate']['best_per_s']:9.0f} /s (median {result['collate']['median_per_s']:.0f})\n"
        f"  read+images+collate {result['pipeline']['best_per_s']:5.0f} /s (median {result['pipeline']['median_per_s']:.0f})"
        f"; per CPU second {result['pipeline_cpu']['best_per_s']:.0f} /s "
        f"(median {result['pipeline_cpu']['median_per_s']:.0f})"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
        tmp_out.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp_out, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flt-mol bench data", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
