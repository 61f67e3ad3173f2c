"""Element references and trivial baselines for IS2RE energies.

Two things every IS2RE number should be read against:

* **Element references** (fairchem's "linear element references"): a least-squares fit of the
  target on the composition, ``y ~ sum_z n_z c_z + b``, where ``n_z`` counts the atoms of element
  ``z`` in the structure. Subtracting it before normalisation leaves the network what
  composition cannot explain (DESIGN.md §3).
* **Trivial baselines** (DESIGN.md §4), fitted on the training split and reported beside every
  model MAE: ``train_mean`` (predict the train mean), ``per_adsorbate_mean`` (the train mean of
  systems with the same adsorbate, the sorted formula of the tag-2 atoms; the train mean for an
  adsorbate never seen in training) and ``composition_linear`` (the element-reference fit; an
  element never seen in training contributes 0 eV to it).
* **S2EF baselines** (:class:`S2EFBaselines`): the energy predicted by the train mean or the
  composition-linear fit of the S2EF energy ``y``, with zero forces, scored with OC20's S2EF
  metrics (:func:`flt_mol.train.metrics.s2ef_totals`, forces on free atoms).
* ``per_adsorbate_facet_site_mean``, the strongest IS2RE baseline on EMT-IS2RE: the train mean of
  systems with the same adsorbate, facet and *initial* site type (:func:`site_key`), falling
  back to the per-adsorbate mean for an unseen combination (and so to the train mean for an
  unseen adsorbate). It needs the integer fields ``facet`` and ``site_type`` on every structure
  (the EMT-IS2RE LMDBs carry them; OC20 LMDBs do not): without them it is neither fitted nor
  reported.

Everything accepts a sequence of torch_geometric ``Data`` with OC20 fields (``atomic_numbers``,
``tags``, ``y_relaxed``) or anything indexable with ``len`` (such as
:class:`flt_mol.data.oc20.OC20LMDB`). Every atom of ``atomic_numbers`` counts as a real atom
(OC20 LMDB entries hold no periodic images; add images after the fit).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MAX_Z",
    "composition_matrix",
    "adsorbate_key",
    "targets",
    "ElementReferences",
    "fit_counts",
    "fit_element_references",
    "TrivialBaselines",
    "BASELINE_NAMES",
    "site_key",
    "has_site_fields",
    "S2EFBaselines",
    "S2EF_BASELINE_NAMES",
]

MAX_Z = 118
BASELINE_NAMES: tuple[str, ...] = (
    "train_mean", "per_adsorbate_mean", "composition_linear", "per_adsorbate_facet_site_mean",
)
S2EF_BASELINE_NAMES: tuple[str, ...] = ("train_mean_zero_forces", "composition_linear_zero_forces")


def _iterate(items: Sequence[Any] | Iterable[Any]) -> Iterable[Any]:
    # A torch Dataset has __len__/__getitem__ but its __iter__ is not guaranteed to stop.
    if hasattr(items, "__len__") and hasattr(items, "__getitem__"):
        return (items[i] for i in range(len(items)))
    return iter(items)


def _numbers(data: Any) -> np.ndarray:
    z = np.asarray(data.atomic_numbers, dtype=np.float64).reshape(-1)
    zi = np.rint(z).astype(np.int64)
    if zi.size and (zi.min() < 1 or zi.max() > MAX_Z or not np.allclose(z, zi)):
        raise ValueError(f"atomic_numbers must be integers in 1..{MAX_Z}, got {z[(zi < 1) | (zi > MAX_Z)][:3]}")
    return zi


def composition_matrix(items: Sequence[Any] | Iterable[Any]) -> np.ndarray:
    """Element counts per structure.

    Returns:
        ``counts [n_items, MAX_Z + 1]`` (float64), ``counts[i, z]`` = number of atoms with
        atomic number ``z`` in item ``i`` (column 0 unused).
    """
    rows = [np.bincount(_numbers(d), minlength=MAX_Z + 1).astype(np.float64) for d in _iterate(items)]
    return np.stack(rows) if rows else np.zeros((0, MAX_Z + 1))


def adsorbate_key(data: Any) -> str:
    """Adsorbate identity: the formula of the tag-2 atoms, elements in alphabetical order with
    explicit counts (``"C1O1"`` for CO, ``"H1O1"`` for OH); ``""`` when there is no adsorbate."""
    from ase.data import chemical_symbols

    tags = np.asarray(data.tags).reshape(-1)
    z = _numbers(data)
    if tags.shape != z.shape:
        raise ValueError(f"adsorbate_key: 'tags' has shape {tags.shape}, 'atomic_numbers' {z.shape}")
    counts = np.bincount(z[tags == 2], minlength=MAX_Z + 1)
    return "".join(f"{chemical_symbols[i]}{c}" for i, c in sorted(
        ((i, int(c)) for i, c in enumerate(counts) if c), key=lambda t: chemical_symbols[t[0]]))


def site_key(adsorbate: str, facet: int, site_type: int) -> str:
    """Key of the (adsorbate, facet, initial site type) lookup: ``"O1|facet=0|site=2"``.

    ``facet`` and ``site_type`` are the integer codes of the data set (EMT-IS2RE: facet 0 (111),
    1 (100), 2 (110); site 0 top, 1 bridge, 2 hollow)."""
    return f"{adsorbate}|facet={int(facet)}|site={int(site_type)}"


def has_site_fields(data: Any) -> bool:
    """Whether a structure carries the ``facet`` and ``site_type`` fields :func:`site_key` needs."""
    return getattr(data, "facet", None) is not None and getattr(data, "site_type", None) is not None


def _site_keys(items: list[Any], ads_keys: Sequence[str]) -> list[str] | None:
    """Site keys of every item, or None when any item lacks ``facet`` / ``site_type``."""
    if not items or not all(has_site_fields(d) for d in items):
        return None
    return [site_key(k, int(d.facet), int(d.site_type)) for k, d in zip(ads_keys, items)]


def targets(items: Sequence[Any] | Iterable[Any], *, target: str = "y_relaxed") -> np.ndarray:
    """The ``target`` field of every item as float64 ``[n_items]``.

    Raises:
        ValueError: an item lacks the field (names the item index).
    """
    out = []
    for i, d in enumerate(_iterate(items)):
        value = getattr(d, target, None)
        if value is None:
            raise ValueError(f"item {i} has no field {target!r}")
        out.append(float(value))
    return np.asarray(out, dtype=np.float64)


@dataclasses.dataclass
class ElementReferences:
    """Linear element references ``E_ref(x) = sum_z n_z(x) coef[z] + bias``.

    Attributes:
        coef: ``[MAX_Z + 1]`` eV per atom of element ``z`` (0 for elements not in the fit).
        bias: eV per structure.
        seen: ``[MAX_Z + 1]`` bool, elements present in the fitting data; predicting a
            structure with any other element raises (its coefficient is not determined).
    """

    coef: np.ndarray
    bias: float
    seen: np.ndarray

    def predict_counts(self, counts: np.ndarray, *, unseen: str = "raise") -> np.ndarray:
        """References for a composition matrix ``counts [n, MAX_Z + 1]`` -> ``[n]``.

        Args:
            unseen: what an element absent from the fit does: ``"raise"`` (ValueError naming
                it) or ``"zero"`` (it contributes 0 eV, the minimum-norm least-squares value;
                the trivial baselines use this so out-of-domain splits can still be scored).
        """
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 2 or counts.shape[1] != MAX_Z + 1:
            raise ValueError(f"counts must have shape [n, {MAX_Z + 1}], got {counts.shape}")
        if unseen not in ("raise", "zero"):
            raise ValueError(f"unseen must be 'raise' or 'zero', got {unseen!r}")
        missing = (counts[:, ~self.seen] > 0).any(axis=0)
        if unseen == "raise" and missing.any():
            from ase.data import chemical_symbols

            bad = [chemical_symbols[z] for z in np.flatnonzero(~self.seen)[missing]]
            raise ValueError(f"element(s) {bad} were not in the data the references were fitted on")
        return counts @ self.coef + self.bias

    def predict(self, items: Sequence[Any] | Iterable[Any], *, unseen: str = "raise") -> np.ndarray:
        """References for structures (``Data`` or an ``OC20LMDB``) -> ``[n_items]``
        (``unseen`` as in :meth:`predict_counts`)."""
        return self.predict_counts(composition_matrix(items), unseen=unseen)

    def predict_one(self, data: Any) -> float:
        """Reference of one structure."""
        return float(self.predict([data])[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form ``{"coef": {symbol: value}, "bias": value}`` (seen elements only)."""
        from ase.data import chemical_symbols

        return {"coef": {chemical_symbols[z]: float(self.coef[z]) for z in np.flatnonzero(self.seen)},
                "bias": float(self.bias)}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "ElementReferences":
        from ase.data import atomic_numbers

        coef = np.zeros(MAX_Z + 1)
        seen = np.zeros(MAX_Z + 1, dtype=bool)
        for sym, value in obj["coef"].items():
            if sym not in atomic_numbers:
                raise ValueError(f"ElementReferences.from_dict: unknown element {sym!r}")
            coef[atomic_numbers[sym]] = float(value)
            seen[atomic_numbers[sym]] = True
        return cls(coef=coef, bias=float(obj["bias"]), seen=seen)


def fit_counts(counts: np.ndarray, y: np.ndarray, *, bias: bool = True) -> ElementReferences:
    """Least squares ``min |counts coef + bias - y|^2`` over the elements present.

    When the columns are collinear (e.g. every slab has 36 metal atoms, so the metal counts sum
    to a constant that duplicates the bias) the minimum-norm solution is returned; its
    predictions are the unique least-squares fit.
    """
    counts = np.asarray(counts, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[1] != MAX_Z + 1 or y.shape != (counts.shape[0],):
        raise ValueError(f"counts [n, {MAX_Z + 1}] and y [n] expected, got {counts.shape} and {y.shape}")
    if counts.shape[0] == 0:
        raise ValueError("cannot fit element references on zero structures")
    seen = counts.sum(axis=0) > 0
    design = counts[:, seen]
    if bias:
        design = np.concatenate([design, np.ones((len(y), 1))], axis=1)
    sol, *_ = np.linalg.lstsq(design, y, rcond=None)
    coef = np.zeros(MAX_Z + 1)
    coef[seen] = sol[: seen.sum()]
    return ElementReferences(coef=coef, bias=float(sol[-1]) if bias else 0.0, seen=seen)


def fit_element_references(items: Sequence[Any] | Iterable[Any], *, target: str = "y_relaxed",
                           bias: bool = True) -> ElementReferences:
    """Fit linear element references (per-element energies + a bias) by least squares.

    ``y_i ~ sum_z n_{iz} c_z + b``, over the elements present in ``items``.

    Args:
        items: training structures (``Data`` list or ``OC20LMDB``).
        target: the energy field.
        bias: fit the constant ``b`` (else ``b = 0``).
    """
    items = list(_iterate(items))
    return fit_counts(composition_matrix(items), targets(items, target=target), bias=bias)


def _group_means(keys: Sequence[str], y: np.ndarray) -> dict[str, float]:
    groups: dict[str, list[float]] = {}
    for k, v in zip(keys, y):
        groups.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}


@dataclasses.dataclass
class TrivialBaselines:
    """The trivial IS2RE baselines (module docstring), fitted on a training split.

    Attributes:
        mean: train mean of the target.
        per_adsorbate: ``{adsorbate_key: train mean}``.
        references: the composition-linear fit.
        per_site: ``{site_key: train mean}`` (:func:`site_key`); ``None`` when the training
            structures carry no ``facet`` / ``site_type`` (then that baseline is not reported).
    """

    mean: float
    per_adsorbate: dict[str, float]
    references: ElementReferences
    per_site: dict[str, float] | None = None

    @classmethod
    def fit_arrays(cls, counts: np.ndarray, keys: Sequence[str], y: np.ndarray,
                   site_keys: Sequence[str] | None = None) -> "TrivialBaselines":
        """Fit from precomputed compositions ``[n, MAX_Z + 1]``, adsorbate keys ``[n]``, targets
        ``[n]`` and optionally site keys ``[n]`` (:func:`site_key`)."""
        y = np.asarray(y, dtype=np.float64)
        if len(keys) != len(y) or (site_keys is not None and len(site_keys) != len(y)):
            raise ValueError(f"{len(keys)} adsorbate keys / {len(site_keys) if site_keys is not None else '-'} "
                             f"site keys for {len(y)} targets")
        return cls(mean=float(y.mean()), per_adsorbate=_group_means(keys, y), references=fit_counts(counts, y),
                   per_site=_group_means(site_keys, y) if site_keys is not None else None)

    @classmethod
    def fit(cls, items: Sequence[Any] | Iterable[Any], *, target: str = "y_relaxed") -> "TrivialBaselines":
        """Fit on training structures (``Data`` list or ``OC20LMDB``); the per-site table only
        when every structure has ``facet`` and ``site_type``."""
        items = list(_iterate(items))
        keys = [adsorbate_key(d) for d in items]
        return cls.fit_arrays(composition_matrix(items), keys, targets(items, target=target),
                              _site_keys(items, keys))

    def predict_arrays(self, counts: np.ndarray, keys: Sequence[str],
                       site_keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Predictions ``{name: [n]}`` of every baseline from compositions and adsorbate keys;
        ``per_adsorbate_facet_site_mean`` only when fitted and ``site_keys`` are given."""
        n = len(keys)
        per_ads = np.array([self.per_adsorbate.get(k, self.mean) for k in keys], dtype=np.float64)
        out = {
            "train_mean": np.full(n, self.mean),
            "per_adsorbate_mean": per_ads,
            # Elements never seen in training contribute 0 here (documented in the module).
            "composition_linear": self.references.predict_counts(counts, unseen="zero"),
        }
        if self.per_site is not None and site_keys is not None:
            if len(site_keys) != n:
                raise ValueError(f"{len(site_keys)} site keys for {n} adsorbate keys")
            # unseen (adsorbate, facet, site) -> per-adsorbate mean -> train mean
            out["per_adsorbate_facet_site_mean"] = np.array(
                [self.per_site.get(s, float(a)) for s, a in zip(site_keys, per_ads)], dtype=np.float64)
        return out

    def predict(self, items: Sequence[Any] | Iterable[Any]) -> dict[str, np.ndarray]:
        """Predictions ``{name: [n_items]}`` for structures."""
        items = list(_iterate(items))
        keys = [adsorbate_key(d) for d in items]
        return self.predict_arrays(composition_matrix(items), keys, _site_keys(items, keys))

    def evaluate_arrays(self, counts: np.ndarray, keys: Sequence[str], y: np.ndarray,
                        site_keys: Sequence[str] | None = None) -> dict[str, float]:
        """``{name: mean |prediction - y|}`` from precomputed arrays."""
        y = np.asarray(y, dtype=np.float64)
        return {name: float(np.abs(p - y).mean())
                for name, p in self.predict_arrays(counts, keys, site_keys).items()}

    def evaluate(self, items: Sequence[Any] | Iterable[Any], *, target: str = "y_relaxed") -> dict[str, float]:
        """Energy MAE of every baseline on ``items``: ``{"train_mean": mae, ...}`` (eV)."""
        items = list(_iterate(items))
        keys = [adsorbate_key(d) for d in items]
        return self.evaluate_arrays(composition_matrix(items), keys, targets(items, target=target),
                                    _site_keys(items, keys))

    def to_dict(self) -> dict[str, Any]:
        out = {"mean": self.mean, "per_adsorbate": dict(self.per_adsorbate), "references": self.references.to_dict()}
        if self.per_site is not None:
            out["per_site"] = dict(self.per_site)
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "TrivialBaselines":
        """Inverse of :meth:`to_dict` (dicts written before ``per_site`` existed load without it)."""
        per_site = obj.get("per_site")
        return cls(mean=float(obj["mean"]), per_adsorbate={str(k): float(v) for k, v in obj["per_adsorbate"].items()},
                   references=ElementReferences.from_dict(obj["references"]),
                   per_site={str(k): float(v) for k, v in per_site.items()} if per_site is not None else None)


@dataclasses.dataclass
class S2EFBaselines:
    """Trivial S2EF baselines fitted on training frames (module docstring).

    ``evaluate`` returns ``{name: {"energy_mae", "forces_mae", "forces_cos",
    "energy_forces_within_threshold"}}`` for the names of :data:`S2EF_BASELINE_NAMES`: the
    energy of the train mean (``train_mean_zero_forces``) or of the composition-linear fit
    (``composition_linear_zero_forces``; elements unseen in training contribute 0), forces 0.

    Attributes:
        mean: train mean of the energy field.
        references: composition-linear fit of the energy field.
        target: the energy field (``"y"``; ``"y_adsorption"`` on EMT-S2EF also works).
    """

    mean: float
    references: ElementReferences
    target: str = "y"

    @classmethod
    def fit(cls, items: Sequence[Any] | Iterable[Any], *, target: str = "y") -> "S2EFBaselines":
        """Fit on training frames (``Data`` list or ``OC20LMDB``)."""
        items = list(_iterate(items))
        y = targets(items, target=target)
        return cls(mean=float(y.mean()), references=fit_counts(composition_matrix(items), y), target=target)

    def evaluate(self, items: Sequence[Any] | Iterable[Any]) -> dict[str, dict[str, float]]:
        """OC20 S2EF metrics of each baseline on frames with ``force`` and the energy field."""
        import torch

        from flt_mol.train.metrics import s2ef_metrics_from_totals, s2ef_totals

        items = list(_iterate(items))
        y = torch.from_numpy(targets(items, target=self.target))
        for i, d in enumerate(items):
            if getattr(d, "force", None) is None:
                raise ValueError(f"item {i} has no field 'force'")
        force = torch.cat([torch.as_tensor(d.force).double().reshape(-1, 3) for d in items])
        fixed = torch.cat([torch.as_tensor(d.fixed).reshape(-1) for d in items])
        natoms = torch.tensor([torch.as_tensor(d.force).reshape(-1, 3).shape[0] for d in items])
        predictions = {
            "train_mean_zero_forces": torch.full_like(y, self.mean),
            "composition_linear_zero_forces": torch.from_numpy(
                self.references.predict_counts(composition_matrix(items), unseen="zero")),
        }
        out = {}
        for name, energy in predictions.items():
            m = s2ef_metrics_from_totals(s2ef_totals(energy, y, torch.zeros_like(force), force, natoms, fixed=fixed))
            out[name] = {k: m[k] for k in ("energy_mae", "forces_mae", "forces_cos", "energy_forces_within_threshold")}
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "references": self.references.to_dict(), "target": self.target}

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> "S2EFBaselines":
        return cls(mean=float(obj["mean"]), references=ElementReferences.from_dict(obj["references"]),
                   target=str(obj.get("target", "y")))
