"""Metrics accumulated as totals (so they reduce exactly across batches and ranks).

**IS2RE energies.** For a split with errors ``e_n = pred_n - target_n`` (eV), n = 1..N:

    energy_mae = sum |e_n| / N
    energy_mse = sum e_n^2 / N
    energy_within_threshold = #{n : |e_n| < 0.02 eV} / N     (OC20's EwT)

Batches (and ranks) contribute the totals ``[sum |e|, sum e^2, #within, N]``; the ratios are
formed once at the end, so the result does not depend on how the split was cut.

**S2EF energies and forces** (OC20 / fairchem's evaluator), :func:`s2ef_totals` ->
:func:`s2ef_metrics_from_totals`. Forces are scored on *free* atoms only when a ``fixed`` mask
is given (fairchem's ``eval_on_free_atoms``, its default). With force errors ``d_a = F^pred_a -
F^true_a`` over the A scored atoms:

    forces_mae = sum_a sum_xyz |d_a,c| / (3 A)                (mean over components)
    forces_mse = sum_a sum_xyz d_a,c^2 / (3 A)
    forces_cos = sum_a cos(F^pred_a, F^true_a) / A            (``torch.cosine_similarity``: norms
                                                               clamped at 1e-8, so a zero vector
                                                               scores 0)
    energy_forces_within_threshold (EFwT) = share of structures with |e_n| < 0.02 eV AND
        max_{a in n, c} |d_a,c| < 0.03 eV/A                   (a structure without scored atoms
                                                               passes the force test vacuously)

**IS2RS positions** (OC20's ADwT), :func:`adwt_totals` -> :func:`adwt_metrics_from_totals`. Per
structure, ``D_n`` = mean over its scored (free) atoms of the minimum-image distance between
predicted and true positions; ADwT = mean over thresholds ``t`` of the share of structures with
``D_n < t``. The thresholds are fairchem's ``np.arange(0.01, 0.5, 0.001)`` (490 values). This is
fairchem's ``average_distance_within_threshold`` except for the distance: fairchem wraps
fractional differences into [-1/2, 1/2), which is the minimum image only for orthogonal cells;
here the nearest image is searched around the wrapped difference
(:func:`minimum_image_displacement`), so the distance is never larger than fairchem's and equals
it for orthogonal cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

EWT_THRESHOLD = 0.02  # eV, OC20's "energy within threshold"
METRIC_KEYS = ("energy_mae", "energy_mse", "energy_within_threshold")
FORCE_THRESHOLD = 0.03  # eV/A, OC20's EFwT: every force component within this
S2EF_METRIC_KEYS = METRIC_KEYS + ("forces_mae", "forces_mse", "forces_cos", "energy_forces_within_threshold")
ADWT_METRIC_KEYS = ("average_distance_within_threshold", "mean_distance")


def energy_totals(pred: torch.Tensor, target: torch.Tensor, *, threshold: float = EWT_THRESHOLD) -> torch.Tensor:
    """Totals ``[sum |e|, sum e^2, #(|e| < threshold), N]`` in float64.

    Shapes: ``pred [N]``, ``target [N]`` -> ``[4]``.
    """
    if pred.shape != target.shape or pred.dim() != 1:
        raise ValueError(f"pred and target must be 1-D of equal shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    err = pred.detach().double() - target.detach().double()
    return torch.stack(
        [
            err.abs().sum(),
            (err * err).sum(),
            (err.abs() < threshold).double().sum(),
            torch.tensor(float(err.numel()), dtype=torch.float64, device=err.device),
        ]
    )


def metrics_from_totals(totals: torch.Tensor) -> dict[str, float]:
    """``[sum |e|, sum e^2, #within, N]`` -> ``{energy_mae, energy_mse, energy_within_threshold, n}``."""
    sum_abs, sum_sq, within, n = (float(v) for v in totals.tolist())
    if n <= 0:
        raise ValueError("no structures were evaluated (N = 0)")
    return {
        "energy_mae": sum_abs / n,
        "energy_mse": sum_sq / n,
        "energy_within_threshold": within / n,
        "n": int(round(n)),
    }


def _mean_baselines(splits: list[Mapping[str, object]]) -> dict[str, object] | None:
    """Mean over splits of the baselines present in every split (a float MAE, or a dict of
    metrics per baseline, averaged key by key)."""
    names = None
    for s in splits:
        keys = set(dict(s.get("baselines", {})))
        names = keys if names is None else names & keys
    if not names:
        return None
    out: dict[str, object] = {}
    for name in sorted(names):
        values = [s["baselines"][name] for s in splits]
        if all(isinstance(v, Mapping) for v in values):
            common = set.intersection(*(set(v) for v in values))
            out[name] = {k: sum(float(v[k]) for v in values) / len(values) for k in sorted(common)}
        else:
            out[name] = sum(float(v) for v in values) / len(values)
    return out


def average_entry(per_split: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    """The unweighted mean over splits of each metric (OC20 averages its four val splits this way).

    Every metric of :data:`METRIC_KEYS`, :data:`S2EF_METRIC_KEYS` and :data:`ADWT_METRIC_KEYS`
    present in all splits is averaged; baselines present in every split as well; ``n`` (and
    ``n_atoms``) are totals.
    """
    splits = [v for k, v in per_split.items() if k != "average"]
    if not splits:
        raise ValueError("no splits to average")
    keys = [k for k in S2EF_METRIC_KEYS + ADWT_METRIC_KEYS if all(k in s for s in splits)]
    out: dict[str, object] = {k: sum(float(s[k]) for s in splits) / len(splits) for k in keys}
    out["n"] = int(sum(int(s["n"]) for s in splits))
    if all("n_atoms" in s for s in splits):
        out["n_atoms"] = int(sum(int(s["n_atoms"]) for s in splits))
    baselines = _mean_baselines(splits)
    if baselines is not None:
        out["baselines"] = baselines
    return out


# (column header, metric key, format) per metric group; a group is shown when every row has it.
_COLUMNS: tuple[tuple[tuple[str, str, str], ...], ...] = (
    (("MAE", "energy_mae", "{:.4f}"), ("MSE", "energy_mse", "{:.4f}"), ("EwT", "energy_within_threshold", "%")),
    (("F MAE", "forces_mae", "{:.4f}"), ("F cos", "forces_cos", "{:.4f}"),
     ("EFwT", "energy_forces_within_threshold", "%")),
    (("ADwT", "average_distance_within_threshold", "%"), ("mean dist", "mean_distance", "{:.4f}")),
)


def _cell(value: object, fmt: str) -> str:
    value = float(value)
    if math.isnan(value):
        return "-"
    return f"{100 * value:.2f}%" if fmt == "%" else fmt.format(value)


def _baseline_cell(value: object) -> str:
    if isinstance(value, Mapping):  # S2EF baselines: energy MAE / force MAE
        parts = [_cell(value[k], "{:.4f}") for k in ("energy_mae", "forces_mae") if k in value]
        return " / ".join(parts) if parts else "-"
    return _cell(value, "{:.4f}")


def format_table(metrics: Mapping[str, Mapping[str, object]]) -> str:
    """A readable table: split, n, the metrics present (energy MAE, MSE, EwT; force MAE, force
    cosine, EFwT; ADwT, mean distance) and each baseline's MAE (energies eV, forces eV/A,
    distances A; an S2EF baseline shows ``energy MAE / force MAE``)."""
    names: list[str] = []
    nested: set[str] = set()
    for entry in metrics.values():
        for name, value in dict(entry.get("baselines", {})).items():
            if name not in names:
                names.append(name)
            if isinstance(value, Mapping):
                nested.add(name)
    columns = [c for group in _COLUMNS if all(group[0][1] in e for e in metrics.values()) for c in group]
    header = ["split", "n"] + [c[0] for c in columns]
    header += [f"{n} MAE (E / F)" if n in nested else f"{n} MAE" for n in names]
    rows = []
    for split, entry in metrics.items():
        base = dict(entry.get("baselines", {}))
        row = [str(split), str(entry.get("n", ""))] + [_cell(entry[key], fmt) for _, key, fmt in columns]
        row += [_baseline_cell(base[n]) if n in base else "-" for n in names]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# S2EF: energies and forces


def _structure_index(natoms: torch.Tensor, num_atoms: int, device: torch.device) -> torch.Tensor:
    """Structure of every atom ``[N]`` (long) from per-structure atom counts ``natoms [B]``."""
    natoms = torch.as_tensor(natoms, device=device).reshape(-1).long()
    if int(natoms.sum()) != num_atoms:
        raise ValueError(f"natoms sums to {int(natoms.sum())} but there are {num_atoms} atoms")
    return torch.repeat_interleave(torch.arange(len(natoms), device=device), natoms)


def _scored_atoms(fixed: torch.Tensor | None, num_atoms: int, device: torch.device) -> torch.Tensor:
    """``[N]`` bool: the atoms metrics are computed on (free atoms, or all when ``fixed`` is None)."""
    if fixed is None:
        return torch.ones(num_atoms, dtype=torch.bool, device=device)
    fixed = torch.as_tensor(fixed, device=device).reshape(-1)
    if fixed.shape != (num_atoms,):
        raise ValueError(f"fixed must have shape [{num_atoms}] (one per atom), got {tuple(fixed.shape)}")
    return fixed == 0


def s2ef_totals(
    energy_pred: torch.Tensor,
    energy_target: torch.Tensor,
    forces_pred: torch.Tensor,
    forces_target: torch.Tensor,
    natoms: torch.Tensor,
    *,
    fixed: torch.Tensor | None = None,
    energy_threshold: float = EWT_THRESHOLD,
    force_threshold: float = FORCE_THRESHOLD,
) -> torch.Tensor:
    """S2EF totals of a batch (module docstring), float64 ``[10]``:
    ``[sum |e|, sum e^2, #(|e| < 0.02), B, sum |d|, sum d^2, 3 A, sum cos, A, #EFwT]``.

    Atoms are concatenated structure by structure (PyG layout); a padded
    :class:`flt_mol.data.collate.AtomsBatch` passes ``forces[batch.real_mask]`` (boolean indexing
    keeps that order), ``batch.fixed[batch.real_mask]`` and ``batch.natoms``. Sum the totals
    over batches and ranks, then call :func:`s2ef_metrics_from_totals`.

    Args:
        energy_pred, energy_target: ``[B]`` energies (eV).
        forces_pred, forces_target: ``[N, 3]`` forces (eV/A), ``N = natoms.sum()``.
        natoms: ``[B]`` atoms per structure.
        fixed: ``[N]`` (nonzero / True = fixed); forces are scored on the other atoms only.
    """
    if forces_pred.shape != forces_target.shape or forces_pred.dim() != 2 or forces_pred.shape[1] != 3:
        raise ValueError(f"forces must both be [N, 3], got {tuple(forces_pred.shape)} and {tuple(forces_target.shape)}")
    e_totals = energy_totals(energy_pred, energy_target, threshold=energy_threshold)
    device = forces_pred.device
    n = forces_pred.shape[0]
    num_structures = energy_pred.shape[0]
    if torch.as_tensor(natoms).numel() != num_structures:
        raise ValueError(f"natoms has {torch.as_tensor(natoms).numel()} entries for {num_structures} energies")
    batch = _structure_index(natoms, n, device)
    scored = _scored_atoms(fixed, n, device)
    fp = forces_pred.detach().double()[scored]  # [A, 3]
    ft = forces_target.detach().double()[scored]
    err = fp - ft
    cos = torch.cosine_similarity(fp, ft, dim=-1)  # [A]
    # Largest force-component error per structure (0 for a structure without scored atoms).
    worst = torch.zeros(num_structures, dtype=torch.float64, device=device).scatter_reduce(
        0, batch[scored], err.abs().amax(dim=1) if len(err) else err.new_zeros(0), reduce="amax")
    e_err = (energy_pred.detach().double() - energy_target.detach().double()).abs()
    efwt = ((e_err < energy_threshold) & (worst < force_threshold)).double().sum()
    a = float(len(err))
    f_totals = torch.stack([
        err.abs().sum(), (err * err).sum(), torch.tensor(3 * a, dtype=torch.float64, device=device),
        cos.sum(), torch.tensor(a, dtype=torch.float64, device=device), efwt,
    ])
    return torch.cat([e_totals, f_totals])


def s2ef_metrics_from_totals(totals: torch.Tensor) -> dict[str, float]:
    """:func:`s2ef_totals` (summed) -> ``{energy_mae, energy_mse, energy_within_threshold,
    forces_mae, forces_mse, forces_cos, energy_forces_within_threshold, n, n_atoms}``
    (``n_atoms``: atoms the forces were scored on; force metrics are NaN when it is 0)."""
    if totals.shape != (10,):
        raise ValueError(f"S2EF totals must have shape [10], got {tuple(totals.shape)}")
    out: dict[str, float] = metrics_from_totals(totals[:4])
    f_abs, f_sq, n_comp, cos, n_atoms, efwt = (float(v) for v in totals[4:].tolist())
    nan = float("nan")
    out["forces_mae"] = f_abs / n_comp if n_comp > 0 else nan
    out["forces_mse"] = f_sq / n_comp if n_comp > 0 else nan
    out["forces_cos"] = cos / n_atoms if n_atoms > 0 else nan
    out["energy_forces_within_threshold"] = efwt / out["n"]
    out["n_atoms"] = int(round(n_atoms))
    return out


# --------------------------------------------------------------------------------------------
# IS2RS: average distance within threshold


def adwt_thresholds() -> torch.Tensor:
    """OC20's ADwT thresholds, fairchem's ``np.arange(0.01, 0.5, 0.001)`` (A), float64 ``[490]``."""
    import numpy as np

    return torch.from_numpy(np.arange(0.01, 0.5, 0.001))


def minimum_image_displacement(delta: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor | bool = True, *,
                               search: int = 2) -> torch.Tensor:
    """The shortest periodic image of each displacement.

    ``delta_n + m_n A_n`` minimised over integer ``m_n`` on the periodic axes: fractional
    coordinates are wrapped to [-1/2, 1/2) and the images within ``search`` cells of the
    wrapped vector along each periodic axis are compared (``(2 search + 1)^3`` candidates).
    Tested against a brute-force search over +-3 cells on random cells with the shapes of slab
    cells (60-120 degree angles, as fcc(111)/(100)/(110) and OC20 cells have); strongly skewed,
    unreduced cells may need a larger ``search``.

    Shapes: ``delta [N, 3]``; ``cell [N, 3, 3]`` or ``[3, 3]`` (lattice vectors as rows);
    ``pbc`` a bool, ``[3]`` or ``[N, 3]`` -> ``[N, 3]`` (dtype of ``delta``). Rows without a
    periodic axis are returned unchanged (their cell may be singular).
    """
    n = delta.shape[0]
    cell = cell.to(delta.dtype).expand(n, 3, 3) if cell.dim() == 2 else cell.to(delta.dtype)
    pbc = torch.as_tensor(pbc, dtype=torch.bool, device=delta.device).expand(n, 3)
    if cell.shape != (n, 3, 3):
        raise ValueError(f"cell must be [3, 3] or [{n}, 3, 3], got {tuple(cell.shape)}")
    out = delta.clone()
    rows = pbc.any(dim=1)
    if not bool(rows.any()):
        return out
    d, c, p = delta[rows], cell[rows], pbc[rows]
    # delta = frac @ cell  <=>  cell^T frac^T = delta^T
    frac = torch.linalg.solve(c.transpose(1, 2), d.unsqueeze(-1)).squeeze(-1)
    frac = torch.where(p, frac - torch.round(frac), frac)
    grid = torch.arange(-search, search + 1, dtype=delta.dtype, device=delta.device)
    shifts = torch.cartesian_prod(grid, grid, grid)  # [S, 3], S = (2 search + 1)^3
    cand = torch.einsum("nsi,nij->nsj", frac[:, None, :] + shifts[None] * p[:, None, :], c)  # [n, S, 3]
    best = cand.norm(dim=-1).argmin(dim=1)
    out[rows] = cand[torch.arange(len(cand), device=delta.device), best]
    return out


def adwt_totals(
    pos_pred: torch.Tensor,
    pos_target: torch.Tensor,
    cell: torch.Tensor,
    natoms: torch.Tensor,
    *,
    fixed: torch.Tensor | None = None,
    pbc: torch.Tensor | bool = True,
    thresholds: torch.Tensor | None = None,
) -> torch.Tensor:
    """IS2RS totals of a batch (module docstring), float64 ``[4]``:
    ``[sum_n sum_t 1(D_n < t), B * T, sum_n D_n, B]``.

    ``D_n`` is the mean minimum-image distance over the structure's scored atoms (free atoms
    when ``fixed`` is given; 0 for a structure without any).

    Args:
        pos_pred, pos_target: ``[N, 3]`` positions (A), concatenated structure by structure.
        cell: ``[B, 3, 3]`` (or ``[B, 1, 3, 3]``) lattice vectors as rows, of the target.
        natoms: ``[B]`` atoms per structure.
        fixed: ``[N]`` (nonzero / True = fixed atom, left out).
        pbc: periodic axes: a bool, ``[3]`` or ``[B, 3]`` (OC20: all True).
        thresholds: ``[T]`` (A); default :func:`adwt_thresholds`.
    """
    if pos_pred.shape != pos_target.shape or pos_pred.dim() != 2 or pos_pred.shape[1] != 3:
        raise ValueError(f"positions must both be [N, 3], got {tuple(pos_pred.shape)} and {tuple(pos_target.shape)}")
    device = pos_pred.device
    n = pos_pred.shape[0]
    batch = _structure_index(natoms, n, device)
    num_structures = len(torch.as_tensor(natoms).reshape(-1))
    cell = cell.reshape(-1, 3, 3).to(device=device, dtype=torch.float64)
    if cell.shape[0] != num_structures:
        raise ValueError(f"cell has {cell.shape[0]} structures, natoms {num_structures}")
    pbc_t = torch.as_tensor(pbc, dtype=torch.bool, device=device)
    pbc_atoms = pbc_t[batch] if pbc_t.dim() == 2 else pbc_t
    scored = _scored_atoms(fixed, n, device)
    delta = pos_pred.detach().double() - pos_target.detach().double()
    dist = minimum_image_displacement(delta, cell[batch], pbc_atoms).norm(dim=-1)  # [N]
    zeros = torch.zeros(num_structures, dtype=torch.float64, device=device)
    total = zeros.index_add(0, batch, dist * scored)
    count = zeros.index_add(0, batch, scored.double())
    mean_dist = torch.where(count > 0, total / count.clamp(min=1), zeros)  # D_n [B]
    t = (thresholds if thresholds is not None else adwt_thresholds()).to(device=device, dtype=torch.float64)
    within = (mean_dist[:, None] < t[None, :]).double().sum()
    return torch.stack([
        within, torch.tensor(float(num_structures * len(t)), dtype=torch.float64, device=device),
        mean_dist.sum(), torch.tensor(float(num_structures), dtype=torch.float64, device=device),
    ])


def adwt_metrics_from_totals(totals: torch.Tensor) -> dict[str, float]:
    """:func:`adwt_totals` (summed) -> ``{average_distance_within_threshold, mean_distance, n}``
    (``mean_distance``: the mean over structures of ``D_n``, in A)."""
    if totals.shape != (4,):
        raise ValueError(f"ADwT totals must have shape [4], got {tuple(totals.shape)}")
    within, pairs, dist, n = (float(v) for v in totals.tolist())
    if n <= 0:
        raise ValueError("no structures were evaluated (N = 0)")
    return {"average_distance_within_threshold": within / pairs, "mean_distance": dist / n, "n": int(round(n))}
