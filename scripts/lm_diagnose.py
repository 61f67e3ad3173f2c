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

``--as-flt M [M ...]`` (for an exact-attention checkpoint): the same trained weights evaluated
through FLT's estimator (signed balanced split, M FAVOR+ features, the checkpoint's RPE) on every
third validation block, against the exact attention they were trained with: can the random
features carry the mask that noise-free training learned?

    python scripts/lm_diagnose.py runs/lm/exact/seed0/best.pt --as-flt 32 128 512
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import torch
from torch.nn import functional as F

from flt_mol.attention import FLTAttention
from flt_mol.attention.layer import center_positions
from flt_mol.models.lm import CausalLM
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


@torch.no_grad()
def exact_weights_as_flt(checkpoint: str, feature_counts: list[int]) -> None:
    task, exact = load_for_inference(checkpoint, "cpu")
    if exact.config.attention != "exact" or exact.rpe is None:
        raise ValueError(f"--as-flt needs an exact-attention checkpoint with an RPE; {checkpoint} is "
                         f"{exact.config.attention!r}")
    data = task.val_datasets()["val"]
    items = [data[i] for i in range(0, len(data), 3)]
    tokens, targets = torch.stack([t for t, _ in items]), torch.stack([y for _, y in items])

    def perplexity(model: CausalLM) -> float:
        return math.exp(float(F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())))

    print(f"== {checkpoint}: exact attention {perplexity(exact):.3f} on {len(items)} validation blocks")
    for m in feature_counts:
        config = dataclasses.replace(exact.config, attention="flt", rpe_split="signed_balanced", num_kernel_features=m)
        torch.manual_seed(0)
        flt = CausalLM(config).eval()
        # Every learned parameter is shared by the modes; only the random features are new.
        flt.load_state_dict(exact.state_dict(), strict=False)
        print(f"  the same weights through FLT, m = {m}: {perplexity(flt):.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--as-flt", type=int, nargs="+", default=None, metavar="M")
    args = parser.parse_args()
    for path in args.checkpoints:
        if args.as_flt:
            exact_weights_as_flt(path, args.as_flt)
        else:
            diagnose(path)
