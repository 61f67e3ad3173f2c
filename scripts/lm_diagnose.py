"""Diagnostics of trained LM checkpoints behind the README's "why" paragraphs.

For each checkpoint, on 8 validation blocks:

* the learned RPE mask ``f(0..11)`` per head (how strong the relative prior became);
* per layer, the mean squared norms the FAVOR+ map exponentiates: ``|Q d^-1/4|^2``,
  ``|K d^-1/4|^2`` and, for FLT, the RPE features ``|n1|^2``, ``|n2|^2`` (DESIGN.md §2(c));
* ``TV``: mean total-variation distance between each query's attention row as the model applies
  it (the random-feature estimate) and the exact softmax attention of the same weights (with the
  exact RPE mask): how far the estimate is from what it estimates;
* the locality statistic (:func:`flt_mol.viz.locality_statistic`) of both.

    python scripts/lm_diagnose.py runs/lm/flt_local/seed0/best.pt runs/lm/performer/seed0/best.pt
"""

from __future__ import annotations

import sys

import torch

from flt_mol.attention import FLTAttention
from flt_mol.attention.layer import center_positions
from flt_mol.train.commands import load_for_inference
from flt_mol.viz import locality_statistic


@torch.no_grad()
def diagnose(checkpoint: str) -> None:
    task, model = load_for_inference(checkpoint, "cpu")
    data = task.val_datasets()["val"]
    tokens = torch.stack([data[i][0] for i in range(0, 64, 8)])  # [8, L]
    c = model.config
    print(f"== {checkpoint}: attention={c.attention} rpe={c.rpe if c.uses_rpe() else None} split={c.rpe_split}")
    if model.rpe is not None:
        f = model.rpe.mask(torch.arange(12.0).view(-1, 1))  # [12, H]
        for h, row in enumerate(f.T.tolist()):
            print(f"  head {h} f(0..11): " + " ".join(f"{v:+.2f}" for v in row))
    pos = model.positions(tokens)
    for i, block in enumerate(model.blocks):
        attn = block.attention
        if not isinstance(attn, FLTAttention):
            print(f"  layer {i}: {type(attn).__name__} (no FAVOR+ estimate to compare)")
            continue
        x = block.norm1(model.hidden_states(tokens, upto=i))
        q, k = attn._project_one(x, 0), attn._project_one(x, 1)
        msg = f"  layer {i}: |q|^2 {q.pow(2).sum(-1).mean():.2f}  |k|^2 {k.pow(2).sum(-1).mean():.2f}"
        if attn.mode == "flt":
            p = center_positions(pos, causal=True, integer=attn.rpe.integer_positions)
            n1, n2 = attn.rpe.features(p, attn.num_rpe_features, noise=attn.rpe_noise, split=attn.rpe_split)
            msg += f"  |n1|^2 {n1.pow(2).sum(-1).mean():.2f}  |n2|^2 {n2.pow(2).sum(-1).mean():.2f}"
        estimate = attn.attention_weights(x, pos)
        if attn.mode != "exact":
            mode, attn.mode = attn.mode, "exact"
            try:
                exact = attn.attention_weights(x, pos)
            finally:
                attn.mode = mode
            tv = 0.5 * (estimate - exact).abs().sum(-1).mean()
            near_x, far_x = locality_statistic(exact, causal=True)
            msg += f"  TV(estimate, exact) {tv:.3f}  exact locality {near_x.mean():.3f}/{far_x.mean():.3f}"
        near, far = locality_statistic(estimate, causal=True)
        msg += f"  applied locality {near.mean():.3f}/{far.mean():.3f}"
        print(msg)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        diagnose(path)
