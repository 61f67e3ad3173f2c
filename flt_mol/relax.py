"""Relaxations and NVE molecular dynamics with a trained S2EF model (``flt-mol relax``, ``flt-mol md``).

    flt-mol relax CKPT --data PATH --out DIR [--optimizer BFGS|FIRE|LBFGS] [--fmax 0.05] [--steps 200]
    flt-mol md CKPT --data PATH [--index 0] [--steps 1000] [--timestep 1.0] [--temperature 300] --out FILE.json

**Batched relaxation** (:func:`relax_many`). One ASE optimiser per structure, all stepped in
lockstep: each round evaluates the energies and forces of every unconverged structure in padded
batches (:meth:`flt_mol.FLTCalculator.predict_many`), hands each optimiser its results through a
``SinglePointCalculator`` and lets it take one step. ASE's optimisers see exactly what they
would see with the calculator attached (forces with the ``FixAtoms`` constraints applied, so
fixed atoms never move); the model runs once per round instead of once per structure and step.
A structure stops when ``max |F_i| < fmax`` over its free atoms, or after ``steps`` steps.

**IS2RS and relax-then-predict** (:func:`relaxation_metrics`). Where the data hold the relaxed
structure (``pos_relaxed``) and energy (``y_relaxed``): OC20's ADwT of the relaxed positions
(free atoms, minimum image; beside the initial positions as a no-relaxation baseline) and the
IS2RE energy MAE / EwT of the model's energy at its own relaxed structure (meaningful when the
checkpoint's energy is the referenced ``y_adsorption``, as IS2RE's ``y_relaxed`` is), beside a
direct IS2RE model's prediction from the initial structure when one is given.

**NVE check** (:func:`nve_run`). Velocity Verlet with the calculator; the total energy's drift
(slope of a least-squares line through ``E_kin + E_pot`` against time) per atom per ps: the
forces are the gradient of the energy exactly when it stays at the integrator's error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flt_mol.errors import InputError, UsageError

__all__ = ["OPTIMIZERS", "relax_many", "relaxation_metrics", "compare_with_emt", "nve_run", "read_structures",
           "add_parser"]

OPTIMIZERS = ("BFGS", "FIRE", "LBFGS")


def _optimizer_class(name: str):
    from ase import optimize

    if name not in OPTIMIZERS:
        raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return getattr(optimize, name)


def max_free_force(atoms: Any) -> float:
    """``max_i |F_i|`` over the free atoms (ASE's convergence criterion; constraints applied)."""
    forces = atoms.get_forces()
    return float(np.sqrt((forces**2).sum(1)).max()) if len(forces) else 0.0


def relax_many(calc: Any, structures: Sequence[Any], *, optimizer: str = "BFGS", fmax: float = 0.05,
               steps: int = 200, batch_size: int | None = None, progress: bool = False,
               optimizer_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Relax ``structures`` (ASE ``Atoms``, modified in place) with ``calc``'s model, in lockstep
    (module docstring).

    Args:
        calc: a :class:`flt_mol.FLTCalculator`.
        structures: the structures; their ``FixAtoms`` constraints are honoured.
        optimizer: ``BFGS``, ``FIRE`` or ``LBFGS`` (``ase.optimize``).
        fmax: convergence threshold on the largest free-atom force (eV/A).
        steps: at most this many optimiser steps per structure.
        batch_size: structures per model call (default: the calculator's).
        progress: a tqdm bar over the rounds (on stderr).
        optimizer_kwargs: passed to the optimiser (e.g. ``{"maxstep": 0.1}``).

    Returns one dict per structure: ``energy`` (eV, at the final positions), ``fmax`` (eV/A, free
    atoms), ``steps`` (optimiser steps taken), ``converged`` (bool), ``initial_energy``. Each
    ``Atoms`` is left with a ``SinglePointCalculator`` holding its final energy and forces.
    """
    from ase.calculators.singlepoint import SinglePointCalculator

    if fmax <= 0:
        raise UsageError(f"fmax must be > 0 eV/A, got {fmax}")
    if steps < 0:
        raise UsageError(f"steps must be >= 0, got {steps}")
    cls = _optimizer_class(optimizer)
    kwargs = dict(optimizer_kwargs or {})
    opts = [cls(atoms, logfile=None, **kwargs) for atoms in structures]
    info = [{"steps": 0, "converged": False} for _ in structures]
    active = list(range(len(structures)))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(structures), desc=f"relax ({optimizer})", unit="structure", file=sys.stderr,
                   dynamic_ncols=True)
    round_ = 0
    while active:
        results = calc.predict_many([structures[i] for i in active], batch_size=batch_size)
        still = []
        for i, res in zip(active, results):
            atoms = structures[i]
            atoms.calc = SinglePointCalculator(atoms, energy=res["energy"], free_energy=res["energy"],
                                               forces=res["forces"])
            if round_ == 0:
                info[i]["initial_energy"] = res["energy"]
            info[i]["energy"] = res["energy"]
            f = max_free_force(atoms)
            info[i]["fmax"] = f
            if f < fmax:
                info[i]["converged"] = True
            elif info[i]["steps"] < steps:
                opts[i].step()
                info[i]["steps"] += 1
                still.append(i)
                continue
            if bar is not None:
                bar.update(1)
        # Structures that just stepped need their new energies and forces: evaluated next round.
        active = still
        round_ += 1
        if bar is not None:
            bar.set_postfix(active=len(active), round=round_)
    if bar is not None:
        bar.close()
    return info


def relaxation_metrics(items: Sequence[Any], relaxed: Sequence[Any], energies: Sequence[float], *,
                       direct: Sequence[float] | None = None) -> dict[str, Any]:
    """IS2RS and relax-then-predict IS2RE metrics (module docstring).

    Args:
        items: the input OC20 ``Data`` (with ``pos_relaxed`` for ADwT and ``y_relaxed`` for energies).
        relaxed: the relaxed ``Atoms``, in the same order.
        energies: the model's energy at each relaxed structure (eV).
        direct: a direct IS2RE model's predictions from the initial structures (eV), optional.

    Returns ``{"adwt": {...}, "adwt_initial": {...}, "relax_then_predict": {...}, "direct_is2re":
    {...}}`` with the parts the data allow (``adwt_*``: :func:`adwt_metrics_from_totals`;
    energies: :func:`metrics_from_totals`).
    """
    import torch

    from flt_mol.train.metrics import adwt_metrics_from_totals, adwt_totals, energy_totals, metrics_from_totals

    out: dict[str, Any] = {}
    if items and all(getattr(d, "pos_relaxed", None) is not None for d in items):
        natoms = torch.tensor([len(a) for a in relaxed])
        cell = torch.cat([torch.as_tensor(d.cell, dtype=torch.float64).reshape(1, 3, 3) for d in items])
        fixed = torch.cat([torch.as_tensor(d.fixed).reshape(-1) for d in items])
        target = torch.cat([torch.as_tensor(d.pos_relaxed, dtype=torch.float64) for d in items])
        pbc = torch.tensor(np.array([a.get_pbc() for a in relaxed]))
        pred = torch.cat([torch.from_numpy(np.asarray(a.get_positions(), dtype=np.float64)) for a in relaxed])
        initial = torch.cat([torch.as_tensor(d.pos, dtype=torch.float64) for d in items])
        out["adwt"] = adwt_metrics_from_totals(adwt_totals(pred, target, cell, natoms, fixed=fixed, pbc=pbc))
        out["adwt_initial"] = adwt_metrics_from_totals(adwt_totals(initial, target, cell, natoms, fixed=fixed, pbc=pbc))
    if items and all(getattr(d, "y_relaxed", None) is not None for d in items):
        y = torch.tensor([float(d.y_relaxed) for d in items], dtype=torch.float64)
        out["relax_then_predict"] = metrics_from_totals(energy_totals(torch.tensor(list(energies), dtype=torch.float64), y))
        if direct is not None:
            out["direct_is2re"] = metrics_from_totals(energy_totals(torch.tensor(list(direct), dtype=torch.float64), y))
    return out


def compare_with_emt(initial: Sequence[Any], relaxed: Sequence[Any], *, optimizer: str = "BFGS",
                     fmax: float = 0.05, steps: int = 200) -> dict[str, Any]:
    """Relax copies of ``initial`` with ASE's ``EMT`` (the calculator EMT-S2EF's labels come from)
    and compare the minima with the model's ``relaxed`` ones.

    Returns ``{"distance_to_emt_minimum": mean over structures of the mean free-atom minimum-image
    distance between the two minima (A), "distance_emt_moved": the same between the start and
    EMT's minimum (how far EMT itself moved the atoms), "emt_energy_excess": mean of
    E_EMT(model minimum) - E_EMT(EMT minimum) (eV), "per_structure": [...]}``.
    """
    import torch
    from ase.calculators.emt import EMT

    from flt_mol.train.metrics import minimum_image_displacement

    cls = _optimizer_class(optimizer)
    rows = []
    for start, mine in zip(initial, relaxed):
        ref = start.copy()
        ref.calc = EMT()
        cls(ref, logfile=None).run(fmax=fmax, steps=steps)
        e_ref = float(ref.get_potential_energy())
        probe = mine.copy()
        probe.calc = EMT()
        e_mine = float(probe.get_potential_energy())
        free = np.ones(len(ref), dtype=bool)
        for c in ref.constraints:
            if hasattr(c, "index"):
                free[np.asarray(c.index)] = False
        cell = torch.as_tensor(np.asarray(ref.get_cell(complete=True)), dtype=torch.float64)
        pbc = torch.as_tensor(np.asarray(ref.get_pbc(), dtype=bool))

        def dist(a, b):
            d = torch.as_tensor(a.get_positions() - b.get_positions(), dtype=torch.float64)[torch.from_numpy(free)]
            return float(minimum_image_displacement(d, cell, pbc).norm(dim=-1).mean())

        rows.append({"distance_to_emt_minimum": dist(mine, ref), "distance_emt_moved": dist(start, ref),
                     "emt_energy_excess": e_mine - e_ref})
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {"per_structure": rows}


def nve_run(atoms: Any, calc: Any, *, steps: int = 1000, timestep_fs: float = 1.0, temperature_K: float = 300.0,
            seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Velocity Verlet (NVE) with ``calc`` from Maxwell-Boltzmann velocities at ``temperature_K``.

    Returns ``{"drift_ev_per_atom_per_ps", "max_abs_deviation_ev_per_atom", "std_ev_per_atom",
    "natoms", "moving_atoms", "steps", "timestep_fs", "temperature_K", "mean_temperature_K",
    "seconds", "energy": [E_tot per step]}``; drift = slope of the least-squares line of the total
    energy against time, divided by the number of atoms (all atoms; fixed ones do not move).
    """
    from ase import units
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    if timestep_fs <= 0:
        raise UsageError(f"timestep must be > 0 fs, got {timestep_fs}")
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    if hasattr(vd, "thermalize_momenta"):  # ASE >= 3.29 (MaxwellBoltzmannDistribution is deprecated there)
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    if not atoms.constraints:
        vd.Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs, logfile=None)
    energies, temps = [], []

    def record() -> None:
        energies.append(float(atoms.get_potential_energy() + atoms.get_kinetic_energy()))
        temps.append(float(atoms.get_temperature()))

    record()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="NVE", file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        dyn.run(1)
        record()
        if bar is not None:
            bar.update(1)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    e = np.asarray(energies)
    t_ps = np.arange(len(e)) * timestep_fs / 1000.0
    slope = float(np.polyfit(t_ps, e, 1)[0])
    n = len(atoms)
    from ase.constraints import FixAtoms

    fixed = sum(len(c.index) for c in atoms.constraints if isinstance(c, FixAtoms))
    return {
        "drift_ev_per_atom_per_ps": slope / n,
        "max_abs_deviation_ev_per_atom": float(np.abs(e - e[0]).max()) / n,
        "std_ev_per_atom": float(e.std()) / n,
        "natoms": n, "moving_atoms": n - fixed, "steps": steps, "timestep_fs": timestep_fs,
        "temperature_K": temperature_K, "mean_temperature_K": float(np.mean(temps[1:])),
        "seconds": seconds, "energy": [float(v) for v in e],
    }


# --------------------------------------------------------------------------------------------
# reading structures


def read_structures(spec: str, *, limit: int | None = None) -> tuple[list[Any], list[Any]]:
    """``(items, atoms)``: OC20 ``Data`` and ASE ``Atoms`` of an LMDB (file, folder of shards,
    ``emt:SPLIT``, ``emt_s2ef:SPLIT``) or of any ASE-readable file (extxyz, traj, ...; items are
    then built with :func:`flt_mol.calculator.atoms_to_item`).

    Raises:
        FileNotFoundError: no such path.
        InputError: the file cannot be read as structures, or holds none.
    """
    from flt_mol.data.oc20 import data_to_atoms

    is_lmdb = spec.startswith(("emt:", "emt_s2ef:")) or Path(spec).suffix == ".lmdb" or Path(spec).is_dir()
    if is_lmdb:
        from flt_mol.train.tasks import open_split

        ds = open_split(spec)
        n = len(ds) if limit is None else min(limit, len(ds))
        items = [ds[i] for i in range(n)]
        atoms = [data_to_atoms(d) for d in items]
    else:
        path = Path(spec)
        if not path.exists():
            raise FileNotFoundError(f"data {spec!r} does not exist")
        import ase.io

        from flt_mol.calculator import atoms_to_item

        try:
            atoms = ase.io.read(path, index=":" if limit is None else f":{limit}")
        except Exception as err:  # noqa: BLE001 - ASE raises many kinds for unreadable files
            raise InputError(f"{path}: cannot read structures with ASE ({type(err).__name__}: "
                             f"{' '.join(str(err).split())[:160]})") from err
        atoms = list(atoms) if isinstance(atoms, list) else [atoms]
        items = [atoms_to_item(a) for a in atoms]
    if not atoms:
        raise InputError(f"{spec}: no structures")
    for i, a in enumerate(atoms):
        z = a.get_atomic_numbers()
        if len(z) == 0:
            raise InputError(f"{spec}: structure {i} has no atoms")
        if (z < 1).any() or (z > 100).any():
            raise InputError(f"{spec}: structure {i} has atomic numbers outside 1..100")
        if not np.isfinite(a.get_positions()).all():
            raise InputError(f"{spec}: structure {i} has non-finite positions")
    return items, atoms


# --------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    data_help = ("structures: an OC20 LMDB file, a folder of .lmdb shards, emt:SPLIT / emt_s2ef:SPLIT for the "
                 "embedded data sets, or any ASE-readable file (extxyz, traj, ...); tags must follow OC20 "
                 "(0 sub-surface, 1 surface, 2 adsorbate) and FixAtoms marks fixed atoms")
    p = subparsers.add_parser(
        "relax", help="relax many structures with an S2EF checkpoint (batched ASE optimisers)",
        description="Relax structures with a trained S2EF model (flt_mol.FLTCalculator): one ASE optimiser "
        "per structure, all stepped in lockstep with batched energies and forces; fixed atoms (FixAtoms / "
        "the OC20 'fixed' field) never move. Writes DIR/relaxed.lmdb (OC20 fields: pos = relaxed "
        "positions, y = energy, force = forces, sid) and DIR/relaxed.extxyz, DIR/relaxations.json (per "
        "structure: steps, converged, fmax, energies) and, when the data hold pos_relaxed / y_relaxed, "
        "DIR/metrics.json with OC20's ADwT (free atoms, minimum image) and the relax-then-predict IS2RE "
        "energy MAE / EwT, beside --is2re-checkpoint's direct prediction.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="S2EF checkpoint (flt-mol train, task: s2ef)")
    p.add_argument("--data", required=True, metavar="PATH", help=data_help)
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--optimizer", default="BFGS", choices=OPTIMIZERS, help="ase.optimize optimiser")
    p.add_argument("--fmax", type=float, default=0.05, help="stop when every free atom's force is below this (eV/A)")
    p.add_argument("--steps", type=int, default=200, help="at most this many optimiser steps per structure")
    p.add_argument("--maxstep", type=float, default=None,
                   help="largest atom move per step (A), passed to the optimiser (default: ASE's)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="relax only the first N structures")
    p.add_argument("--batch-size", type=int, default=32, help="structures per model call")
    p.add_argument("--is2re-checkpoint", type=Path, default=None, metavar="CKPT",
                   help="an IS2RE checkpoint whose direct prediction (from the initial structures) is reported "
                   "beside relax-then-predict")
    p.add_argument("--compare-emt", action="store_true",
                   help="also relax every structure with ASE's EMT (the EMT data sets' labels) and report the "
                   "distance between the two minima")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_relax)

    p = subparsers.add_parser(
        "md", help="NVE molecular dynamics check of an S2EF checkpoint (energy drift per atom per ps)",
        description="Run velocity Verlet (NVE) with a trained S2EF model from Maxwell-Boltzmann velocities "
        "and report the total energy's drift per atom per ps (slope of a least-squares line), its largest "
        "deviation and the mean temperature; fixed atoms (FixAtoms) stay put. Conservative forces keep the "
        "drift at the integrator's error.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="S2EF checkpoint (flt-mol train, task: s2ef)")
    p.add_argument("--data", required=True, metavar="PATH", help=data_help)
    p.add_argument("--index", type=int, default=0, help="which structure of --data")
    p.add_argument("--steps", type=int, default=1000, help="MD steps")
    p.add_argument("--timestep", type=float, default=1.0, help="time step (fs)")
    p.add_argument("--temperature", type=float, default=300.0, help="initial Maxwell-Boltzmann temperature (K)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial velocities")
    p.add_argument("--float64", action="store_true", help="run the model in double precision")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.json", help="drift report (JSON)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_md)


def _check_positive(name: str, value: float | int | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    bad = value < 0 if allow_zero else value <= 0
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        raise UsageError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _direct_is2re(checkpoint: Path, items: Sequence[Any], device: str, batch_size: int) -> list[float]:
    from torch.utils.data import DataLoader

    from flt_mol.train.commands import load_for_inference

    task, model = load_for_inference(checkpoint, device, task="is2re")
    loader = DataLoader(list(items), batch_size=batch_size, collate_fn=task.collate_fn())
    _, pred, _ = task.predict(model, loader)
    return [float(v) for v in pred]


def cmd_relax(args: argparse.Namespace) -> int:
    import ase.io
    import torch

    from flt_mol.calculator import FLTCalculator
    from flt_mol.data.oc20 import write_lmdb
    from flt_mol.fileio import atomic_write
    from flt_mol.train.checkpoint import atomic_write_text

    _check_positive("--fmax", args.fmax)
    _check_positive("--steps", args.steps, allow_zero=True)
    _check_positive("--maxstep", args.maxstep)
    _check_positive("--limit", args.limit)
    _check_positive("--batch-size", args.batch_size)
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} exists and is not a folder")
    if args.is2re_checkpoint is not None and not args.is2re_checkpoint.exists():
        raise FileNotFoundError(f"--is2re-checkpoint {args.is2re_checkpoint} does not exist")
    calc = FLTCalculator(args.checkpoint, device=args.device, batch_size=args.batch_size)
    items, structures = read_structures(args.data, limit=args.limit)
    initial = [a.copy() for a in structures]
    kwargs = {"maxstep": args.maxstep} if args.maxstep is not None else {}
    t0 = time.perf_counter()
    info = relax_many(calc, structures, optimizer=args.optimizer, fmax=args.fmax, steps=args.steps,
                      progress=not args.no_progress and sys.stderr.isatty(), optimizer_kwargs=kwargs)
    seconds = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)

    from flt_mol.calculator import atoms_to_item

    out_items = []
    for d, atoms, r in zip(items, structures, info):
        item = atoms_to_item(atoms)
        item.pos = item.pos.float()
        item.cell = item.cell.float()
        item.y = float(r["energy"])
        item.force = torch.tensor(atoms.calc.results["forces"], dtype=torch.float32)
        if getattr(d, "sid", None) is not None:
            item.sid = int(d.sid)
        out_items.append(item)
        atoms.info.update({"sid": int(getattr(d, "sid", -1) if getattr(d, "sid", None) is not None else -1),
                           "converged": bool(r["converged"]), "steps": int(r["steps"])})
    write_lmdb(out_items, args.out / "relaxed.lmdb", overwrite=True)
    with atomic_write(args.out / "relaxed.extxyz", "w") as fh:
        ase.io.write(fh, structures, format="extxyz")
    per = [{"sid": int(getattr(d, "sid", -1) if getattr(d, "sid", None) is not None else -1), **r}
           for d, r in zip(items, info)]
    atomic_write_text(json.dumps(per, indent=1), args.out / "relaxations.json")
    n_conv = sum(r["converged"] for r in info)
    steps = [r["steps"] for r in info]
    total_steps = sum(steps) + len(info)  # model evaluations: one per step plus the final one
    print(f"relaxed {len(info)} structures ({args.optimizer}, fmax {args.fmax} eV/A): {n_conv} converged, "
          f"median {int(np.median(steps))} steps, {seconds:.1f} s ({1000 * seconds / max(total_steps, 1):.1f} ms "
          "per structure-step, batched)")
    direct = None
    if args.is2re_checkpoint is not None:
        direct = _direct_is2re(args.is2re_checkpoint, items, args.device, args.batch_size)
    metrics = relaxation_metrics(items, structures, [r["energy"] for r in info], direct=direct)
    if args.compare_emt:
        emt = compare_with_emt(initial, structures, optimizer=args.optimizer, fmax=args.fmax, steps=args.steps)
        metrics["emt_minimum"] = emt
        print(f"EMT's own minimum: {emt['distance_to_emt_minimum']:.3f} A from the model's (mean over free atoms "
              f"and structures; EMT moved the atoms {emt['distance_emt_moved']:.3f} A from the start); EMT energy "
              f"of the model's minimum {emt['emt_energy_excess']:+.3f} eV above EMT's")
    if metrics:
        metrics["energy_target"] = calc.energy_target
        metrics["n"] = len(info)
        metrics["converged"] = n_conv
        atomic_write_text(json.dumps(metrics, indent=2), args.out / "metrics.json")
        _print_metrics(metrics, calc.energy_target)
    print(f"wrote {args.out / 'relaxed.lmdb'}, {args.out / 'relaxed.extxyz'}, {args.out / 'relaxations.json'}"
          + (f", {args.out / 'metrics.json'}" if metrics else ""))
    return 0


def _print_metrics(metrics: dict[str, Any], energy_target: str) -> None:
    if "adwt" in metrics:
        a, b = metrics["adwt"], metrics["adwt_initial"]
        print(f"IS2RS ADwT {100 * a['average_distance_within_threshold']:.2f}% (mean distance "
              f"{a['mean_distance']:.3f} A); initial structures: {100 * b['average_distance_within_threshold']:.2f}% "
              f"({b['mean_distance']:.3f} A)")
    if "relax_then_predict" in metrics:
        r = metrics["relax_then_predict"]
        note = "" if energy_target == "y_adsorption" else (
            f" (this checkpoint predicts {energy_target!r}, not the referenced energy y_relaxed holds)")
        line = f"relax-then-predict IS2RE: MAE {r['energy_mae']:.4f} eV, EwT {100 * r['energy_within_threshold']:.2f}%{note}"
        if "direct_is2re" in metrics:
            d = metrics["direct_is2re"]
            line += f"; direct IS2RE: MAE {d['energy_mae']:.4f} eV, EwT {100 * d['energy_within_threshold']:.2f}%"
        print(line)


def cmd_md(args: argparse.Namespace) -> int:
    import torch

    from flt_mol.calculator import FLTCalculator
    from flt_mol.train.checkpoint import atomic_write_text

    _check_positive("--steps", args.steps)
    _check_positive("--timestep", args.timestep)
    _check_positive("--temperature", args.temperature, allow_zero=True)
    if args.index < 0:
        raise UsageError(f"--index must be >= 0, got {args.index}")
    calc = FLTCalculator(args.checkpoint, device=args.device,
                         dtype=torch.float64 if args.float64 else torch.float32)
    _, structures = read_structures(args.data, limit=args.index + 1)
    if args.index >= len(structures):
        raise UsageError(f"--index {args.index}: {args.data} has {len(structures)} structures")
    atoms = structures[args.index]
    report = nve_run(atoms, calc, steps=args.steps, timestep_fs=args.timestep, temperature_K=args.temperature,
                     seed=args.seed, progress=not args.no_progress and sys.stderr.isatty())
    report["float64"] = bool(args.float64)
    atomic_write_text(json.dumps(report, indent=1), args.out)
    print(f"NVE {report['steps']} steps of {report['timestep_fs']} fs, {report['natoms']} atoms "
          f"({report['moving_atoms']} moving), mean T {report['mean_temperature_K']:.0f} K: drift "
          f"{report['drift_ev_per_atom_per_ps']:.3g} eV/atom/ps, max |E - E0| "
          f"{report['max_abs_deviation_ev_per_atom']:.3g} eV/atom ({report['seconds']:.1f} s)")
    print(f"wrote {args.out}")
    return 0
