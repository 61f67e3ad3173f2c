"""Plots a person would rather look at than read: learning curves and parity plots (Agg backend)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curve(history: Sequence[dict[str, Any]], path: str | Path, *,
                        summary: Callable[[dict[str, Any]], float] | None = None,
                        label: str = "validation metric") -> Path:
    """Training loss per logged step (left axis) and a validation metric (right axis).

    Args:
        history: the loop's history (training rows, and ``{"step", "eval"}`` rows).
        path: the PNG to write.
        summary: metrics dict -> the value drawn on the right axis (none drawn without it).
        label: that axis's name, with the metric's unit (e.g. ``average energy MAE (eV)``).
    """
    plt = _pyplot()
    path = Path(path)
    train = [h for h in history if "eval" not in h and "loss" in h]
    evals = [h for h in history if "eval" in h]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if train:
        ax.plot([h["step"] for h in train], [h["loss"] for h in train], color="tab:blue", label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    if evals and summary is not None:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in evals], [summary(h["eval"]) for h in evals], "o-", color="tab:red",
                 label="validation")
        ax2.set_ylabel(label)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_parity(per_split: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """Predicted vs target energy (eV), one colour per split, with the y = x line."""
    plt = _pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.0, 5.0))
    lo, hi = np.inf, -np.inf
    for name, (target, pred) in per_split.items():
        if len(target) == 0:
            continue
        mae = float(np.mean(np.abs(pred - target)))
        ax.scatter(target, pred, s=6, alpha=0.5, label=f"{name} (MAE {mae:.3f} eV)")
        lo = min(lo, float(np.min(target)), float(np.min(pred)))
        hi = max(hi, float(np.max(target)), float(np.max(pred)))
    if np.isfinite(lo):
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("target energy (eV)")
    ax.set_ylabel("predicted energy (eV)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
