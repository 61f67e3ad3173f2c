"""Per-step cost of the IS2RE model, FLT vs exact attention, as the token count grows.

    python -m flt_mol.train.crossover --tokens 64 128 256 512 1024 --recipe recipes/emt_is2re_flt.yaml

A token is an atom or a periodic image. Each size is a batch of synthetic structures (random
positions in a slab-like box, metal atoms with an adsorbate on top) run through one training step
(forward, backward, optimiser) of the recipe's model in each attention mode; the median of a few
repeats is reported. Timings depend on the machine and its load: numbers, not assertions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def synthetic_batch(num_tokens: int, batch: int, *, seed: int = 0):
    import torch

    from flt_mol.data.collate import AtomsBatch

    g = torch.Generator().manual_seed(seed)
    side = (num_tokens / 0.08) ** (1 / 3)  # metal-like density, ~0.08 atoms / A^3
    pos = torch.rand(batch, num_tokens, 3, generator=g) * side
    z = torch.full((batch, num_tokens), 29, dtype=torch.long)
    tags = torch.ones(batch, num_tokens, dtype=torch.long)
    tags[:, :2] = 2
    z[:, :2] = 8
    pad = torch.zeros(batch, num_tokens, dtype=torch.bool)
    return AtomsBatch(
        atomic_numbers=z, pos=pos, tags=tags, fixed=torch.zeros_like(pad), padding_mask=pad,
        is_image=torch.zeros_like(pad), natoms=torch.full((batch,), num_tokens),
        cell=torch.eye(3).expand(batch, 3, 3) * side, y_relaxed=torch.zeros(batch),
        displacement=torch.zeros(batch, num_tokens, 3), sid=torch.arange(batch),
    )


def time_step(model, batch, *, repeats: int) -> float:
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = model(batch)
        loss = out["energy"].square().mean() + out["displacement"].square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i > 0:  # the first step warms up allocators
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    import torch

    from flt_mol.models.is2re import IS2REModel
    from flt_mol.train.config import load_config

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", type=Path, default=Path("recipes/emt_is2re_flt.yaml"))
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["flt", "exact", "performer"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="rows as JSON")
    args = p.parse_args(argv)
    config = load_config(args.recipe).model
    rows = []
    print(f"{'tokens':>7} " + " ".join(f"{m + ' s/step':>16}" for m in args.modes))
    for n in args.tokens:
        batch = synthetic_batch(n, args.batch)
        row = {"tokens": n, "batch": args.batch}
        for mode in args.modes:
            torch.manual_seed(0)
            model = IS2REModel(dataclasses.replace(config, attention=mode)).train()
            row[mode] = time_step(model, batch, repeats=args.repeats)
        rows.append(row)
        print(f"{n:>7} " + " ".join(f"{row[m]:>16.4f}" for m in args.modes), flush=True)
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
