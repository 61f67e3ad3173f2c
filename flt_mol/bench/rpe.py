"""RPE approximation benchmark (paper Thm 4.2): max-norm error of ``N^ = n1 n2^T`` versus ``r``.

For each family, length ``L`` and number of random features ``r``, draws ``--draws`` independent
feature sets and reports the mean over draws of ``max_{h,i,j} |N^ - N|`` (the exact mask ``N`` is
computed in row blocks, so L = 8192 fits in memory). Beside it, the Hoeffding + union-bound rate
behind Thm 4.2: each entry of ``N^`` is a mean of ``r`` iid terms bounded by ``c = max|g|/p``, so
``P(max |N^ - N| > eps) <= 2 L^2 H exp(-r eps^2 / (2 c^2))``, i.e. with probability ``1 - delta``
``max |N^ - N| <= c sqrt(2 log(2 H L^2 / delta) / r)`` (``delta = 0.05``; ``inf`` when ``c`` is).
The empirical ``E[a^2]`` (the variance scale the bound pessimises with ``c^2``) is reported too.

Families (one head each unless ``--heads``): Gaussian basis (3D, learnable-variance Gaussian p
and the mixture p), Gaussian mixture (1D), local box on the integer lattice (1D), continuous
local ``sinc^2`` (1D), Gaussian and Laplace kernels (3D); and the periodic case (DESIGN §7): the
same Gaussian basis (mixture p) on atoms in a slab cell, estimated with the continuous features
against ``f`` (``gaussian_basis_slab``) and with the reciprocal-lattice features against the lattice
sum ``f_per`` (``gaussian_basis_periodic``; ``c`` is then the largest weight over 10^5 draws,
``ghat/(Area p)``, measured). The periodic exact mask is an O(L^2 x images) lattice sum, so the
periodic families run only for ``L <= 2048``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from flt_mol.errors import UsageError

__all__ = ["add_arguments", "run", "run_rows", "FAMILIES", "theorem_bound"]

FAMILIES = (
    "gaussian_basis",  # learnable-variance Gaussian p (DESIGN §3)
    "gaussian_basis_mixture",
    "gaussian_mixture",
    "local_lattice",
    "local_continuous",
    "kernel_gaussian",
    "kernel_laplace",
    "gaussian_basis_slab",
    "gaussian_basis_periodic",
)
PERIODIC_MAX_LENGTH = 2048
# The slab cell of the periodic families: an oblique 8.7 x 9.4 A plane (EMT-IS2RE-sized), atoms at
# metal density (0.08 / A^3) in a layer as thick as L needs, periodic in the plane only.
_SLAB_A, _SLAB_B = (8.7, 0.0, 0.0), (1.2, 9.4, 0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 1024, 8192],
                        help="numbers of positions L (the max-norm runs over L x L pairs)")
    parser.add_argument("--features", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128],
                        help="numbers of random features r")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES, metavar="FAMILY",
                        help=f"RPE families, among {', '.join(FAMILIES)}")
    parser.add_argument("--heads", type=int, default=1, help="heads per RPE (each its own mask)")
    parser.add_argument("--draws", type=int, default=3, help="independent feature draws per point")
    parser.add_argument("--delta", type=float, default=0.05, help="failure probability of the bound")
    parser.add_argument("--block", type=int, default=512, help="rows per block of the exact mask")
    parser.add_argument("--out", type=Path, required=True, help="output JSON (list of rows)")
    parser.add_argument("--plot", type=Path, default=None, help="also draw error vs r (PNG) here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the positions and random features")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def theorem_bound(c: float, length: int, heads: int, r: int, delta: float) -> float:
    """``c sqrt(2 log(2 H L^2 / delta) / r)`` (inf when c is)."""
    if not math.isfinite(c):
        return float("inf")
    return c * math.sqrt(2.0 * math.log(2.0 * heads * length * length / delta) / r)


def build_family(name: str, heads: int):
    """``(rpe, position kind)`` for a family name."""
    from flt_mol.attention import GaussianBasisRPE, GaussianMixtureRPE, KernelRPE, LocalRPE

    if name == "gaussian_basis":
        return GaussianBasisRPE(heads, 8, 3, sampler="gaussian"), "atoms"
    if name == "gaussian_basis_mixture":
        return GaussianBasisRPE(heads, 8, 3, sampler="mixture"), "atoms"
    if name == "gaussian_mixture":
        return GaussianMixtureRPE(heads, 4, 1), "tokens"
    if name == "local_lattice":
        return LocalRPE(heads, 2, 1, lattice=True), "tokens"
    if name == "local_continuous":
        return LocalRPE(heads, 2, 1, lattice=False, order=2), "tokens_jitter"
    if name == "kernel_gaussian":
        return KernelRPE(heads, "gaussian", 3, init_length_scale=2.0), "atoms"
    if name == "kernel_laplace":
        return KernelRPE(heads, "laplace", 3, init_length_scale=2.0), "atoms"
    if name == "gaussian_basis_slab":
        return GaussianBasisRPE(heads, 8, 3, sampler="mixture"), "slab"
    if name == "gaussian_basis_periodic":
        return GaussianBasisRPE(heads, 8, 3, sampler="mixture"), "slab_periodic"
    raise ValueError(f"unknown family {name!r}; choose from {FAMILIES}")


def slab_cell(length: int):
    """``(cell [1, 3, 3], pbc [1, 3])`` of the periodic families for ``length`` atoms."""
    import torch

    area = _SLAB_A[0] * _SLAB_B[1]
    thickness = length / (0.08 * area)
    cell = torch.tensor([[_SLAB_A, _SLAB_B, (0.0, 0.0, thickness + 20.0)]])
    return cell, torch.tensor([[True, True, False]])


def _positions(kind: str, length: int, generator):
    import torch

    if kind in ("slab", "slab_periodic"):
        cell, _ = slab_cell(length)
        frac = torch.rand(1, length, 3, generator=generator)
        frac[..., 2] *= (cell[0, 2, 2] - 20.0) / cell[0, 2, 2]
        return frac @ cell[0]
    if kind == "atoms":
        side = (length / 0.1) ** (1.0 / 3.0)  # ~0.1 atoms per cubic Angstrom
        return side * torch.rand(1, length, 3, generator=generator)
    pos = torch.arange(length, dtype=torch.float32)[None, :, None]
    if kind == "tokens_jitter":
        pos = pos + 0.5 * torch.rand(1, length, 1, generator=generator)
    return pos


def max_error(rpe, pos, num_features: int, generator, block: int, *, lattice=None, exact=None) -> float:
    """``max |n1 n2^T - N|`` over heads and all (i, j), computed in row blocks.

    Periodic (``lattice`` given): the reciprocal-lattice features against ``exact``, the lattice sum
    ``[1, H, L, L]`` (computed once by the caller).
    """
    import torch

    with torch.no_grad():
        if lattice is not None:
            n1, n2 = rpe.features(pos, num_features, generator, lattice=lattice)
            return float((n1 @ n2.transpose(-1, -2) - exact).abs().max())
        n1, n2 = rpe.features(pos, num_features, generator)
        L = pos.shape[1]
        worst = 0.0
        for s in range(0, L, block):
            e = min(s + block, L)
            delta = pos[:, s:e, None, :] - pos[:, None, :, :]  # [1, b, L, l]
            exact = rpe.mask(delta).permute(0, 3, 1, 2)  # [1, H, b, L]
            est = n1[:, :, s:e] @ n2.transpose(-1, -2)
            worst = max(worst, float((est - exact).abs().max()))
    return worst


def run_rows(args: argparse.Namespace, *, log=print) -> list[dict]:
    import torch

    torch.set_num_threads(args.threads)
    for name in ("heads", "draws", "block"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(r < 1 for r in args.features) or any(L < 1 for L in args.lengths):
        raise UsageError("--features and --lengths must be positive")
    rows = []
    for fam in args.families:
        torch.manual_seed(args.seed)
        rpe, kind = build_family(fam, args.heads)
        periodic = kind == "slab_periodic"
        g = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            if periodic:
                from flt_mol.attention.periodic import PeriodicLattice

                lattice = PeriodicLattice.from_cell(*slab_cell(1))  # the plane lattice: same for every L
                draw = rpe.periodic_draw(torch.zeros(1, 1, 3), rpe.draw_noise(100000, g), lattice)
                a = rpe.periodic_weights(draw)
                c = float(a.abs().max())
            else:
                c = rpe.c_bound()
                _, a = rpe.sample(rpe.draw_noise(100000, g))
        mean_a2 = float((a**2).mean())
        for L in args.lengths:
            if periodic and L > PERIODIC_MAX_LENGTH:
                log(f"  {fam:>22s} L={L:>5d} skipped: the exact lattice sum is O(L^2 x images) (L <= {PERIODIC_MAX_LENGTH})")
                continue
            pos = _positions(kind, L, g)
            extra = {}
            if periodic:
                lattice = PeriodicLattice.from_cell(*slab_cell(L))
                with torch.no_grad():
                    extra = {"lattice": lattice, "exact": rpe.exact_mask(pos, lattice=lattice)}
            for r in args.features:
                errs = [max_error(rpe, pos, r, g, args.block, **extra) for _ in range(args.draws)]
                err = sum(errs) / len(errs)
                bound = theorem_bound(c, L, args.heads, r, args.delta)
                rows.append({
                    "family": fam, "length": L, "features": r, "max_error": err,
                    "max_error_draws": errs, "c": c if math.isfinite(c) else None,
                    "mean_a2": mean_a2, "bound": bound if math.isfinite(bound) else None,
                    "delta": args.delta,
                })
                log(f"  {fam:>22s} L={L:>5d} r={r:>4d}  max err {err:8.4f}   bound {bound:9.3f}   c={c:.3g}")
    return rows


def slopes(rows: list[dict]) -> dict[tuple[str, int], float]:
    """Least-squares slope of log(max error) vs log(r) per (family, L) (theory: -1/2)."""
    import numpy as np

    out = {}
    for key in dict.fromkeys((r["family"], r["length"]) for r in rows):
        pts = [(r["features"], r["max_error"]) for r in rows if (r["family"], r["length"]) == key and r["max_error"] > 0]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            out[key] = float(np.polyfit(x, y, 1)[0])
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = list(dict.fromkeys(r["family"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    ncol = min(4, len(fams))
    nrow = math.ceil(len(fams) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3.3 * nrow), squeeze=False)
    for ax, fam in zip(axes.flat, fams):
        for L in lengths:
            pts = [r for r in rows if r["family"] == fam and r["length"] == L]
            rs = [p["features"] for p in pts]
            line, = ax.plot(rs, [p["max_error"] for p in pts], "o-", label=f"L={L}")
            if pts and pts[0]["bound"] is not None:
                ax.plot(rs, [p["bound"] for p in pts], "--", color=line.get_color(), alpha=0.6)
        c = next((r["c"] for r in rows if r["family"] == fam), None)
        ax.set_title(f"{fam} (c={'inf' if c is None else f'{c:.3g}'})", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("r")
        ax.set_ylabel("max |N^ - N|")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    fig.suptitle("RPE mask error vs r (solid: measured, dashed: Thm 4.2 bound)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from flt_mol.bench.attention import _write_json

    print(f"bench rpe: lengths={args.lengths} r={args.features} draws={args.draws} heads={args.heads}")
    rows = run_rows(args)
    _write_json(args.out, rows)
    print(f"{'family':>22s} {'L':>6s} {'c':>9s} {'E[a^2]':>9s} {'slope':>7s} {'err@rmax':>9s} {'bound@rmax':>11s}")
    for (fam, L), s in slopes(rows).items():
        last = [r for r in rows if r["family"] == fam and r["length"] == L][-1]
        c = "inf" if last["c"] is None else f"{last['c']:.3g}"
        b = "inf" if last["bound"] is None else f"{last['bound']:.3g}"
        print(f"{fam:>22s} {L:>6d} {c:>9s} {last['mean_a2']:>9.3g} {s:>7.2f} {last['max_error']:>9.4f} {b:>11s}")
    print("(slope: fit of log max-error vs log r; Thm 4.2 rate: -0.5)")
    print(f"wrote {args.out}")
    if args.plot is not None:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0
