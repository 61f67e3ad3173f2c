"""``flt-mol optim {meta-train, evaluate}``: learned optimisers with FLT memory (paper §5.4)."""

from __future__ import annotations

import argparse

from flt_mol.errors import UsageError

__all__ = ["add_parser"]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "optim", help="meta-train and evaluate learned optimisers (FLT memory)",
        description="Learned optimisers whose memory is FLT attention over past steps (paper Sec. 5.4): "
        "meta-train one from a recipe (recipes/optim_*.yaml), then compare checkpoints against tuned Adam.",
    )
    sub = parser.add_subparsers(dest="optim_command", metavar="SUBCOMMAND")

    def _help(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=_help)

    mt = sub.add_parser(
        "meta-train",
        help="meta-train a learned optimiser from a recipe",
        description="Meta-train a learned optimiser from a YAML recipe (recipes/optim_*.yaml) into --out: "
        "checkpoint.pt, meta_log.csv, summary.json. key=value overrides follow the recipe, before or "
        "after the options (e.g. meta_iterations=50 optimizer.memory.window=16).",
    )
    mt.add_argument("recipe", metavar="RECIPE", help="YAML recipe (recipes/optim_*.yaml)")
    mt.add_argument("--out", required=True, metavar="DIR",
                    help="output folder (checkpoint.pt, meta_log.csv, summary.json)")
    mt.add_argument("--no-resume", action="store_true", help="start over even if DIR/checkpoint.pt exists")
    mt.add_argument("--progress", action="store_true", help="show a progress bar")
    mt.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    mt.set_defaults(func=_meta_train)

    ev = sub.add_parser(
        "evaluate", help="compare checkpoints against tuned Adam on held-out tasks",
        description="Run meta-trained optimisers and Adam (learning rate tuned on separate functions) on "
        "held-out Rastrigin functions and a digits MLP; write results.json and PNG plots to --out.",
    )
    ev.add_argument("--checkpoint", action="append", required=True, metavar="LABEL=PATH",
                    help="a meta-training checkpoint with its label (repeat)")
    ev.add_argument("--out", required=True, metavar="DIR", help="output folder (results.json and PNG plots)")
    ev.add_argument("--dims", type=int, nargs="+", default=[2, 5, 10], help="Rastrigin dimensions")
    ev.add_argument("--num-functions", type=int, default=8, help="held-out functions per dimension")
    ev.add_argument("--tune-functions", type=int, default=4, help="functions used to tune Adam's lr")
    ev.add_argument("--steps", type=int, default=200, help="optimisation steps on Rastrigin")
    ev.add_argument("--digits-steps", type=int, default=300, help="steps on the digits MLP (0 skips)")
    ev.add_argument("--adam-lrs", type=float, nargs="+", default=None,
                    help="Adam learning-rate grid (default: 1e-3 3e-3 1e-2 3e-2 0.1 0.3 1 3)")
    ev.add_argument("--progress", action="store_true", help="show a progress bar")
    ev.set_defaults(func=_evaluate)


def _meta_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flt_mol.optim.meta import load_config, meta_train
    from flt_mol.train.checkpoint import atomic_write_text

    config = load_config(args.recipe, args.overrides)
    summary = meta_train(config, args.out, resume=not args.no_resume, progress=args.progress)
    atomic_write_text(json.dumps(summary, indent=2), Path(args.out) / "summary.json")
    print(json.dumps(summary, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from flt_mol.optim.evaluate import DEFAULT_ADAM_LRS, evaluate

    checkpoints = {}
    for item in args.checkpoint:
        if "=" not in item:
            raise UsageError(f"--checkpoint {item!r} must look like LABEL=PATH")
        label, path = item.split("=", 1)
        if label in checkpoints:
            raise UsageError(f"--checkpoint: label {label!r} given twice")
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
        progress=args.progress,
    )
    return 0
