"""``flt-mol train | evaluate | predict``.

    flt-mol train RECIPE.yaml --out DIR [--resume] [key=value ...]
    flt-mol evaluate CHECKPOINT [--data PATH ...] [--split NAME ...] --out FILE.json [--plot FILE.png]
    flt-mol predict CHECKPOINT --data PATH --out FILE.npz

``evaluate`` writes ``{split: {"energy_mae", "energy_mse", "energy_within_threshold", "n",
"baselines": {name: mae}}, ..., "average": {...}}``; without ``--data`` it evaluates the embedded
EMT-IS2RE validation splits (``--split`` then picks among them). ``predict`` writes OC20-style
``ids`` and ``energy`` arrays.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from a YAML recipe",
                              description="Train from a YAML recipe; key=value overrides (e.g. optim.lr=1e-3).")
    p.add_argument("recipe", type=Path, help="YAML recipe (see recipes/)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (checkpoint.pt, best.pt, metrics.json, logs); required")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    # REMAINDER so that options may follow the overrides' position (RECIPE --out DIR k=v ...);
    # cmd_train parses the remainder intermixed.
    p.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("evaluate", help="energy MAE / MSE / EwT of a checkpoint, beside trivial baselines")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="LMDB file(s) / shard folder(s) or emt:SPLIT (default: the EMT-IS2RE validation splits)")
    p.add_argument("--split", nargs="+", default=None, metavar="NAME",
                   help="names for the --data paths; without --data: which EMT-IS2RE splits to evaluate")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON")
    p.add_argument("--plot", type=Path, default=None, help="parity plot (PNG)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("predict", help="write OC20-style predictions (ids, energy) as .npz")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", required=True, help="LMDB file / shard folder or emt:SPLIT")
    p.add_argument("--out", type=Path, required=True, help="output .npz")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)


# --------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from flt_mol.train.config import load_config
    from flt_mol.train.loop import train

    rest = argparse.ArgumentParser(prog="flt-mol train", add_help=False)
    rest.add_argument("--out", type=Path, default=None)
    rest.add_argument("--resume", action="store_true")
    rest.add_argument("overrides", nargs="*")
    extra = rest.parse_intermixed_args(args.overrides)
    out = extra.out if extra.out is not None else args.out
    if out is None:
        raise ValueError("flt-mol train needs --out DIR (the run's output folder)")
    resume = args.resume or extra.resume
    config = load_config(args.recipe, extra.overrides)
    metrics = train(config, out, resume=resume)
    if metrics is not None:
        from flt_mol.train import distributed

        if distributed.info().is_main:
            print(f"wrote {out / 'checkpoint.pt'}, {out / 'best.pt'}, {out / 'metrics.json'}")
    return 0


def load_for_inference(checkpoint: str | Path, device: str = "auto") -> tuple[Any, Any]:
    """``(task, model)`` rebuilt from a checkpoint (EMA weights when the run kept them), eval mode."""
    from flt_mol.train.checkpoint import load_checkpoint
    from flt_mol.train.loop import config_from_checkpoint, resolve_device
    from flt_mol.train.tasks import build_task

    ckpt = load_checkpoint(checkpoint)
    config = config_from_checkpoint(ckpt)
    task = build_task(config)
    task.load_state_dict(ckpt["task"])
    model = task.build_model()
    state = ckpt["model"]
    if ckpt.get("ema") is not None:
        prefix = "module."
        state = {k[len(prefix):]: v for k, v in ckpt["ema"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    model.to(resolve_device(device)).eval()
    return task, model


def _loader(task: Any, spec: str, batch_size: int | None) -> Any:
    from flt_mol.train.loop import eval_loader
    from flt_mol.train.tasks import open_split

    ds = open_split(spec)
    return eval_loader(ds, batch_size=batch_size if batch_size is not None else task.eval_batch_size,
                       collate_fn=task.collate_fn(), num_workers=0)


def evaluation_specs(data: list[str] | None, split: list[str] | None) -> dict[str, str]:
    """``{name: spec}`` from ``--data`` / ``--split`` (see the module docstring)."""
    from flt_mol.train.tasks import EMT_VAL_SPLITS, split_name

    if data is None:
        names = split if split is not None else list(EMT_VAL_SPLITS)
        return {name: f"emt:{name}" for name in names}
    if split is not None and len(split) != len(data):
        raise ValueError(f"--split gives {len(split)} names for {len(data)} --data paths")
    names = split if split is not None else [split_name(d) for d in data]
    if len(set(names)) != len(names):
        raise ValueError(f"split names must be unique, got {names}; name them with --split")
    return dict(zip(names, data))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flt_mol.train.checkpoint import atomic_write_text

    specs = evaluation_specs(args.data, args.split)
    task, model = load_for_inference(args.checkpoint, args.device)
    if not hasattr(task, "predict"):
        raise ValueError(f"evaluate supports IS2RE checkpoints; {args.checkpoint} is task {task.config.task!r}")
    loaders = {name: _loader(task, spec, args.batch_size) for name, spec in specs.items()}
    predictions: dict[str, Any] = {}
    try:
        metrics = task.evaluate(model, loaders, predictions=predictions)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    atomic_write_text(json.dumps(metrics, indent=2), args.out)
    print(task.format_metrics(metrics))
    print(f"wrote {args.out}")
    if args.plot is not None:
        from flt_mol.train.plots import plot_parity

        plot_parity(predictions, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    task, model = load_for_inference(args.checkpoint, args.device)
    if not hasattr(task, "predict"):
        raise ValueError(f"predict supports IS2RE checkpoints; {args.checkpoint} is task {task.config.task!r}")
    loader = _loader(task, args.data, args.batch_size)
    ids, energy, _ = task.predict(model, loader)
    # OC20 submissions use string system ids; structures without a sid get their index.
    ids = [str(s) if int(s) >= 0 else str(i) for i, s in enumerate(ids)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez_compressed(tmp, ids=np.array(ids), energy=energy.numpy().astype(np.float64))
    import os

    os.replace(tmp, out)
    print(f"wrote {len(ids)} predictions to {out}")
    return 0
