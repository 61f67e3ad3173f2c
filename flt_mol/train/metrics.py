"""Energy metrics accumulated as totals (so they reduce exactly across batches and ranks).

For a split with errors ``e_n = pred_n - target_n`` (eV), n = 1..N:

    energy_mae = sum |e_n| / N
    energy_mse = sum e_n^2 / N
    energy_within_threshold = #{n : |e_n| < 0.02 eV} / N     (OC20's EwT)

Batches (and ranks) contribute the totals ``[sum |e|, sum e^2, #within, N]``; the ratios are
formed once at the end, so the result does not depend on how the split was cut.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

EWT_THRESHOLD = 0.02  # eV, OC20's "energy within threshold"
METRIC_KEYS = ("energy_mae", "energy_mse", "energy_within_threshold")


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


def average_entry(per_split: Mapping[str, Mapping[str, object]]) -> dict[str, object]:
    """The unweighted mean over splits of each metric (OC20 averages its four val splits this way).

    Baseline MAEs present in every split are averaged as well; ``n`` is the total.
    """
    splits = [v for k, v in per_split.items() if k != "average"]
    if not splits:
        raise ValueError("no splits to average")
    out: dict[str, object] = {k: sum(float(s[k]) for s in splits) / len(splits) for k in METRIC_KEYS}
    out["n"] = int(sum(int(s["n"]) for s in splits))
    names = None
    for s in splits:
        keys = set(dict(s.get("baselines", {})))
        names = keys if names is None else names & keys
    if names:
        out["baselines"] = {
            name: sum(float(s["baselines"][name]) for s in splits) / len(splits) for name in sorted(names)
        }
    return out


def format_table(metrics: Mapping[str, Mapping[str, object]]) -> str:
    """A readable table: split, n, MAE, MSE, EwT and each baseline's MAE (all energies in eV)."""
    names: list[str] = []
    for entry in metrics.values():
        for name in dict(entry.get("baselines", {})):
            if name not in names:
                names.append(name)
    header = ["split", "n", "MAE", "MSE", "EwT"] + [f"{n} MAE" for n in names]
    rows = []
    for split, entry in metrics.items():
        base = dict(entry.get("baselines", {}))
        row = [
            str(split),
            str(entry.get("n", "")),
            f"{float(entry['energy_mae']):.4f}",
            f"{float(entry['energy_mse']):.4f}",
            f"{100 * float(entry['energy_within_threshold']):.2f}%",
        ]
        row += [f"{float(base[n]):.4f}" if n in base and not math.isnan(float(base[n])) else "-" for n in names]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(lines)
