"""The S2EF model: total energy and conservative forces ``F = -dE/dr`` from the IS2RE trunk.

Structure to energy and forces (OC20's S2EF task) with the model of :mod:`flt_mol.models.is2re`
in its exactly periodic form (``periodic: reciprocal``, DESIGN §7), reading out the energy of
every real atom::

    E(r)  = sum_{i real} gamma_{t_i} MLP(LN(h_i(r)))          (readout: all)
    F_i   = -dE/dr_i                                          (autograd, through everything)

The gradient runs through every place the positions enter: the context sums, the random
features of the attention RPE (wrapped fractional phases ``2 pi q . u``), the FAVOR+ kernels and
the linear attention. No displacement is modelled (no displacement head). Because the random
features are buffers drawn once (``run.redraw_interval: 0``), ``E`` is one fixed function of the
positions and ``F`` is exactly its gradient: forces are curl-free, and energy is conserved along
a Newtonian trajectory up to the integrator's error. The properties the model guarantees per
draw of the features, and that the tests check in fp64:

* ``F`` equals the finite differences of ``E``;
* rotating the structure with its cell rotates ``F`` (``F -> F R^T``); wrapping an atom by a
  lattice vector leaves ``E`` and every ``F`` unchanged (the reciprocal-lattice phases are
  integers times ``2 pi`` apart); translating along the slab normal changes nothing;
* in-plane translations change nothing either, for one FLT draw too: the attention features'
  phases are measured from a canonical origin (the adsorbate's circular mean, or all atoms';
  :meth:`~flt_mol.attention.periodic.PeriodicLattice.orient`), so the forces sum to zero;
* ``E`` is smooth in the positions: the in-plane basis sign is taken from the reduced cell
  (``periodic_sign = "basis"``), not from the structure (which jumps where its probe crosses 0);
  the price is that ``(a, b) -> (-a, -b)`` changes one FLT draw's attention (not the mask);
* ``F`` is zero on padding and does not depend on what else is in the batch.

Energies and forces are in the task's normalised units: the task maps
``E_eV = std * E + mean + ref(z)`` and ``F_eV = std * F`` (``ref`` does not depend on positions).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from flt_mol.models.is2re import IS2REModel, IS2REModelConfig

__all__ = ["S2EFModel", "S2EFModelConfig", "conservative_forces", "FORCE_MODES"]

FORCE_MODES = ("none", "conservative")


@dataclass
class S2EFModelConfig(IS2REModelConfig):
    """:class:`~flt_mol.models.is2re.IS2REModelConfig` plus ``forces``, with S2EF's defaults.

    ``forces``: ``conservative`` (``F = -dE/dr`` by autograd) or ``none`` (energy only).
    ``conservative`` requires ``periodic: reciprocal``: with image tokens the energy is a function
    of the unit-cell representation, and its gradient is not a force on the crystal.
    """

    periodic: str = "reciprocal"
    readout: str = "all"
    displacement_head: bool = False
    forces: str = "conservative"

    def validate(self) -> None:
        from flt_mol.errors import ConfigError

        super().validate()
        if self.forces not in FORCE_MODES:
            raise ConfigError(f"model.forces must be one of {FORCE_MODES}, got {self.forces!r}")
        if self.forces == "conservative" and self.periodic != "reciprocal":
            raise ConfigError(
                "model.forces: conservative needs model.periodic: reciprocal (the gradient of an "
                "image-token model depends on the unit-cell representation: not a physical force)"
            )
        if self.displacement_head:
            raise ConfigError("model.displacement_head must be false for S2EF (forces are -dE/dr)")


def conservative_forces(energy: torch.Tensor, pos: torch.Tensor, *, create_graph: bool) -> torch.Tensor:
    """``F = -d(sum_b E_b)/d pos``; structures do not interact, so row ``b`` is ``-dE_b/d pos_b``.

    Shapes: ``energy [B]``, ``pos [B, L, 3]`` (a leaf of ``energy``'s graph) -> ``[B, L, 3]``.
    ``create_graph``: keep the graph of the gradient (training on forces needs it).
    """
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return -grad


def _with_pos(batch: Any, pos: torch.Tensor) -> Any:
    if dataclasses.is_dataclass(batch):
        return dataclasses.replace(batch, pos=pos)
    out = copy.copy(batch)
    out.pos = pos
    return out


class S2EFModel(IS2REModel):
    """Structure -> normalised total energy and forces (module docstring).

    Args:
        config: :class:`S2EFModelConfig`.

    Forward input: an :class:`flt_mol.data.collate.AtomsBatch` (``periodic: reciprocal`` uses its
    ``cell`` and ``pbc``; no image tokens). Forward output: ``{"energy": [B], "forces": [B, L, 3]
    or None}`` in normalised units, forces zero on padding.
    """

    def __init__(self, config: S2EFModelConfig):
        super().__init__(config)
        # A potential must be smooth in the positions: keep the reduced basis's sign (see the
        # module docstring) in every periodic draw.
        for rpe in (self.rpe, self.context_rpe):
            if rpe is not None:
                rpe.periodic_sign = "basis"

    def forward(self, batch: Any, *, forces: bool | None = None,
                create_graph: bool | None = None) -> dict[str, torch.Tensor | None]:
        """``forces``: compute them (default: ``config.forces == "conservative"``).
        ``create_graph``: keep the forces' graph (default: in training mode, where the force loss
        back-propagates through them); works under ``torch.no_grad()`` as well (gradients to the
        positions are switched on locally)."""
        want = self.config.forces == "conservative" if forces is None else forces
        if want and self.config.forces != "conservative":
            raise ValueError("this model was built with forces: none")
        if not want:
            return {"energy": super().forward(batch)["energy"], "forces": None}
        create = self.training if create_graph is None else create_graph
        with torch.enable_grad():
            pos = batch.pos
            if not pos.requires_grad:
                pos = pos.detach().requires_grad_(True)
            energy = super().forward(_with_pos(batch, pos))["energy"]
            f = conservative_forces(energy, pos, create_graph=create)
        real = (~batch.padding_mask & ~batch.is_image).to(f.dtype)
        if not create:
            energy = energy.detach()
        return {"energy": energy, "forces": f * real[..., None]}
