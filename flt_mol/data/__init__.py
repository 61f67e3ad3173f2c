"""flt_mol.data: the OC20 data path, the embedded EMT-IS2RE data set, text and image loaders.

The public names below are loaded on first access (PEP 562), from the explicit table
``_EXPORTS``: ``import flt_mol.data`` stays free of torch_geometric / lmdb / ase until a name is
used, which keeps ``flt-mol --help`` fast. Nothing registers itself by being imported.

* :class:`OC20LMDB`: a torch ``Dataset`` over an OC20 legacy ``.lmdb`` file or a folder of shards;
  :func:`write_lmdb`, :func:`atoms_to_data` / :func:`data_to_atoms`, :class:`OC20FormatError`;
* :func:`emt_is2re`: path of the embedded EMT-IS2RE LMDB of a split (built on first use);
* :func:`emt_s2ef`: path of the embedded EMT-S2EF LMDB (energies and forces) of a split, derived
  from EMT-IS2RE's structures (built on first use), and its :class:`S2EFConfig`;
* :class:`PeriodicImages`, :func:`collate_atoms`, :class:`Collater`, :class:`AtomsBatch`;
* :class:`TrivialBaselines` (IS2RE), :class:`S2EFBaselines`, :func:`fit_element_references`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "OC20LMDB": "flt_mol.data.oc20",
    "OC20FormatError": "flt_mol.data.oc20",
    "write_lmdb": "flt_mol.data.oc20",
    "atoms_to_data": "flt_mol.data.oc20",
    "data_to_atoms": "flt_mol.data.oc20",
    "emt_is2re": "flt_mol.data.emt",
    "emt_s2ef": "flt_mol.data.s2ef",
    "S2EFConfig": "flt_mol.data.s2ef",
    "PeriodicImages": "flt_mol.data.pbc",
    "collate_atoms": "flt_mol.data.collate",
    "Collater": "flt_mol.data.collate",
    "AtomsBatch": "flt_mol.data.collate",
    "TrivialBaselines": "flt_mol.data.references",
    "S2EFBaselines": "flt_mol.data.references",
    "fit_element_references": "flt_mol.data.references",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flt_mol.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
