"""Measure the random-feature noise of a trained IS2RE model and its rotation/translation invariance.

    python -m flt_mol.train.invariance CHECKPOINT --data emt:val_id --draws 8 --max-items 128

For each structure: the prediction with the checkpoint's own random features and under ``K``
independent redraws, for the original input and for a randomly rotated (``e3nn.o3.rand_matrix``,
cell rotated with it) and translated copy. Reported (eV, averaged over structures):

* ``trained_draw_rot_trans_change_eV``: ``|E(x) - E(Rx + t)|`` with the features the model was
  trained with (what ``flt-mol evaluate`` uses); 0 up to float rounding with ``model.frame: cell``;
* ``trained_draw_mae_eV`` / ``trained_draw_rotated_mae_eV``: MAE against the targets, both inputs;
* ``feature_noise_std_eV``: std over the K redraws (how much the prediction depends on the draw);
* ``single_draw_rot_trans_change_eV`` and ``mean_of_draws_rot_trans_change_eV`` over the redraws;
  without the cell frame the latter should be of the order of ``noise * sqrt(2/K) sqrt(2/pi)``
  (``expected_if_invariant_eV``) if the model is invariant in expectation.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch
    from e3nn.o3 import rand_matrix

    from flt_mol.train.commands import load_for_inference
    from flt_mol.train.tasks import open_split

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", default="emt:val_id")
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--max-items", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    task, model = load_for_inference(args.checkpoint, "cpu", task="is2re")
    ds = open_split(args.data)
    items = [ds[i] for i in range(min(len(ds), args.max_items))]
    moved = []
    for d in items:
        rot, shift = rand_matrix(), torch.randn(3) * 5.0
        m = d.clone()
        m.pos = d.pos @ rot.T + shift
        m.cell = d.cell @ rot.T
        if getattr(d, "pos_relaxed", None) is not None:
            m.pos_relaxed = d.pos_relaxed @ rot.T + shift
        moved.append(m)
    collate = task.collate_fn()

    def predict(structs) -> torch.Tensor:
        out = []
        for i in range(0, len(structs), 32):
            batch = collate(structs[i : i + 32])
            e = model(batch)["energy"].double()
            out.append(task.normalizer.denormalize(e, task._reference(batch)))
        return torch.cat(out)

    y = torch.tensor([float(d.y_relaxed) for d in items], dtype=torch.float64) if all(
        getattr(d, "y_relaxed", None) is not None for d in items) else None
    with torch.no_grad():
        a0, b0 = predict(items), predict(moved)  # the checkpoint's own features
    gen = torch.Generator().manual_seed(args.seed)
    a, b = [], []
    with torch.no_grad():
        for _ in range(args.draws):
            model.redraw_features(generator=gen)
            a.append(predict(items))
            b.append(predict(moved))
    a, b = torch.stack(a), torch.stack(b)  # [K, N]
    k = a.shape[0]
    result = {
        "n": a.shape[1],
        "draws": k,
        "frame": getattr(model.config, "frame", "none"),
        "trained_draw_rot_trans_change_eV": float((a0 - b0).abs().mean()),
        "trained_draw_mae_eV": float((a0 - y).abs().mean()) if y is not None else None,
        "trained_draw_rotated_mae_eV": float((b0 - y).abs().mean()) if y is not None else None,
        "feature_noise_std_eV": float(a.std(0).mean()),
        "single_draw_rot_trans_change_eV": float((a - b).abs().mean()),
        "mean_of_draws_rot_trans_change_eV": float((a.mean(0) - b.mean(0)).abs().mean()),
        "expected_if_invariant_eV": float(a.std(0).mean() * math.sqrt(2.0 / k) * math.sqrt(2 / math.pi)),
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
