"""Generator of EMT-IS2RE, the embedded default IS2RE data set (DESIGN.md §4).

Every system is an fcc slab (111, 100 or 110 facet) of one EMT metal or a random alloy of two or
three, with one H/C/N/O adsorbate from the OC20 adsorbate library, relaxed under ASE's EMT. The
target is the adsorption energy of the relaxed structure

    y_relaxed = E(slab + ads, relaxed) - E(slab, relaxed) - E(adsorbate, relaxed in vacuum),

with the gas reference being the *isolated adsorbate* relaxed under EMT (not per-element atomic or
molecular references): EMT's molecular energies are poor, and subtracting the adsorbate's own EMT
energy leaves the interaction with the surface (plus the adsorbate's deformation), which is what
the local environment decides. ``y_init`` is the same difference for the unrelaxed initial
structure (the slab term is the relaxed clean slab in both cases, as in OC20).

Determinism: surface ``k`` of split ``s`` is generated from ``numpy.random.default_rng((seed,
split_code, k))`` alone, so any surface (and its placements) can be regenerated independently, in
any order; a run writes one shard per chunk of surfaces and can be resumed.

Split design (mirrors OC20):

* adsorbates: a seeded ~25% of the library is held out (``val_ood_ads``, ``val_ood_both``);
* catalysts: a seeded ~25% of the binary and ternary element combinations are held out
  (``val_ood_cat``, ``val_ood_both``); unary slabs and all elements appear in training;
* ``train`` and ``val_id`` draw from the same in-distribution pools (different surfaces).

Per surface: ``ads_per_surface`` adsorbates, each at ``sites_per_ads`` different sites (top,
bridge or hollow, found on the actual alloy surface by a periodic Delaunay triangulation of the
top-layer atoms), so that systems sharing slab and adsorbate differ only by the local environment.

Anomaly flags (OC20 style, a bit mask): 1 = desorbed (no adsorbate atom within
``1.5 * (r_cov_i + r_cov_j)`` of a slab atom), 2 = dissociated (the adsorbate bond graph, bonds
at ``d < 1.5 * (r_cov_i + r_cov_j)``, changed during relaxation; 1.5 rather than OC20's tighter
cut-off because EMT's own molecular bond lengths are up to 25% off the library's), 4 = surface
reconstructed (a slab atom moved more than 1 A from the relaxed clean slab), 8 = an optimiser
(slab or system) hit its step cap. Anomalous systems are kept in the shipped files with their
flags and dropped when the LMDBs are built (:mod:`flt_mol.data.emt`).

Gas references, the alternative not taken: OC20 uses per-element references from H2, H2O, CO and
N2; under EMT those molecules' energies are unphysical, so the adsorbate's own EMT energy is the
cleaner reference here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import numpy as np

METALS: tuple[str, ...] = ("Al", "Cu", "Ag", "Au", "Ni", "Pd", "Pt")
FACETS: tuple[str, ...] = ("111", "100", "110")
SPLITS: tuple[str, ...] = ("train", "val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")
SPLIT_CODES: dict[str, int] = {name: i for i, name in enumerate(SPLITS)}
SITE_TYPES: tuple[str, ...] = ("top", "bridge", "hollow")
EMT_ADSORBATE_ELEMENTS = frozenset({"H", "C", "N", "O"})

# OC20 adsorbate-library indices kept for EMT. EMT (a metal potential with crude H/C/N/O
# parameters) tears most polyatomic adsorbates apart on a metal surface. Screen 1: 22 entries
# stayed intact (every bond of the library geometry under 1.5x the covalent-radius sum after
# relaxation) on a top site of Cu, Pt and Al(111), out of the whole H/C/N/O library (86
# entries). Screen 2: of those, 3 (*OH2), 24 (*CCH2), 44 (*OCHCH3), 59 (*ONN(CH3)2) and
# 62 (*ONH) were anomalous (mostly dissociated) in over a third of 300 prototype systems on random
# alloy sites and were dropped too.
EMT_STABLE_ADSORBATES: tuple[int, ...] = (
    0, 1, 2, 4, 5, 6, 13, 18, 19, 61, 69, 71, 74, 76, 77, 81, 83,
)

FLAG_DESORBED = 1
FLAG_DISSOCIATED = 2
FLAG_RECONSTRUCTED = 4
FLAG_NOT_CONVERGED = 8

# Built-in adsorbates used only when fairchem-data-oc is not installed: (smiles-like name,
# symbols, positions with the binding atom at the origin, binding indices).
_FALLBACK_ADSORBATES: tuple[tuple[str, tuple[str, ...], tuple[tuple[float, float, float], ...], tuple[int, ...]], ...] = (
    ("*O", ("O",), ((0.0, 0.0, 0.0),), (0,)),
    ("*H", ("H",), ((0.0, 0.0, 0.0),), (0,)),
    ("*C", ("C",), ((0.0, 0.0, 0.0),), (0,)),
    ("*N", ("N",), ((0.0, 0.0, 0.0),), (0,)),
    ("*OH", ("O", "H"), ((0.0, 0.0, 0.0), (0.0, 0.0, 0.97)), (0,)),
    ("*CO", ("C", "O"), ((0.0, 0.0, 0.0), (0.0, 0.0, 1.15)), (0,)),
    ("*NO", ("N", "O"), ((0.0, 0.0, 0.0), (0.0, 0.0, 1.16)), (0,)),
    ("*CH", ("C", "H"), ((0.0, 0.0, 0.0), (0.0, 0.0, 1.09)), (0,)),
    ("*NH", ("N", "H"), ((0.0, 0.0, 0.0), (0.0, 0.0, 1.02)), (0,)),
    ("*N2", ("N", "N"), ((0.0, 0.0, 0.0), (0.0, 0.0, 1.10)), (0,)),
    ("*OH2", ("O", "H", "H"), ((0.0, 0.0, 0.0), (0.76, 0.0, 0.59), (-0.76, 0.0, 0.59)), (0,)),
    ("*NH2", ("N", "H", "H"), ((0.0, 0.0, 0.0), (0.81, 0.0, 0.58), (-0.81, 0.0, 0.58)), (0,)),
    ("*CH2", ("C", "H", "H"), ((0.0, 0.0, 0.0), (0.87, 0.0, 0.63), (-0.87, 0.0, 0.63)), (0,)),
    ("*OOH", ("O", "O", "H"), ((0.0, 0.0, 0.0), (0.0, 0.0, 1.45), (0.93, 0.0, 1.70)), (0,)),
    ("*COH", ("C", "O", "H"), ((0.0, 0.0, 0.0), (0.0, 0.0, 1.33), (0.93, 0.0, 1.60)), (0,)),
    ("*CH3", ("C", "H", "H", "H"), ((0.0, 0.0, 0.0), (1.03, 0.0, 0.36), (-0.51, 0.89, 0.36), (-0.51, -0.89, 0.36)), (0,)),
)


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Settings of one generation run (everything that decides the output).

    Args:
        seed: master seed; surface ``k`` of split ``s`` uses ``default_rng((seed, code(s), k))``.
        targets: minimum number of non-anomalous systems per split; a run keeps generating
            surfaces of a split until it has at least this many.
        ads_per_surface: adsorbates placed (separately) on each surface.
        sites_per_ads: sites per adsorbate and surface.
        surfaces_per_chunk: surfaces per shard file.
        fmax: force threshold of the optimiser (eV/A).
        max_steps: step cap of the optimiser (systems hitting it are flagged).
        vacuum: vacuum on each side of the slab (A).
        holdout_fraction: fraction of adsorbates and of alloy element combinations held out.
    """

    seed: int = 0
    targets: tuple[tuple[str, int], ...] = (
        ("val_id", 500), ("val_ood_ads", 500), ("val_ood_cat", 500), ("val_ood_both", 500),
        ("train", 5000),
    )
    ads_per_surface: int = 2
    sites_per_ads: int = 2
    surfaces_per_chunk: int = 25
    fmax: float = 0.05
    max_steps: int = 200
    vacuum: float = 7.0
    holdout_fraction: float = 0.25

    def target(self, split: str) -> int:
        return dict(self.targets)[split]

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "GeneratorConfig":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - names
        if unknown:
            raise ValueError(f"GeneratorConfig: unknown field(s) {sorted(unknown)}")
        obj = dict(obj)
        if "targets" in obj:
            obj["targets"] = tuple((str(k), int(v)) for k, v in obj["targets"])
        return cls(**obj)


# --------------------------------------------------------------------------------------------
# adsorbates and holdout pools


@dataclasses.dataclass(frozen=True)
class Adsorbate:
    """One library adsorbate: index in the library, name (OC20 SMILES-like), symbols,
    positions (A), binding atom indices."""

    index: int
    name: str
    symbols: tuple[str, ...]
    positions: np.ndarray
    binding: tuple[int, ...]


def load_adsorbates() -> tuple[list[Adsorbate], str]:
    """The OC20 adsorbate library restricted to H/C/N/O, or the built-in fallback list.

    Returns:
        (adsorbates, source) with source ``"fairchem-data-oc"`` or ``"builtin"``.
    """
    try:
        import fairchem.data.oc as oc_pkg
    except ModuleNotFoundError:
        out = [
            Adsorbate(i, name, syms, np.asarray(pos, dtype=float), bind)
            for i, (name, syms, pos, bind) in enumerate(_FALLBACK_ADSORBATES)
        ]
        return out, "builtin"
    path = Path(oc_pkg.__file__).parent / "databases" / "pkls" / "adsorbates.pkl"
    with open(path, "rb") as fh:
        # A pickle shipped inside an installed package (ASE Atoms objects); trusted like its code.
        table = pickle.load(fh)
    out = []
    for idx in sorted(table):
        atoms, smiles, binding, _reaction = table[idx]
        syms = tuple(atoms.get_chemical_symbols())
        if not set(syms) <= EMT_ADSORBATE_ELEMENTS or int(idx) not in EMT_STABLE_ADSORBATES:
            continue
        out.append(Adsorbate(int(idx), str(smiles), syms, np.array(atoms.positions, dtype=float),
                             tuple(int(b) for b in np.atleast_1d(binding))))
    return out, "fairchem-data-oc"


def element_combinations() -> list[tuple[str, ...]]:
    """All unary, binary and ternary combinations of :data:`METALS` (sorted tuples)."""
    from itertools import combinations

    return [c for n in (1, 2, 3) for c in combinations(METALS, n)]


def holdout_pools(*, seed: int, num_adsorbates: int, holdout_fraction: float
                  ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]], list[tuple[str, ...]]]:
    """Split adsorbate positions (into the loaded list) and element combinations into
    in-distribution and held-out pools, deterministically from ``seed``.

    Returns:
        (ads_in, ads_out, combos_in, combos_out).
    """
    rng = np.random.default_rng((seed, 1000))
    perm = rng.permutation(num_adsorbates)
    n_out = int(round(holdout_fraction * num_adsorbates))
    ads_out, ads_in = np.sort(perm[:n_out]), np.sort(perm[n_out:])
    combos = element_combinations()
    alloys = [c for c in combos if len(c) > 1]
    perm = rng.permutation(len(alloys))
    n_out = int(round(holdout_fraction * len(alloys)))
    combos_out = [alloys[i] for i in sorted(perm[:n_out])]
    combos_in = [c for c in combos if c not in combos_out]
    return ads_in, ads_out, combos_in, combos_out


# --------------------------------------------------------------------------------------------
# geometry helpers


def covalent_radius(symbol: str) -> float:
    from ase.data import atomic_numbers, covalent_radii

    return float(covalent_radii[atomic_numbers[symbol]])


def bond_graph(positions: np.ndarray, symbols: list[str] | tuple[str, ...], *, scale: float = 1.5) -> np.ndarray:
    """Boolean adjacency ``[n, n]`` with bonds at ``d < scale * (r_i + r_j)`` (no PBC: the
    adsorbate is small compared with the cell)."""
    r = np.array([covalent_radius(s) for s in symbols])
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    adj = d < scale * (r[:, None] + r[None])
    np.fill_diagonal(adj, False)
    return adj


def _in_plane_images(positions: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Positions ``[9 n, 3]`` of the atoms and their 8 in-plane periodic images."""
    shifts = np.array([(i, j, 0) for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=float) @ cell
    return (positions[None] + shifts[:, None]).reshape(-1, 3)


def min_distances(a: np.ndarray, b: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Distance ``[len(a)]`` from each point of ``a`` to the nearest in-plane image of ``b``."""
    img = _in_plane_images(b, cell)
    return np.linalg.norm(a[:, None] - img[None], axis=-1).min(axis=1)


def surface_sites(positions: np.ndarray, cell: np.ndarray, top_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Adsorption sites (x, y, z_surface) on the top layer, by site type.

    Top sites are the top-layer atoms; bridge sites the midpoints of edges and hollow sites the
    centroids of triangles of the periodic Delaunay triangulation of the top-layer atoms
    (projected on the surface plane), keeping one copy per site inside the cell.
    """
    from scipy.spatial import Delaunay

    top = positions[top_mask]
    img = _in_plane_images(top, cell)
    tri = Delaunay(img[:, :2]).simplices
    inv = np.linalg.inv(cell[:2, :2])

    def inside(points: np.ndarray) -> np.ndarray:
        frac = points[:, :2] @ inv
        return np.all((frac >= -1e-6) & (frac < 1 - 1e-6), axis=1)

    hollow = img[tri].mean(axis=1)
    edges = np.unique(np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [0, 2]]]), axis=1), axis=0)
    bridge = img[edges].mean(axis=1)
    # Drop over-long edges (across a 110 trough): longer than 1.5x the shortest top-layer distance.
    lengths = np.linalg.norm(img[edges[:, 0], :2] - img[edges[:, 1], :2], axis=1)
    bridge = bridge[lengths < 1.5 * lengths.min()]
    return {"top": top.copy(), "bridge": bridge[inside(bridge)], "hollow": hollow[inside(hollow)]}


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    c, s = np.cos(angle), np.sin(angle)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    return np.eye(3) + s * k + (1 - c) * (k @ k)


def orient_adsorbate(ads: Adsorbate, rng: np.random.Generator) -> np.ndarray:
    """Adsorbate positions with the binding atom(s) centred at the origin, the molecule pointing
    away from the surface (+z), a uniform random rotation about z and a tilt of at most 15 deg."""
    pos = ads.positions - ads.positions[list(ads.binding)].mean(axis=0)
    if len(ads.binding) == 1 and len(pos) > 1:
        # Point the centroid of the other atoms along +z.
        direction = np.delete(pos, ads.binding[0], axis=0).mean(axis=0)
        if np.linalg.norm(direction) > 1e-6:
            direction = direction / np.linalg.norm(direction)
            axis = np.cross(direction, [0.0, 0.0, 1.0])
            if np.linalg.norm(axis) > 1e-8:
                pos = pos @ _rotation(axis, float(np.arccos(np.clip(direction[2], -1, 1)))).T
            elif direction[2] < 0:
                pos = pos * np.array([1.0, -1.0, -1.0])
    pos = pos @ _rotation(np.array([0.0, 0.0, 1.0]), rng.uniform(0, 2 * np.pi)).T
    tilt_axis = np.array([np.cos(a := rng.uniform(0, 2 * np.pi)), np.sin(a), 0.0])
    pos = pos @ _rotation(tilt_axis, np.deg2rad(rng.uniform(0, 15))).T
    return pos


def place_adsorbate(slab_pos: np.ndarray, slab_syms: list[str], cell: np.ndarray, ads_pos: np.ndarray,
                    ads_syms: tuple[str, ...], binding: tuple[int, ...], site: np.ndarray) -> np.ndarray:
    """Translate the oriented adsorbate over ``site`` and lower it (0.02 A steps, from 4 A above
    the top layer) until a binding atom is within 1.1x the covalent-radius sum of a slab atom,
    stopping earlier if any adsorbate atom would come closer than 1.0x that sum to a slab atom
    (EMT is strongly repulsive at shorter distances)."""
    r_slab = np.array([covalent_radius(s) for s in slab_syms])
    r_ads = np.array([covalent_radius(s) for s in ads_syms])
    img = _in_plane_images(slab_pos, cell)
    r_img = np.tile(r_slab, 9)
    base = ads_pos - ads_pos[list(binding)].mean(axis=0) + np.array([site[0], site[1], 0.0])
    top_z = slab_pos[:, 2].max()
    best = None
    for h in np.arange(top_z + 4.0, top_z + 0.3, -0.02):
        pos = base + np.array([0.0, 0.0, h])
        d = np.linalg.norm(pos[:, None] - img[None], axis=-1)
        ratio = d / (r_ads[:, None] + r_img[None])
        if ratio.min() < 1.0:
            break
        best = pos
        if ratio[list(binding)].min() <= 1.1:
            break
    if best is None:
        raise RuntimeError("adsorbate could not be placed above the surface")
    return best


# --------------------------------------------------------------------------------------------
# relaxation


def relax(atoms: Any, *, fmax: float, max_steps: int) -> tuple[float, int, bool]:
    """Relax ``atoms`` in place under EMT with BFGS; returns (energy, steps, converged)."""
    from ase.calculators.emt import EMT
    from ase.optimize import BFGS

    atoms.calc = EMT()
    opt = BFGS(atoms, logfile=None)
    converged = bool(opt.run(fmax=fmax, steps=max_steps))
    return float(atoms.get_potential_energy()), int(opt.nsteps), converged


_GAS_CACHE: dict[tuple[int, float, int], float] = {}


def gas_reference(ads: Adsorbate, *, fmax: float, max_steps: int) -> float:
    """EMT energy of the isolated adsorbate, relaxed in vacuum (no PBC), cached per adsorbate."""
    key = (ads.index, fmax, max_steps)
    if key not in _GAS_CACHE:
        from ase import Atoms

        mol = Atoms(ads.symbols, positions=ads.positions, pbc=False)
        energy, _steps, _conv = relax(mol, fmax=fmax, max_steps=1000)
        _GAS_CACHE[key] = energy
    return _GAS_CACHE[key]


# --------------------------------------------------------------------------------------------
# one surface


def build_slab(elements: tuple[str, ...], facet: str, rng: np.random.Generator, vacuum: float) -> Any:
    """A random-alloy fcc slab (36 atoms): lattice constant by Vegard's law over the drawn
    composition, bottom half of the layers fixed and tagged 0, top half tagged 1."""
    from ase.build import fcc100, fcc110, fcc111
    from ase.constraints import FixAtoms
    from ase.data import atomic_numbers, reference_states

    builders = {"111": (fcc111, (3, 3, 4)), "100": (fcc100, (3, 3, 4)), "110": (fcc110, (3, 2, 6))}
    builder, size = builders[facet]
    n_atoms = int(np.prod(size))
    if len(elements) == 1:
        counts = np.array([n_atoms])
    else:
        frac = rng.dirichlet(np.full(len(elements), 2.0))
        # Every element present at least twice; the rest multinomial.
        counts = 2 + rng.multinomial(n_atoms - 2 * len(elements), frac)
    symbols = np.repeat(np.array(elements), counts)
    rng.shuffle(symbols)
    a_elem = np.array([reference_states[atomic_numbers[e]]["a"] for e in elements])
    a = float(counts @ a_elem / n_atoms)
    slab = builder(elements[0], size=size, a=a, vacuum=vacuum, periodic=True)
    slab.set_chemical_symbols(list(symbols))
    layer = slab.get_tags()  # ase: 1 = top layer ... n = bottom layer
    n_layers = size[2]
    tags = np.where(layer <= n_layers // 2, 1, 0)
    slab.set_tags(tags)
    slab.set_constraint(FixAtoms(mask=tags == 0))
    return slab


def generate_surface(config: GeneratorConfig, split: str, surface_index: int,
                     adsorbates: list[Adsorbate]) -> list[dict[str, Any]]:
    """All systems of one surface of one split (``ads_per_surface * sites_per_ads`` of them).

    Returns:
        list of per-system records (numpy arrays and scalars; see :func:`records_to_arrays`).
    """
    from ase import Atoms
    from ase.constraints import FixAtoms

    ads_in, ads_out, combos_in, combos_out = holdout_pools(
        seed=config.seed, num_adsorbates=len(adsorbates), holdout_fraction=config.holdout_fraction)
    ads_pool = ads_out if split in ("val_ood_ads", "val_ood_both") else ads_in
    combo_pool = combos_out if split in ("val_ood_cat", "val_ood_both") else combos_in
    rng = np.random.default_rng((config.seed, SPLIT_CODES[split], surface_index))

    if split in ("val_ood_cat", "val_ood_both"):
        combo = combo_pool[rng.integers(len(combo_pool))]
    else:
        # Unary 20%, binary 45%, ternary 35%.
        n_el = int(rng.choice([1, 2, 3], p=[0.2, 0.45, 0.35]))
        options = [c for c in combo_pool if len(c) == n_el]
        combo = options[rng.integers(len(options))]
    facet = FACETS[rng.integers(len(FACETS))]
    slab = build_slab(tuple(combo), facet, rng, config.vacuum)
    e_slab, _, slab_conv = relax(slab, fmax=config.fmax, max_steps=config.max_steps)
    slab_pos = slab.positions.copy()
    slab_syms = slab.get_chemical_symbols()
    cell = np.array(slab.cell[:])
    tags = slab.get_tags()
    z_top = slab_pos[tags == 1, 2].max()
    top_mask = slab_pos[:, 2] > z_top - (0.6 if facet != "110" else 0.5)
    sites = surface_sites(slab_pos, cell, top_mask)

    records = []
    chosen = rng.choice(len(ads_pool), size=config.ads_per_surface, replace=False)
    for a_i, pool_idx in enumerate(chosen):
        ads = adsorbates[int(ads_pool[pool_idx])]
        e_gas = gas_reference(ads, fmax=config.fmax, max_steps=config.max_steps)
        for s_i in range(config.sites_per_ads):
            site_type = int(rng.integers(len(SITE_TYPES)))
            cand = sites[SITE_TYPES[site_type]]
            site = cand[rng.integers(len(cand))]
            ads_pos = place_adsorbate(slab_pos, slab_syms, cell, orient_adsorbate(ads, rng),
                                      ads.symbols, ads.binding, site)
            system = Atoms(slab_syms + list(ads.symbols), positions=np.concatenate([slab_pos, ads_pos]),
                           cell=cell, pbc=True)
            sys_tags = np.concatenate([tags, np.full(len(ads.symbols), 2)])
            system.set_tags(sys_tags)
            system.set_constraint(FixAtoms(mask=sys_tags == 0))
            pos_init = system.positions.copy()
            from ase.calculators.emt import EMT

            system.calc = EMT()
            e_init = float(system.get_potential_energy())
            e_rel, steps, conv = relax(system, fmax=config.fmax, max_steps=config.max_steps)
            pos_rel = system.positions.copy()
            n_slab = len(slab_syms)
            flags = 0
            rads = pos_rel[n_slab:]
            r_ads = np.array([covalent_radius(s) for s in ads.symbols])
            r_slab = np.array([covalent_radius(s) for s in slab_syms])
            img = _in_plane_images(pos_rel[:n_slab], cell)
            ratio = np.linalg.norm(rads[:, None] - img[None], axis=-1) / (r_ads[:, None] + np.tile(r_slab, 9)[None])
            if ratio.min() > 1.5:
                flags |= FLAG_DESORBED
            if not np.array_equal(bond_graph(pos_init[n_slab:], ads.symbols), bond_graph(rads, ads.symbols)):
                flags |= FLAG_DISSOCIATED
            moved = np.linalg.norm(pos_rel[:n_slab] - slab_pos, axis=1)
            if moved.max() > 1.0:
                flags |= FLAG_RECONSTRUCTED
            if not conv or not slab_conv:
                flags |= FLAG_NOT_CONVERGED
            records.append({
                "numbers": system.numbers.astype(np.uint8),
                "pos_init": pos_init.astype(np.float32),
                "pos_relaxed": pos_rel.astype(np.float32),
                "tags": sys_tags.astype(np.uint8),
                "cell": cell.astype(np.float32),
                "y_init": e_init - e_slab - e_gas,
                "y_relaxed": e_rel - e_slab - e_gas,
                "e_system": e_rel,
                "e_slab": e_slab,
                "e_gas": e_gas,
                "sid": SPLIT_CODES[split] * 10_000_000 + surface_index * 100 + a_i * 10 + s_i,
                "surface_index": surface_index,
                "ads_index": ads.index,
                "facet": FACETS.index(facet),
                "site_type": site_type,
                "flags": flags,
                "steps": steps,
            })
    return records


# --------------------------------------------------------------------------------------------
# arrays, shards, merging


PER_SYSTEM_SCALARS: dict[str, str] = {
    "y_init": "float64", "y_relaxed": "float64", "e_system": "float64", "e_slab": "float64",
    "e_gas": "float64", "sid": "int64", "surface_index": "int32", "ads_index": "int16",
    "facet": "uint8", "site_type": "uint8", "flags": "uint8", "steps": "int16",
}
PER_ATOM: dict[str, str] = {"numbers": "uint8", "pos_init": "float32", "pos_relaxed": "float32", "tags": "uint8"}


def records_to_arrays(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Concatenate per-system records into flat arrays plus ``offsets`` ``[n + 1]`` (atoms of
    system ``i`` are ``offsets[i]:offsets[i+1]``); ``fixed`` is ``tags == 0``."""
    out: dict[str, np.ndarray] = {}
    counts = np.array([len(r["numbers"]) for r in records], dtype=np.int64)
    out["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    for key, dtype in PER_ATOM.items():
        out[key] = (np.concatenate([r[key] for r in records]).astype(dtype) if records
                    else np.zeros((0, 3) if key.startswith("pos") else (0,), dtype=dtype))
    out["cell"] = np.stack([r["cell"] for r in records]).astype(np.float32) if records else np.zeros((0, 3, 3), np.float32)
    for key, dtype in PER_SYSTEM_SCALARS.items():
        out[key] = np.array([r[key] for r in records], dtype=dtype)
    return out


def concat_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate several :func:`records_to_arrays` outputs (offsets re-based)."""
    out: dict[str, np.ndarray] = {}
    offsets = [np.zeros(1, np.int64)]
    base = 0
    for p in parts:
        offsets.append(p["offsets"][1:] + base)
        base += int(p["offsets"][-1])
    out["offsets"] = np.concatenate(offsets)
    for key in list(PER_ATOM) + ["cell"] + list(PER_SYSTEM_SCALARS):
        out[key] = np.concatenate([p[key] for p in parts])
    return out


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def shard_path(out: Path, split: str, chunk: int) -> Path:
    return out / "shards" / f"{split}_{chunk:05d}.npz"


def _kept(arrays: dict[str, np.ndarray]) -> int:
    return int((arrays["flags"] == 0).sum())


def generate(config: GeneratorConfig, out: Path, *, splits: tuple[str, ...] | None = None,
             max_chunks: int | None = None, log: bool = True) -> None:
    """Generate shards under ``out/shards`` until every split has ``config.target(split)``
    non-anomalous systems (resuming from existing shards), then merge them (:func:`merge`)."""
    out = Path(out)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    adsorbates, source = load_adsorbates()
    meta_path = out / "shards" / "config.json"
    meta = {"config": dataclasses.asdict(config), "adsorbate_source": source}
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old != json.loads(json.dumps(meta)):
            raise ValueError(f"{meta_path}: existing shards were made with another config: {old}")
    else:
        meta_path.write_text(json.dumps(meta, indent=1))
    todo = splits if splits is not None else tuple(s for s, _ in config.targets)
    for split in todo:
        chunk, kept, done_chunks = 0, 0, 0
        while kept < config.target(split):
            path = shard_path(out, split, chunk)
            if path.exists():
                with np.load(path) as z:
                    kept += int((z["flags"] == 0).sum())
            else:
                if max_chunks is not None and done_chunks >= max_chunks:
                    break
                t0 = time.time()
                records = []
                first = chunk * config.surfaces_per_chunk
                for k in range(first, first + config.surfaces_per_chunk):
                    records.extend(generate_surface(config, split, k, adsorbates))
                arrays = records_to_arrays(records)
                _atomic_savez(path, arrays)
                kept += _kept(arrays)
                done_chunks += 1
                if log:
                    n = len(records)
                    print(f"{split} chunk {chunk}: {n} systems, {_kept(arrays)} kept, "
                          f"{time.time() - t0:.1f} s ({(time.time() - t0) / n:.3f} s/system); "
                          f"{kept}/{config.target(split)} kept", flush=True)
            chunk += 1
    merge(out)


def merge(out: Path) -> dict[str, int]:
    """Merge ``out/shards/<split>_*.npz`` into ``out/<split>.npz`` (atomically); returns the
    number of systems per split."""
    out = Path(out)
    sizes = {}
    for split in SPLITS:
        paths = sorted((out / "shards").glob(f"{split}_*.npz"))
        if not paths:
            continue
        parts = []
        for p in paths:
            with np.load(p) as z:
                parts.append({k: z[k] for k in z.files})
        arrays = concat_arrays(parts)
        _atomic_savez(out / f"{split}.npz", arrays)
        sizes[split] = len(arrays["sid"])
    meta = out / "shards" / "config.json"
    if meta.exists():
        (out / "generator_config.json").write_text(meta.read_text())
    return sizes


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m flt_mol.data.emt_generator", description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--splits", nargs="*", default=None, choices=SPLITS)
    p.add_argument("--num", nargs="*", default=None, metavar="SPLIT=N",
                   help="override targets, e.g. train=5000 val_id=500")
    p.add_argument("--max-chunks", type=int, default=None, help="stop each split after this many new chunks")
    p.add_argument("--merge-only", action="store_true")
    args = p.parse_args(argv)
    if args.merge_only:
        print(merge(args.out))
        return 0
    config = GeneratorConfig(seed=args.seed)
    if args.num:
        targets = dict(config.targets)
        for item in args.num:
            name, _, value = item.partition("=")
            if name not in targets or not value.isdigit():
                from flt_mol.errors import UsageError

                raise UsageError(f"--num: bad entry {item!r}; expected SPLIT=N with SPLIT in {SPLITS}")
            targets[name] = int(value)
        config = dataclasses.replace(config, targets=tuple(targets.items()))
    generate(config, args.out, splits=tuple(args.splits) if args.splits else None, max_chunks=args.max_chunks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
