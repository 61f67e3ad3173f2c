"""``flt-mol bench scaling``: time and memory of one IS2RE prediction from 1k to 1M atoms.

Structures are periodic Pt(111) slabs with one O adsorbate in the fcc hollow (:func:`pt111_slab`:
``ase.build.fcc111('Pt', (n, n, 4))``, OC20 tags, bottom two layers fixed), the kind of input a
user converts with ``flt-mol convert``. Each row runs in a **fresh process**: build the slab,
turn it into a padded batch, build the model (``--checkpoint``, or the recipe's model untrained:
the cost does not depend on the weights) and time one prediction under ``torch.no_grad``, as
``flt-mol predict`` runs it (batches above 65,536 tokens chunk by chunk, see
:mod:`flt_mol.models.chunked`). Reported per row: ``predict_s`` (wall time of the prediction),
``peak_mem_mb`` (growth of the process's high-water RSS during the prediction) and
``peak_rss_mb`` (the absolute high-water mark: the whole process, model, structure and batch
included).

Exact attention (``model.attention=exact``, one token per atom, the same model otherwise) is
measured on small slabs only, and its ``a L^2 + b L`` fit (time and memory, least squares on
the measured rows) is extrapolated to the FLT sizes: the rows are marked ``"extrapolated"``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run", "pt111_slab"]


def pt111_slab(nx: int, ny: int, layers: int = 4):
    """``ase.Atoms``: Pt(111) ``nx x ny x layers`` + one O (fcc hollow, 1.2 A), OC20 tags, bottom half fixed.

    ``nx * ny * layers + 1`` atoms, periodic in the surface plane (10 A of vacuum each side).
    """
    import numpy as np
    from ase.build import add_adsorbate, fcc111
    from ase.constraints import FixAtoms

    from flt_mol.data.oc20 import oc20_tags_from_ase_layers

    slab = fcc111("Pt", size=(nx, ny, layers), vacuum=10.0)
    bottom = slab.get_tags() > layers // 2  # ASE numbers the layers from the top
    add_adsorbate(slab, "O", 1.2, "fcc")
    slab.set_tags(oc20_tags_from_ase_layers(slab))
    slab.set_constraint(FixAtoms(indices=np.nonzero(np.append(bottom, False))[0]))
    slab.pbc = (True, True, False)
    return slab


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sides", type=int, nargs="+", default=[16, 50, 158, 354, 500],
                        help="slab sides n (n x n x 4 Pt + O): 1,025 / 10,001 / 99,857 / 501,265 / 1,000,001 atoms")
    parser.add_argument("--exact-sides", type=int, nargs="*", default=[11, 14, 16, 20],
                        help="slab sides measured with exact attention (485 / 785 / 1,025 / 1,601 atoms)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="IS2RE checkpoint (default: the recipe's model, untrained)")
    parser.add_argument("--recipe", type=Path, default=None,
                        help="recipe of the untrained model (default recipes/emt_is2re_flt.yaml, reciprocal)")
    parser.add_argument("--chunk-atoms", type=int, default=None, help="atoms per chunk (default 2048)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, required=True, help="output JSON (list of rows)")
    parser.add_argument("--plot", type=Path, default=None, help="also draw time and memory vs atoms (PNG) here")


# --------------------------------------------------------------------------------------------


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(spec: dict) -> dict:
    import torch

    from flt_mol.data.collate import collate_atoms
    from flt_mol.data.oc20 import atoms_to_data
    from flt_mol.models.chunked import CHUNK_ABOVE, DEFAULT_CHUNK_ATOMS, chunked_energy, supports_chunked

    torch.set_num_threads(spec["threads"])
    overrides = list(spec["overrides"])
    if spec["checkpoint"]:
        from flt_mol.train.commands import load_for_inference

        _, model = load_for_inference(spec["checkpoint"], "cpu", task="is2re")
        if spec["attention"] != model.config.attention:
            raise ValueError("--checkpoint rows use the checkpoint's attention")
    else:
        from flt_mol.models.is2re import IS2REModel
        from flt_mol.train.config import load_config

        config = load_config(spec["recipe"], overrides + [f"model.attention={spec['attention']}"])
        if spec["attention"] == "exact":
            # Exact attention with the reciprocal lattice sums would be O(L^2) per image; the
            # O(L^2) reference is plain softmax attention with the Gaussian RPE mask.
            config.model.periodic = "images"
        torch.manual_seed(0)
        model = IS2REModel(config.model).eval()
    atoms = pt111_slab(spec["side"], spec["side"])
    batch = collate_atoms([atoms_to_data(atoms)])
    chunk = spec["chunk_atoms"] or DEFAULT_CHUNK_ATOMS
    before = _rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        if supports_chunked(model) and batch.padding_mask.numel() > CHUNK_ABOVE:
            energy = chunked_energy(model, batch, chunk_size=chunk)
        else:
            energy = model(batch)["energy"]
    elapsed = time.perf_counter() - t0
    return {"method": spec["attention"], "atoms": len(atoms), "side": spec["side"], "predict_s": elapsed,
            "peak_mem_mb": _maxrss_mb() - before, "peak_rss_mb": _maxrss_mb(), "energy": float(energy[0]),
            "measured": True}


def _fit_quadratic(rows: list[dict], key: str) -> tuple[float, float]:
    """Least-squares ``y = a L^2 + b L`` through the measured rows."""
    import numpy as np

    L = np.array([r["atoms"] for r in rows], dtype=float)
    y = np.array([r[key] for r in rows], dtype=float)
    A = np.stack([L**2, L], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, y, rcond=None)
    return float(a), float(b)


def run(args: argparse.Namespace) -> int:
    here = Path(__file__).resolve().parents[2]
    recipe = str((args.recipe if args.recipe is not None else here / "recipes/emt_is2re_flt.yaml").resolve())
    base = {"checkpoint": str(args.checkpoint) if args.checkpoint else None, "recipe": recipe,
            "overrides": ["model.periodic=reciprocal", "data.periodic_images=false"],
            "chunk_atoms": args.chunk_atoms, "threads": args.threads}
    jobs = [dict(base, attention="flt", side=n) for n in args.sides]
    jobs += [dict(base, attention="exact", side=n, checkpoint=None) for n in args.exact_sides]
    # glibc's default allocator settings, as `flt-mol predict` runs (pinning MALLOC_MMAP_THRESHOLD_
    # low, as the attention benchmark does, made the chunked rows ~2x slower: every chunk's
    # temporaries became fresh page-faulting mappings).
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for spec in jobs:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-2000:])
            rows.append({"method": spec["attention"], "side": spec["side"], "predict_s": None, "peak_mem_mb": None,
                         "reason": f"worker failed (exit {proc.returncode})", "measured": False})
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['method']:6s} {row['atoms']:>9,d} atoms  {row['predict_s']:8.2f} s  "
              f"{row['peak_mem_mb']:8.0f} MB (+)  {row['peak_rss_mb']:8.0f} MB peak RSS", flush=True)
    exact = [r for r in rows if r["method"] == "exact" and r.get("measured")]
    if len(exact) >= 2:
        ta, tb = _fit_quadratic(exact, "predict_s")
        ma, mb = _fit_quadratic(exact, "peak_mem_mb")
        for r in [r for r in rows if r["method"] == "flt" and r.get("measured")]:
            L = r["atoms"]
            rows.append({"method": "exact", "atoms": L, "predict_s": ta * L * L + tb * L,
                         "peak_mem_mb": ma * L * L + mb * L, "measured": False,
                         "reason": f"extrapolated: a L^2 + b L fitted on {len(exact)} measured rows"})
            print(f"exact  {L:>9,d} atoms  {rows[-1]['predict_s']:8.3g} s  {rows[-1]['peak_mem_mb']:8.3g} MB "
                  f"(extrapolated)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label, limit in ((axes[0], "predict_s", "prediction time (s)", 180.0),
                                  (axes[1], "peak_mem_mb", "peak memory growth (MB)", 4096.0)):
        for method, color in (("flt", "C0"), ("exact", "C3")):
            meas = sorted((r["atoms"], r[key]) for r in rows if r["method"] == method and r.get("measured")
                          and r.get(key) is not None)
            extra = sorted((r["atoms"], r[key]) for r in rows if r["method"] == method and not r.get("measured")
                           and r.get(key) is not None)
            if meas:
                ax.plot(*zip(*meas), "o-", color=color, label=f"{method} (measured)")
            if extra:
                pts = sorted(meas[-1:] + extra)
                ax.plot(*zip(*pts), "x--", color=color, label=f"{method} (a L^2 + b L, extrapolated)")
        ax.axhline(limit, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("atoms (Pt(111) slab + O)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("one flt-mol predict, 1 thread (dotted: 3 min)")
    axes[1].set_title("dotted: 4 GB")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        result = _worker(json.loads(sys.argv[2]))
        print(json.dumps(result))
        raise SystemExit(0)
    raise SystemExit("run as `flt-mol bench scaling`")
