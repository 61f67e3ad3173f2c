"""``flt-mol optim {meta-train, evaluate}``: learned optimisers with FLT memory (paper §5.4)."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("optim", help="meta-train and evaluate learned optimisers (FLT memory)")
    sub = parser.add_subparsers(dest="optim_command", metavar="SUBCOMMAND")

    def _help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)

    mt = sub.add_parser(
        "meta-train",
        help="meta-train a learned optimiser from a recipe",
        usage="flt-mol optim meta-train RECIPE [key=value ...] --out DIR [--no-resume] [--progress]",
    )
    mt.add_argument("recipe", help="YAML recipe (recipes/optim_*.yaml)")
    mt.add_argument("--out", required=True, help="output folder (checkpoint.pt, meta_log.csv, summary.json)")
    mt.add_argument("--no-resume", action="store_true", help="start over even if OUT/checkpoint.pt exists")
    mt.add_argument("--progress", action="store_true", help="show a progress bar")
    mt.add_argument("overrides", nargs="*", help="key=value overrides, given right after RECIPE (before --out), e.g. "
                    "meta_iterations=50 optimizer.memory.window=16")
    mt.set_defaults(func=_meta_train)

    ev = sub.add_parser("evaluate", help="compare checkpoints against tuned Adam on held-out tasks")
    ev.add_argument("--checkpoint", action="append", required=True, metavar="LABEL=PATH",
                    help="a meta-training checkpoint with its label (repeat)")
    ev.add_argument("--out", required=True, help="output folder (results.json and PNG plots)")
    ev.add_argument("--dims", type=int, nargs="+", default=[2, 5, 10], help="Rastrigin dimensions")
    ev.add_argument("--num-functions", type=int, default=8, help="held-out functions per dimension")
    ev.add_argument("--tune-functions", type=int, default=4, help="functions used to tune Adam's lr")
    ev.add_argument("--steps", type=int, default=200, help="optimisation steps on Rastrigin")
    ev.add_argument("--digits-steps", type=int, default=300, help="steps on the digits MLP (0 skips)")
    ev.add_argument("--adam-lrs", type=float, nargs="+", default=None, help="Adam learning-rate grid")
    ev.add_argument("--progress", action="store_true")
    ev.set_defaults(func=_evaluate)


def _meta_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flt_mol.optim.meta import load_config, meta_train

    config = load_config(args.recipe, args.overrides)
    summary = meta_train(config, args.out, resume=not args.no_resume, progress=args.progress)
    path = Path(args.out) / "summary.json"
    tmp = path.with_name("summary.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(path)
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from flt_mol.optim.evaluate import DEFAULT_ADAM_LRS, evaluate

    checkpoints = {}
    for item in args.checkpoint:
        if "=" not in item:
            raise ValueError(f"--checkpoint {item!r} must look like LABEL=PATH")
        label, path = item.split("=", 1)
        if label in checkpoints:
            raise ValueError(f"--checkpoint: label {label!r} given twice")
        checkpoints[label] = path
    evaluate(
        checkpoints,
        args.out,
        dims=tuple(args.dims),
        num_functions=args.num_functions,
        tune_functions=args.tune_functions,
        steps=args.steps,
        digits_steps=args.digits_steps,
        adam_lrs=tuple(args.adam_lrs) if args.adam_lrs is not None else DEFAULT_ADAM_LRS,
        progress=True,
    )
    return 0
