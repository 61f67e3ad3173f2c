"""``FLTCalculator``: a trained S2EF checkpoint as an ASE calculator (energy and forces).

    from ase.optimize import BFGS
    from flt_mol import FLTCalculator

    calc = FLTCalculator("runs/emt_s2ef_flt/best.pt")
    atoms.calc = calc
    BFGS(atoms).run(fmax=0.05)                 # any ase.optimize optimiser, ase.md integrators
    calc.predict_many(list_of_atoms)           # many structures in padded batches

What it returns, in ASE's units (eV, eV/A):

* ``energy`` (and ``free_energy``, the same number): the model's energy of the structure, in the
  checkpoint's energy convention (``data.energy_target``: total ``y``, or ``y_adsorption``
  referenced to the clean slab and the gas-phase adsorbate, as OC20's S2EF data);
* ``forces`` ``[N, 3]``: ``-dE/dr`` on **every** atom, the raw gradient of that energy (as ASE's
  own calculators do, e.g. ``EMT``). Constraints are ASE's business: ``atoms.get_forces()`` applies
  the structure's ``FixAtoms`` (fixed atoms then read 0) and the optimisers and MD integrators
  move free atoms only; ``atoms.get_forces(apply_constraint=False)`` gives the raw gradient.

How a structure is read: OC20 conventions, as in training. ``atoms.get_tags()`` are OC20 tags (0
fixed sub-surface, 1 surface, 2 adsorbate; :func:`flt_mol.data.oc20.oc20_tags_from_ase_layers`
converts ASE-built slabs), atoms of every ``FixAtoms`` constraint are "fixed", and
``atoms.pbc`` says which cell rows are periodic (OC20's slabs: ``(True, True, False)``; a slab
given with ``pbc=True`` is treated as 3D periodic, which differs by ``exp(-gap^2 / 2 s^2)``, DESIGN
§7). The model's random features are the checkpoint's (never redrawn), so energies and forces
are deterministic and the forces are exactly the gradient of the energies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

__all__ = ["FLTCalculator", "atoms_to_item", "translation_sensitivity"]


def atoms_to_item(atoms: Any) -> Any:
    """The OC20 ``Data`` the model reads for an ASE ``Atoms`` (positions, cell, pbc, numbers, OC20
    tags, ``fixed`` from ``FixAtoms``); nothing is read from an attached calculator."""
    from torch_geometric.data import Data

    from flt_mol.data.oc20 import structure_fields

    return Data(**structure_fields(atoms, dtype=torch.float64))


class FLTCalculator(Calculator):
    """ASE calculator of a trained flt_mol S2EF checkpoint (module docstring).

    Args:
        checkpoint: ``checkpoint.pt`` / ``best.pt`` written by ``flt-mol train`` with ``task: s2ef``.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        dtype: ``torch.float32`` (default, as trained) or ``torch.float64`` (the same function in
            double precision, e.g. for finite-difference checks or long NVE runs).
        batch_size: structures per forward pass of :meth:`predict_many`.

    Raises:
        FileNotFoundError / CheckpointError: no file, or not an S2EF checkpoint.
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(self, checkpoint: str | Path, device: str = "cpu", *, dtype: torch.dtype = torch.float32,
                 batch_size: int = 32, **kwargs: Any):
        super().__init__(**kwargs)
        from flt_mol.train.commands import load_for_inference

        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.checkpoint = Path(checkpoint)
        self.task, self.model = load_for_inference(checkpoint, device, task="s2ef")
        self.model.to(dtype)
        self.dtype = dtype
        self.device = next(self.model.parameters()).device
        self.batch_size = int(batch_size)
        self.energy_target = self.task.data.energy_target

    @classmethod
    def from_model(cls, task: Any, model: torch.nn.Module, *, dtype: torch.dtype = torch.float32,
                   batch_size: int = 32) -> "FLTCalculator":
        """A calculator around an in-memory ``(S2EFTask, S2EFModel)`` pair (tests, notebooks)."""
        calc = cls.__new__(cls)
        Calculator.__init__(calc)
        calc.checkpoint = None
        calc.task, calc.model = task, model.to(dtype).eval()
        calc.dtype = dtype
        calc.device = next(model.parameters()).device
        calc.batch_size = int(batch_size)
        calc.energy_target = task.data.energy_target
        return calc

    def __repr__(self) -> str:
        return (f"FLTCalculator(checkpoint={str(self.checkpoint)!r}, device={str(self.device)!r}, "
                f"dtype={self.dtype}, energy={self.energy_target!r})")

    # -- batched inference ---------------------------------------------------------------------
    @torch.no_grad()
    def predict_many(self, structures: Sequence[Any], *, batch_size: int | None = None) -> list[dict[str, Any]]:
        """Energies and forces of many structures, in padded batches of ``batch_size``.

        Returns one ``{"energy": float (eV), "forces": float64 [N, 3] (eV/A)}`` per structure, in
        order, with the same meaning as :meth:`calculate` (forces on every atom, unconstrained).
        """
        from dataclasses import replace

        size = self.batch_size if batch_size is None else int(batch_size)
        collate = self.task.collate_fn()
        out: list[dict[str, Any]] = []
        structures = list(structures)
        for start in range(0, len(structures), size):
            chunk = structures[start:start + size]
            batch = collate([atoms_to_item(a) for a in chunk])
            # collate_atoms stores fp32 positions; keep the caller's fp64 positions in fp64 runs.
            if self.dtype == torch.float64:
                pos = torch.zeros(batch.pos.shape, dtype=torch.float64)
                for b, a in enumerate(chunk):
                    pos[b, : len(a)] = torch.from_numpy(np.asarray(a.get_positions(), dtype=np.float64))
                batch = replace(batch, pos=pos, cell=torch.stack([
                    torch.from_numpy(np.asarray(a.get_cell(complete=True), dtype=np.float64)) for a in chunk]))
            batch = batch.to(self.device)
            energy, forces = self.task.predict_batch(self.model, batch)
            for b, a in enumerate(chunk):
                out.append({"energy": float(energy[b]), "forces": forces[b, : len(a)].cpu().numpy().astype(np.float64)})
        return out

    # -- ASE interface ---------------------------------------------------------------------------
    def calculate(self, atoms: Any = None, properties: Sequence[str] = ("energy",),
                  system_changes: Sequence[str] = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        result = self.predict_many([self.atoms], batch_size=1)[0]
        self.results = {"energy": result["energy"], "free_energy": result["energy"], "forces": result["forces"]}


def translation_sensitivity(calc: FLTCalculator, structures: Sequence[Any], *, shifts: int = 8,
                            seed: int = 0) -> dict[str, float]:
    """How far one feature draw is from in-plane translation invariance: a check (float rounding
    for the periodic model, whose attention phases are measured from a canonical origin).

    Each structure is moved by ``shifts`` random in-plane translations ``s_a a + s_b b``
    (``s ~ U(0, 1)``). Returns ``{"energy_std": mean over structures of the energy's std over the
    translations (eV), "force_change": mean |F(moved) - F| over free-atom components (eV/A),
    "net_force": mean over structures of |sum_i F_i| over all atoms (eV/A; 0 for a translation
    invariant energy), "force_norm": mean free-atom |F_i| (eV/A) for scale}``.
    """
    rng = np.random.default_rng(seed)
    base = calc.predict_many(structures)
    stds, changes, nets, norms = [], [], [], []
    for atoms, ref in zip(structures, base):
        cell = np.asarray(atoms.get_cell(complete=True))
        moved = []
        for _ in range(shifts):
            copy_ = atoms.copy()
            frac = rng.random(2)
            copy_.positions += frac[0] * cell[0] + frac[1] * cell[1]
            moved.append(copy_)
        out = calc.predict_many(moved)
        free = np.ones(len(atoms), dtype=bool)
        for c in atoms.constraints:
            if hasattr(c, "index"):
                free[np.asarray(c.index)] = False
        stds.append(float(np.std([ref["energy"]] + [o["energy"] for o in out])))
        changes.append(float(np.mean([np.abs(o["forces"][free] - ref["forces"][free]).mean() for o in out])))
        nets.append(float(np.linalg.norm(ref["forces"].sum(0))))
        norms.append(float(np.linalg.norm(ref["forces"][free], axis=1).mean()))
    return {"energy_std": float(np.mean(stds)), "force_change": float(np.mean(changes)),
            "net_force": float(np.mean(nets)), "force_norm": float(np.mean(norms)), "n": len(structures)}
