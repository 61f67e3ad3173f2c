"""``flt-mol viz``: pictures of what FLT learned.

* ``flt-mol viz attention-maps CHECKPOINT --out DIR`` (paper Fig. 5 and Sec. 5.1): the attention
  matrices of one layer of a trained LM, materialised from the FLT approximation exactly as the
  model applies it (``FLTAttention.attention_weights``: ``phi(Q^)_i . phi(K^)_j`` row-normalised),
  one PNG per head plus an overview, for one block of the training text (as in the paper) or the
  validation text; and the **locality statistic** (:func:`locality_statistic`) written to
  ``DIR/layer{L}_locality.json``. The paper reports 0.279 (nearest 10%) / 0.068 (farthest 10%) on
  WikiText-103; uniform attention gives 0.1 / 0.1.
* ``flt-mol viz local-rpe --out DIR`` (paper Fig. 4): 2D local RPE masks ``f(dr)`` evaluated with
  ``LocalRPE.mask`` on a grid: the box ``C 1[|dr1| <= v1] 1[|dr2| <= v2]`` (lattice) and the
  continuous order-k mask (k = 2: the product of triangles ``(v1 - |dr1|)(v2 - |dr2|)`` up to
  scale). With ``--checkpoint`` the learned RPE of a trained model is drawn instead, per head
  (2D masks as surfaces, 1D masks as curves).

Figures are written with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from flt_mol.errors import CheckpointError, UsageError

__all__ = ["add_parser", "locality_statistic", "local_rpe_grid", "rpe_mask_grid"]


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def locality_statistic(attn: torch.Tensor, *, causal: bool, fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean attention mass on each query's nearest and farthest ``fraction`` of visible keys.

    For query ``i`` the visible keys are ``j <= i`` (causal) or all ``j``; with ``n_i`` of them,
    ``k_i = round(fraction * n_i)`` keys closest in ``|i - j|`` form the near set and the ``k_i``
    farthest the far set (ties broken by index). The statistic is the attention probability summed
    over each set, averaged over the queries with ``n_i >= 1 / fraction`` (so a set holds at least
    one key). Uniform attention gives ``fraction`` for both.

    Shapes: ``attn [..., L, L]`` (rows sum to 1) -> ``(near [...], far [...])``.
    """
    if not 0.0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    length = attn.shape[-1]
    if attn.shape[-2] != length:
        raise ValueError(f"attn must be square in its last two dims, got {tuple(attn.shape)}")
    i = torch.arange(length)
    dist = (i[:, None] - i[None, :]).abs().double()  # [L, L]
    visible = torch.ones(length, length, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    n = visible.sum(-1)  # [L]
    k = torch.round(fraction * n.double()).long()
    rows = n >= math.ceil(1.0 / fraction)
    if not bool(rows.any()):
        raise UsageError(f"sequence of {length} tokens is too short for the {fraction:.0%} statistic")
    # Rank keys by distance (ties by index), invisible keys last for "near" and first for "far".
    tiebreak = i[None, :].double() / (2 * length)
    near_key = torch.where(visible, dist + tiebreak, torch.full_like(dist, float("inf")))
    far_key = torch.where(visible, -dist + tiebreak, torch.full_like(dist, float("inf")))
    near_rank = near_key.argsort(-1).argsort(-1)
    far_rank = far_key.argsort(-1).argsort(-1)
    near_set = (near_rank < k[:, None]) & visible
    far_set = (far_rank < k[:, None]) & visible
    a = attn.double()
    near = (a * near_set).sum(-1)[..., rows].mean(-1)
    far = (a * far_set).sum(-1)[..., rows].mean(-1)
    return near, far


def local_rpe_grid(
    half_widths: tuple[float, float],
    *,
    lattice: bool,
    order: int = 2,
    amplitude: float = 1.0,
    extent: float | None = None,
    points: int = 81,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2D :class:`~flt_mol.attention.LocalRPE` with one term ``(v1, v2)``, amplitude ``C``,
    evaluated on a grid: ``(dr1 [P,P], dr2 [P,P], f [P,P])``. Lattice: integer offsets."""
    from flt_mol.attention import LocalRPE

    v = torch.tensor(half_widths, dtype=torch.float32)
    if v.shape != (2,) or bool((v <= 0).any()):
        raise UsageError(f"half_widths must be two positive numbers, got {half_widths}")
    rpe = LocalRPE(1, 1, 2, lattice=lattice, order=order)
    with torch.no_grad():
        # half_widths = softplus(raw) + 1e-3  ->  raw = softplus^-1(v - 1e-3)
        target = (v - 1e-3).clamp_min(1e-6)
        rpe.half_width_raw.copy_((target + torch.log(-torch.expm1(-target))).view(1, 1, 2))
        rpe.amplitudes.fill_(amplitude)
    return rpe_mask_grid(rpe, extent=extent if extent is not None else 1.5 * float(v.max()) * (order if not lattice else 1),
                         points=points, integer=lattice, head=0)


def rpe_mask_grid(rpe: Any, *, extent: float, points: int = 81, integer: bool = False,
                  head: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rpe.mask`` of one head on ``[-extent, extent]^2`` (integer steps when ``integer``)."""
    if integer:
        e = int(math.ceil(extent))
        axis = torch.arange(-e, e + 1, dtype=torch.float32)
    else:
        axis = torch.linspace(-extent, extent, points)
    d1, d2 = torch.meshgrid(axis, axis, indexing="ij")
    with torch.no_grad():
        f = rpe.mask(torch.stack([d1, d2], dim=-1))[..., head]
    return d1, d2, f


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Atomic PNG write (temp file in the same folder, then replace)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _surface(ax, d1, d2, f, title: str) -> None:
    ax.plot_surface(d1.numpy(), d2.numpy(), f.numpy(), cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel(r"$\Delta r_1$")
    ax.set_ylabel(r"$\Delta r_2$")
    ax.set_zlabel(r"$f(\Delta r)$")
    ax.set_title(title)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_attention_maps(args: argparse.Namespace) -> int:
    from flt_mol.attention import FLTAttention
    from flt_mol.train.commands import load_for_inference

    task, model = load_for_inference(args.checkpoint, args.device, task="lm")
    first = model.blocks[args.layer].attention if 0 <= args.layer < len(model.blocks) else None
    if first is None:
        raise UsageError(f"--layer must be in [0, {len(model.blocks)}), got {args.layer}")
    if not isinstance(first, FLTAttention):
        raise CheckpointError(f"{args.checkpoint}: attention-maps needs FLTAttention layers; this model uses {type(first).__name__}")
    dataset = task.train_dataset() if args.split == "train" else task.val_datasets()["val"]
    if not 0 <= args.index < len(dataset):
        raise UsageError(f"--index must be in [0, {len(dataset)}) for the {args.split} split, got {args.index}")
    tokens, _ = dataset[args.index]
    if args.length is not None:
        tokens = tokens[: args.length]
    device = next(model.parameters()).device
    if args.seed is not None:
        model.redraw_features(torch.Generator().manual_seed(args.seed))
    attn = model.attention_maps(tokens[None].to(device), layer=args.layer)[0].cpu()  # [H, L, L]
    near, far = locality_statistic(attn, causal=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    heads = attn.shape[0]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    overview, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    # Colour scale clipped at the 99th percentile of the visible entries: the first rows (a query
    # with one or two visible keys) would otherwise saturate it.
    visible = torch.ones(attn.shape[-2:], dtype=torch.bool).tril()
    vmax = [float(torch.quantile(attn[h][visible], 0.99)) for h in range(attn.shape[0])]
    for h in range(heads):
        fig, ax = plt.subplots(figsize=(4.5, 4))
        im = ax.imshow(attn[h].numpy(), cmap="viridis", interpolation="nearest", vmin=0.0, vmax=vmax[h])
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(f"layer {args.layer}, head {h}: near {near[h]:.3f} / far {far[h]:.3f}")
        ax.set_xlabel("key j")
        ax.set_ylabel("query i")
        _save(fig, out / f"layer{args.layer}_head{h}.png")
        plt.close(fig)
        a = axes[h // cols][h % cols]
        a.imshow(attn[h].numpy(), cmap="viridis", interpolation="nearest", vmin=0.0, vmax=vmax[h])
        a.set_title(f"head {h}")
        a.axis("off")
    for h in range(heads, rows * cols):
        axes[h // cols][h % cols].axis("off")
    overview.suptitle(f"{Path(args.checkpoint).name}: layer {args.layer} (FLT approximation)")
    _save(overview, out / f"layer{args.layer}_heads.png")
    plt.close(overview)
    stats = {
        "checkpoint": str(args.checkpoint),
        "layer": args.layer,
        "split": args.split,
        "index": args.index,
        "length": int(attn.shape[-1]),
        "near_10pct": float(near.mean()),
        "far_10pct": float(far.mean()),
        "per_head": [{"near_10pct": float(a), "far_10pct": float(b)} for a, b in zip(near, far)],
        "uniform_reference": 0.1,
        "paper_wikitext103": {"near_10pct": 0.279, "far_10pct": 0.068},
    }
    _write_json(stats, out / f"layer{args.layer}_locality.json")
    print(f"layer {args.layer}: mean attention on the nearest 10% of tokens {stats['near_10pct']:.3f}, "
          f"on the farthest 10% {stats['far_10pct']:.3f} (uniform 0.100; paper 0.279 / 0.068)")
    print(f"wrote {heads} head maps, the overview and layer{args.layer}_locality.json to {out}")
    return 0


def cmd_local_rpe(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    if args.checkpoint is None:
        v = tuple(args.half_widths)
        fig = plt.figure(figsize=(11, 4.8))
        d1, d2, f = local_rpe_grid(v, lattice=True, amplitude=args.amplitude, extent=args.extent)
        _surface(fig.add_subplot(1, 2, 1, projection="3d"), d1, d2, f,
                 rf"box: $C\,1[|\Delta r_1|\leq {v[0]:g}]\,1[|\Delta r_2|\leq {v[1]:g}]$ (lattice)")
        d1, d2, f = local_rpe_grid(v, lattice=False, order=args.order, amplitude=args.amplitude,
                                   extent=args.extent)
        _surface(fig.add_subplot(1, 2, 2, projection="3d"), d1, d2, f,
                 f"continuous, order k={args.order} (peak {args.amplitude:g})")
        _save(fig, out / "local_rpe_2d.png")
        plt.close(fig)
        print(f"wrote {out / 'local_rpe_2d.png'}")
        return 0

    from flt_mol.attention import SpectralRPE
    from flt_mol.train.commands import load_for_inference

    _, model = load_for_inference(args.checkpoint, "cpu")
    rpes = [(name, m) for name, m in model.named_modules() if isinstance(m, SpectralRPE)]
    if not rpes:
        raise CheckpointError(f"{args.checkpoint}: the model has no learned RPE to draw")
    written = []
    for name, rpe in rpes:
        heads = rpe.num_heads
        cols = min(heads, 4)
        rows = math.ceil(heads / cols)
        extent = args.extent if args.extent is not None else 16.0
        integer = bool(getattr(rpe, "lattice", False))
        if rpe.dim == 2:
            fig = plt.figure(figsize=(4 * cols, 3.6 * rows))
            for h in range(heads):
                d1, d2, f = rpe_mask_grid(rpe, extent=extent, integer=integer, head=h)
                _surface(fig.add_subplot(rows, cols, h + 1, projection="3d"), d1, d2, f, f"head {h}")
        elif rpe.dim == 1:
            fig, ax = plt.subplots(figsize=(7, 4))
            e = int(math.ceil(extent))
            delta = torch.arange(-e, e + 1, dtype=torch.float32) if integer else torch.linspace(-extent, extent, 401)
            with torch.no_grad():
                f = rpe.mask(delta[:, None])
            for h in range(heads):
                ax.plot(delta.numpy(), f[:, h].numpy(), marker="." if integer else None, label=f"head {h}")
            ax.set_xlabel(r"$\Delta r$ (tokens)")
            ax.set_ylabel(r"$f(\Delta r)$")
            ax.legend(fontsize=8, ncol=2)
        else:
            continue
        fig.suptitle(f"learned {type(rpe).__name__} ({name})")
        path = out / f"rpe_{name.replace('.', '_') or 'model'}.png"
        _save(fig, path)
        plt.close(fig)
        written.append(path)
    if not written:
        raise CheckpointError(f"{args.checkpoint}: no 1D or 2D RPE to draw")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("viz", help="pictures: LM attention maps + locality statistic, local RPE shapes")
    sub = p.add_subparsers(dest="viz_command", metavar="WHAT", required=True)

    a = sub.add_parser("attention-maps", help="per-head attention maps of a trained FLT LM and the locality statistic")
    a.add_argument("checkpoint", type=Path, help="LM checkpoint (best.pt / checkpoint.pt)")
    a.add_argument("--out", type=Path, required=True, help="output folder for the PNGs and layerL_locality.json")
    a.add_argument("--layer", type=int, default=0, help="block whose attention is drawn (paper: the first)")
    a.add_argument("--split", choices=("train", "val"), default="train", help="where the sequence comes from")
    a.add_argument("--index", type=int, default=0, help="which block of that split")
    a.add_argument("--length", type=int, default=None, help="use only the first N tokens (default: the whole block)")
    a.add_argument("--seed", type=int, default=None,
                   help="redraw the random features with this seed first (default: keep the trained draw)")
    a.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    a.set_defaults(func=cmd_attention_maps)

    r = sub.add_parser("local-rpe", help="2D local RPE shapes (paper Fig. 4), given or learned")
    r.add_argument("--out", type=Path, required=True, help="output folder")
    r.add_argument("--half-widths", type=float, nargs=2, default=(3.0, 2.0), metavar=("V1", "V2"),
                   help="half-widths v1, v2 of the box along each axis")
    r.add_argument("--order", type=int, default=2, help="k of the continuous mask (>= 2)")
    r.add_argument("--amplitude", type=float, default=1.0, help="C, the peak value")
    r.add_argument("--extent", type=float, default=None, help="half-width of the plotted range of offsets (default: from the half-widths)")
    r.add_argument("--checkpoint", type=Path, default=None, help="draw the learned RPE(s) of this model instead (default: the given shape)")
    r.set_defaults(func=cmd_local_rpe)
