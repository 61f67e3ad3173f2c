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
from pathlib import Path
from typing import Any

from flt_mol.errors import UsageError


_DEVICE_HELP = "auto (cuda when available, else cpu), cpu, cuda or cuda:N"
_DATA_HELP = "an OC20 LMDB file, a folder of .lmdb shards, or emt:SPLIT for the embedded EMT-IS2RE data set"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train a model from a YAML recipe",
        description="Train the model a YAML recipe describes (recipes/*.yaml) into --out: checkpoint.pt "
        "(resumable), best.pt, metrics.json, log.csv, log.json and learning_curve.png. key=value "
        "overrides follow the recipe, before or after the options (e.g. optim.lr=1e-3 run.steps=500).",
    )
    p.add_argument("recipe", type=Path, metavar="RECIPE", help="YAML recipe (see recipes/)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder (checkpoint.pt, best.pt, metrics.json, logs)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate", help="energy MAE / MSE / EwT (S2EF: and force MAE, cosine, EFwT) of a checkpoint, beside trivial baselines",
        description="Evaluate an IS2RE checkpoint: energy MAE, MSE and EwT (|error| < 0.02 eV) per split "
        "and averaged, beside the trivial baselines, printed as a table and written as JSON. An S2EF "
        "checkpoint (task: s2ef) adds OC20's S2EF metrics (force MAE and cosine on free atoms, EFwT: "
        "energy within 0.02 eV and every force component within 0.03 eV/A) beside the train-mean and "
        "composition-linear energies with zero forces; its default data are the EMT-S2EF validation splits.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT",
                   help="IS2RE or S2EF checkpoint written by flt-mol train (checkpoint.pt or best.pt)")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help=_DATA_HELP + " (emt_s2ef:SPLIT for EMT-S2EF; default: the embedded validation splits "
                   "of the checkpoint's task)")
    p.add_argument("--split", nargs="+", default=None, metavar="NAME",
                   help="names for the --data paths; without --data: which EMT-IS2RE splits to evaluate "
                   "(default: the file/folder names; all four validation splits)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.json", help="metrics JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="also draw a parity plot (PNG) here")
    p.add_argument("--batch-size", type=int, default=None,
                   help="structures per batch (default: the recipe's data.eval_batch_size)")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "predict", help="write OC20-style predictions (ids, energy) as .npz",
        description="Predict relaxed energies with an IS2RE checkpoint and write them as an OC20-style "
        ".npz (string ids, float64 energy in eV); the data need no targets.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="IS2RE checkpoint written by flt-mol train (checkpoint.pt or best.pt)")
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--out", type=Path, required=True, metavar="FILE.npz", help="output .npz")
    p.add_argument("--batch-size", type=int, default=None,
                   help="structures per batch (default: the recipe's data.eval_batch_size)")
    p.add_argument("--device", default="auto", help=_DEVICE_HELP)
    p.add_argument("--chunk-atoms", type=int, default=None, metavar="N",
                   help="atoms per chunk when a batch has more than 65,536 tokens (reciprocal models; default "
                   "2048): the same energies in memory linear in the atoms with a small constant")
    p.set_defaults(func=cmd_predict)


# --------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from flt_mol.train.config import load_config
    from flt_mol.train.loop import train

    config = load_config(args.recipe, args.overrides)
    out = args.out
    resume = args.resume
    metrics = train(config, out, resume=resume)
    if metrics is not None:
        from flt_mol.train import distributed

        if distributed.info().is_main:
            print(f"wrote {out / 'checkpoint.pt'}, {out / 'best.pt'}, {out / 'metrics.json'}")
    return 0


def load_for_inference(checkpoint: str | Path, device: str = "auto", *,
                       task: str | tuple[str, ...] | None = None) -> tuple[Any, Any]:
    """``(task, model)`` rebuilt from a checkpoint (EMA weights when the run kept them), eval mode.

    ``task`` (``is2re``, ``s2ef``, ``lm``, ``vit``, or a tuple of them), when given, is the task the
    checkpoint must hold (:class:`~flt_mol.errors.CheckpointError` otherwise).
    """
    from flt_mol.train.checkpoint import load_checkpoint
    from flt_mol.train.loop import config_from_checkpoint, resolve_device
    from flt_mol.train.tasks import build_task

    ckpt = load_checkpoint(checkpoint, task=task)
    config = config_from_checkpoint(ckpt)
    built = build_task(config)
    built.load_state_dict(ckpt["task"])
    model = built.build_model()
    state = ckpt["model"]
    if ckpt.get("ema") is not None:
        prefix = "module."
        state = {k[len(prefix):]: v for k, v in ckpt["ema"].items() if k.startswith(prefix)}
    model.load_state_dict(state)
    model.to(resolve_device(device)).eval()
    return built, model


def _loader(task: Any, spec: str, batch_size: int | None) -> Any:
    from flt_mol.train.loop import eval_loader
    from flt_mol.train.tasks import open_split

    ds = open_split(spec)
    return eval_loader(ds, batch_size=batch_size if batch_size is not None else task.eval_batch_size,
                       collate_fn=task.collate_fn(), num_workers=0)


def evaluation_specs(data: list[str] | None, split: list[str] | None, *, prefix: str = "emt") -> dict[str, str]:
    """``{name: spec}`` from ``--data`` / ``--split`` (see the module docstring); without ``--data``
    the embedded validation splits ``PREFIX:SPLIT`` (``emt`` or ``emt_s2ef``)."""
    from flt_mol.train.tasks import EMT_VAL_SPLITS, split_name

    if data is None:
        names = split if split is not None else list(EMT_VAL_SPLITS)
        return {name: f"{prefix}:{name}" for name in names}
    if split is not None and len(split) != len(data):
        raise UsageError(f"--split gives {len(split)} names for {len(data)} --data paths")
    names = split if split is not None else [split_name(d) for d in data]
    if len(set(names)) != len(names):
        raise UsageError(f"split names must be unique, got {names}; name them with --split")
    return dict(zip(names, data))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flt_mol.train.checkpoint import atomic_write_text

    # --data / --split are checked before the checkpoint is read; the default splits follow its task.
    specs = evaluation_specs(args.data, args.split) if args.data is not None else None
    task, model = load_for_inference(args.checkpoint, args.device, task=("is2re", "s2ef"))
    if specs is None:
        specs = evaluation_specs(None, args.split, prefix="emt_s2ef" if task.config.task == "s2ef" else "emt")
    loaders = {name: _loader(task, spec, args.batch_size) for name, spec in specs.items()}
    predictions: dict[str, Any] = {}
    metrics = task.evaluate(model, loaders, predictions=predictions)
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

    task, model = load_for_inference(args.checkpoint, args.device, task="is2re")
    loader = _loader(task, args.data, args.batch_size)
    ids, energy, _ = task.predict(model, loader, chunk_atoms=args.chunk_atoms)
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
