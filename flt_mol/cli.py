"""The ``flt-mol`` command line.

Each sub-command lives in the module that owns its work; that module exposes
``add_parser(subparsers)`` which adds its parser and sets ``func``. The list below is explicit:
nothing registers itself by being imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command, module that defines it). Modules are imported only to build the parser, and keep
# their heavy imports inside the command functions so `flt-mol --help` stays fast.
COMMAND_MODULES: list[tuple[str, str]] = [
    ("train", "flt_mol.train.commands"),
    ("evaluate", "flt_mol.train.commands"),
    ("predict", "flt_mol.train.commands"),
    ("convert", "flt_mol.data.commands"),
    ("dataset", "flt_mol.data.emt"),
    ("bench", "flt_mol.bench.commands"),
    ("viz", "flt_mol.viz"),
    ("optim", "flt_mol.optim.commands"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flt-mol",
        description="FourierLearner-Transformers: linear attention with learned Fourier RPEs.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen: set[str] = set()
    for _command, module_name in COMMAND_MODULES:
        if module_name in seen:
            continue
        seen.add(module_name)
        importlib.import_module(module_name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # `flt-mol train RECIPE --out DIR key=value ...`: argparse stops filling positionals once an
    # option has been seen, so trailing key=value overrides come back as extras. They are
    # accepted only by commands that declare an `overrides` positional, and only in key=value form.
    args, extras = parser.parse_known_args(argv)
    if extras:
        accepts = isinstance(getattr(args, "overrides", None), list)
        bad = [e for e in extras if e.startswith("-") or "=" not in e]
        if not accepts or bad:
            parser.error(f"unrecognized arguments: {' '.join(bad if accepts else extras)}")
        args.overrides = [*args.overrides, *extras]
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
