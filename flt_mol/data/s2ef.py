"""EMT-S2EF, the embedded default S2EF data set (structure -> energy and forces), derived from
EMT-IS2RE's shipped structures.

OC20's S2EF task scores energies and per-atom forces of single frames taken from relaxation
trajectories. EMT-S2EF makes such frames from the shipped EMT-IS2RE systems
(``datasets/emt_is2re/<split>.npz``, kept systems only) without rerunning any relaxation:

* a seeded subset of each split's systems (:attr:`S2EFConfig.systems`);
* per system the frames of :attr:`S2EFConfig.frames`: the initial structure, intermediate
  structures ``(1 - t) pos_init + t pos_relaxed`` with ``t ~ U(0.1, 0.9)``, and the relaxed
  structure, each **rattled**: every free atom (tag > 0) moves by a Gaussian vector with
  per-component std ``a / sqrt(3)``, so the RMS displacement is ``a ~ U(0.02, 0.2)`` A, drawn per
  frame; fixed atoms (tag 0, ``FixAtoms``) stay where they are;
* positions are rounded to float32 (what the LMDB stores) and then evaluated with ASE's ``EMT``
  (about 14 ms per frame on one core), periodic in all directions like the IS2RE systems. No
  ``pbc`` field is stored, so readers apply OC20's slab convention ``(True, True, False)``: the
  14 A vacuum between periodic copies exceeds EMT's 5.9 A neighbour cutoff, so the values are
  the 2D-periodic slab's.

Determinism: the frames of a system depend only on ``(config.seed, sid)`` through
``numpy.random.default_rng((seed, sid))``, so any system can be regenerated alone (the test
does); the subset of a split depends only on ``(seed, split)``.

Each frame is an OC20 S2EF entry (:mod:`flt_mol.data.oc20`) with

==============  =========  =================================================================
field           shape      meaning
==============  =========  =================================================================
pos             [N, 3]     rattled positions (A), float32
cell            [1, 3, 3]  the IS2RE system's cell
atomic_numbers  [N]        float32
natoms, tags    scalar, N  as in EMT-IS2RE (0 fixed sub-surface, 1 surface, 2 adsorbate)
fixed           [N]        float32, 1.0 on tag-0 atoms
y               scalar     **total** EMT energy of the frame (eV), the S2EF energy target
force           [N, 3]     EMT forces (eV/A) on **every** atom, fixed ones included (the raw
                           gradient ``-dE/dpos``; OC20 scores free atoms only)
y_adsorption    scalar     ``y - E(clean slab, relaxed) - E(adsorbate, gas)`` with the IS2RE
                           references of the system: the adsorption-style (referenced) energy
sid             scalar     the EMT-IS2RE system id
fid             scalar     frame index within the system (0 .. frames - 1)
frame_type      scalar     0 initial, 1 intermediate, 2 relaxed (before rattling)
rattle          scalar     the frame's RMS displacement ``a`` (A)
==============  =========  =================================================================

:func:`emt_s2ef` builds a split's LMDB on first use (default config: 1,000 train systems and
100 per validation split, 4 frames each, so 4,000 + 4 x 400 frames; measured 98.6 s for all
splits on one busy core, 74 s of it train), cached like the IS2RE ones under

    <root>/emt_s2ef/<16 hex of sha256(IS2RE split file hash, config, version)>/<split>.lmdb

with ``root`` = the argument, else ``$FLT_MOL_DATA_DIR``, else ``~/.cache/flt_mol``, written
atomically (temporary name + rename).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from flt_mol.data.emt import EMT_SPLITS, _check_split, _sha256, _shipped_file, cache_root, load_split_arrays

__all__ = [
    "S2EF_SPLITS",
    "GENERATOR_VERSION",
    "FRAME_INITIAL",
    "FRAME_INTERMEDIATE",
    "FRAME_RELAXED",
    "S2EFConfig",
    "select_systems",
    "system_frames",
    "emt_energy_forces",
    "system_items",
    "split_items",
    "emt_s2ef",
    "s2ef_statistics",
    "split_summary",
    "SHIPPED_S2EF_DIR",
]

S2EF_SPLITS: tuple[str, ...] = EMT_SPLITS
GENERATOR_VERSION = 1  # bump when the frames a config produces change
FRAME_INITIAL, FRAME_INTERMEDIATE, FRAME_RELAXED = 0, 1, 2
SHIPPED_S2EF_DIR = Path(__file__).resolve().parents[2] / "datasets" / "emt_s2ef"


@dataclasses.dataclass(frozen=True)
class S2EFConfig:
    """Everything that decides the EMT-S2EF frames.

    Args:
        seed: subset and rattles are drawn from generators seeded by ``(seed, ...)``.
        systems: ``(split, number of IS2RE systems)``; a split with fewer kept systems uses all.
        frames: frame types per system, in ``fid`` order (``FRAME_*``).
        rattle: range of the per-frame RMS displacement of the free atoms (A), uniform.
        interpolation: range of ``t`` for intermediate frames, uniform.
    """

    seed: int = 0
    systems: tuple[tuple[str, int], ...] = (
        ("train", 1000), ("val_id", 100), ("val_ood_ads", 100), ("val_ood_cat", 100), ("val_ood_both", 100),
    )
    frames: tuple[int, ...] = (FRAME_INITIAL, FRAME_INTERMEDIATE, FRAME_INTERMEDIATE, FRAME_RELAXED)
    rattle: tuple[float, float] = (0.02, 0.2)
    interpolation: tuple[float, float] = (0.1, 0.9)

    def num_systems(self, split: str) -> int:
        _check_split(split)
        table = dict(self.systems)
        if split not in table:
            raise ValueError(f"S2EFConfig.systems has no entry for split {split!r}")
        return int(table[split])

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def select_systems(arrays: dict[str, np.ndarray], split: str, config: S2EFConfig) -> np.ndarray:
    """Indices (into the split's arrays, ascending) of the kept systems used for S2EF: the first
    ``config.num_systems(split)`` of a permutation seeded by ``(seed, split)``."""
    kept = np.flatnonzero(arrays["flags"] == 0)
    rng = np.random.default_rng((config.seed, 2, EMT_SPLITS.index(split)))
    chosen = rng.permutation(kept)[: config.num_systems(split)]
    return np.sort(chosen)


def system_frames(arrays: dict[str, np.ndarray], index: int, config: S2EFConfig) -> list[dict[str, Any]]:
    """The rattled frames of system ``index`` of a split's arrays (module docstring).

    Returns:
        one dict per frame: ``pos`` float32 ``[N, 3]``, ``frame_type``, ``rattle`` (A), ``t``
        (interpolation weight of ``pos_relaxed``: 0 initial, 1 relaxed).
    """
    a, b = int(arrays["offsets"][index]), int(arrays["offsets"][index + 1])
    pos_init = arrays["pos_init"][a:b].astype(np.float64)
    pos_relaxed = arrays["pos_relaxed"][a:b].astype(np.float64)
    free = arrays["tags"][a:b] != 0
    rng = np.random.default_rng((config.seed, int(arrays["sid"][index])))
    out = []
    for kind in config.frames:
        if kind == FRAME_INITIAL:
            t = 0.0
        elif kind == FRAME_RELAXED:
            t = 1.0
        elif kind == FRAME_INTERMEDIATE:
            t = float(rng.uniform(*config.interpolation))
        else:
            raise ValueError(f"unknown frame type {kind!r} (0 initial, 1 intermediate, 2 relaxed)")
        amplitude = float(rng.uniform(*config.rattle))
        pos = (1.0 - t) * pos_init + t * pos_relaxed
        pos[free] += rng.normal(scale=amplitude / np.sqrt(3.0), size=(int(free.sum()), 3))
        out.append({"pos": pos.astype(np.float32), "frame_type": int(kind), "rattle": amplitude, "t": t})
    return out


def emt_energy_forces(numbers: np.ndarray, pos: np.ndarray, cell: np.ndarray) -> tuple[float, np.ndarray]:
    """EMT total energy (eV) and forces ``[N, 3]`` (eV/A, no constraint applied) of a periodic
    structure, evaluated at ``pos`` converted to float64."""
    from ase import Atoms
    from ase.calculators.emt import EMT

    atoms = Atoms(numbers=np.asarray(numbers, dtype=np.int64), positions=np.asarray(pos, dtype=np.float64),
                  cell=np.asarray(cell, dtype=np.float64), pbc=True)
    atoms.calc = EMT()
    return float(atoms.get_potential_energy()), np.asarray(atoms.get_forces(), dtype=np.float64)


def system_items(arrays: dict[str, np.ndarray], index: int, config: S2EFConfig) -> list[Any]:
    """OC20 S2EF ``Data`` of every frame of system ``index`` (fields in the module docstring)."""
    import torch
    from torch_geometric.data import Data

    a, b = int(arrays["offsets"][index]), int(arrays["offsets"][index + 1])
    numbers = arrays["numbers"][a:b]
    tags = torch.from_numpy(arrays["tags"][a:b].astype(np.int64))
    cell = arrays["cell"][index]
    reference = float(arrays["e_slab"][index] + arrays["e_gas"][index])
    items = []
    for fid, frame in enumerate(system_frames(arrays, index, config)):
        energy, forces = emt_energy_forces(numbers, frame["pos"], cell)
        items.append(Data(
            pos=torch.from_numpy(frame["pos"]),
            cell=torch.from_numpy(cell.astype(np.float32)).view(1, 3, 3),
            atomic_numbers=torch.from_numpy(numbers.astype(np.float32)),
            natoms=b - a,
            tags=tags,
            fixed=(tags == 0).float(),
            y=energy,
            force=torch.from_numpy(forces.astype(np.float32)),
            y_adsorption=energy - reference,
            sid=int(arrays["sid"][index]),
            fid=fid,
            frame_type=frame["frame_type"],
            rattle=frame["rattle"],
        ))
    return items


def split_items(split: str, *, config: S2EFConfig | None = None,
                source: str | os.PathLike | None = None) -> Iterator[Any]:
    """Every frame of a split, system by system (evaluates EMT: ~14 ms per frame)."""
    config = config if config is not None else S2EFConfig()
    arrays = load_split_arrays(split, source=source)
    for index in select_systems(arrays, split, config):
        yield from system_items(arrays, int(index), config)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cache_key(shipped: Path, config: S2EFConfig) -> str:
    h = hashlib.sha256()
    h.update(_sha256(shipped).encode())
    h.update(config.to_json().encode())
    h.update(f"v{GENERATOR_VERSION}".encode())
    return h.hexdigest()[:16]


def emt_s2ef(split: str, *, root: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
             config: S2EFConfig | None = None) -> Path:
    """Path of the OC20 S2EF LMDB of an EMT-S2EF split, built on first use (module docstring).

    Args:
        split: one of :data:`S2EF_SPLITS` (EMT-IS2RE's splits).
        root: cache root (default ``$FLT_MOL_DATA_DIR``, else ``~/.cache/flt_mol``).
        source: folder of the shipped EMT-IS2RE ``<split>.npz`` files (default
            ``datasets/emt_is2re``).
        config: frame settings (default :class:`S2EFConfig`); part of the cache key.

    Raises:
        ValueError: unknown split (the message lists the valid ones).
        FileNotFoundError: the shipped EMT-IS2RE file is missing.
    """
    from flt_mol.data.oc20 import write_lmdb

    config = config if config is not None else S2EFConfig()
    config.num_systems(split)  # validates the split
    shipped = _shipped_file(split, Path(source) if source is not None else None)
    folder = cache_root(root) / "emt_s2ef" / _cache_key(shipped, config)
    path = folder / f"{split}.lmdb"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / "config.json", config.to_json() + "\n")  # what the folder holds
    # A private name, then a rename: two racing processes both write the same file harmlessly.
    tmp = folder / f".{split}.{os.getpid()}.{uuid.uuid4().hex[:8]}.lmdb"
    try:
        write_lmdb(split_items(split, config=config, source=shipped.parent), tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# statistics and trivial baselines


def _load(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """The frames of an S2EF LMDB and their per-frame arrays (energies, forces, free mask)."""
    from flt_mol.data.oc20 import OC20LMDB

    ds = OC20LMDB(path)
    items = [ds[i] for i in range(len(ds))]
    return items, {
        "y": np.array([d.y for d in items], dtype=np.float64),
        "y_adsorption": np.array([d.y_adsorption for d in items], dtype=np.float64),
        "force": np.concatenate([d.force.numpy() for d in items]).astype(np.float64),
        "fixed": np.concatenate([d.fixed.numpy() for d in items]),
        "sid": np.array([d.sid for d in items], dtype=np.int64),
    }


def s2ef_statistics(*, root: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
                    config: S2EFConfig | None = None, splits: tuple[str, ...] = S2EF_SPLITS) -> dict[str, Any]:
    """Sizes, energy / force statistics and trivial baselines of EMT-S2EF splits (builds them).

    Baselines (:class:`flt_mol.data.references.S2EFBaselines`) are fitted on ``train``'s frames
    and scored with OC20's S2EF metrics (forces on free atoms): energy = train mean of ``y`` or
    a composition-linear fit of ``y``, with zero forces; plus ``adsorption_train_mean``, the
    ``y_adsorption`` MAE of its train mean.

    Returns:
        ``{split: {"n_frames", "n_systems", "n_free_atoms", "energy_mean", "energy_std",
        "adsorption_mean", "adsorption_std", "force_rms", "force_abs_mean", "force_abs_max",
        "force_norm_median", "force_norm_p99", "baselines": {name: {metric: value}}}}``; force
        statistics over free atoms (components, or per-atom norms).
    """
    from flt_mol.data.references import S2EFBaselines

    data = {s: _load(emt_s2ef(s, root=root, source=source, config=config)) for s in dict.fromkeys(("train", *splits))}
    train_items, train = data["train"]
    fit = S2EFBaselines.fit(train_items)
    ads_mean = float(train["y_adsorption"].mean())
    out: dict[str, Any] = {}
    for s in splits:
        items, d = data[s]
        baselines: dict[str, Any] = fit.evaluate(items)
        baselines["adsorption_train_mean"] = {"energy_mae": float(np.abs(d["y_adsorption"] - ads_mean).mean())}
        out[s] = {**_summary(d), "baselines": baselines}
    return out


def _summary(d: dict[str, Any]) -> dict[str, Any]:
    f = d["force"][d["fixed"] == 0]
    norms = np.linalg.norm(f, axis=1)
    return {
        "n_frames": int(len(d["y"])),
        "n_systems": int(len(np.unique(d["sid"]))),
        "n_free_atoms": int(len(f)),
        "energy_mean": float(d["y"].mean()),
        "energy_std": float(d["y"].std()),
        "adsorption_mean": float(d["y_adsorption"].mean()),
        "adsorption_std": float(d["y_adsorption"].std()),
        "force_rms": float(np.sqrt((f ** 2).mean())),
        "force_abs_mean": float(np.abs(f).mean()),
        "force_abs_max": float(np.abs(f).max()),
        "force_norm_median": float(np.median(norms)),
        "force_norm_p99": float(np.quantile(norms, 0.99)),
    }


def split_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Sizes and energy / force statistics (free atoms) of one EMT-S2EF LMDB, no baselines."""
    return _summary(_load(Path(path))[1])
