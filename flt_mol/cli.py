"""The ``flt-mol`` command line.

Each sub-command lives in the module that owns its work; that module exposes
``add_parser(subparsers)`` which adds its parser and sets ``func``. The list below is explicit:
nothing registers itself by being imported.

Rules every command follows (applied here, once, rather than in each command):

* **Errors.** The errors a user can cause are the types of :mod:`flt_mol.errors` plus a path
  that does not exist or cannot be read or written. They end the command with one line on
  stderr, ``flt-mol COMMAND: error: MESSAGE`` (the message names the file, key or field), and
  exit code 2 for a wrong request (argument, option, config key or value, missing path) or 1
  for a failure (a file that exists but cannot be used, a permission problem). ``--debug`` or
  ``FLT_MOL_DEBUG=1`` prints the traceback as well. Any other exception is a bug and keeps its
  traceback. Ctrl-C ends with ``flt-mol COMMAND: interrupted`` and exit code 130.
* **Overrides.** Commands that read a recipe take ``key=value`` overrides anywhere after the
  recipe, before or after the options (``flt-mol train RECIPE --out DIR optim.lr=1e-3``).
* **Help.** Every command has a description and every option a help text; defaults are shown.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Iterator

__all__ = ["main", "build_parser", "parse_args", "HelpFormatter", "exit_code_for"]

# (command, module that defines it). Modules are imported only to build the parser, and keep
# their heavy imports inside the command functions so `flt-mol --help` stays fast.
COMMAND_MODULES: list[tuple[str, str]] = [
    ("train", "flt_mol.train.commands"),
    ("evaluate", "flt_mol.train.commands"),
    ("predict", "flt_mol.train.commands"),
    ("relax", "flt_mol.relax"),
    ("md", "flt_mol.relax"),
    ("convert", "flt_mol.data.commands"),
    ("dataset", "flt_mol.data.commands"),
    ("bench", "flt_mol.bench.commands"),
    ("viz", "flt_mol.viz"),
    ("optim", "flt_mol.optim.commands"),
]

DEBUG_ENV = "FLT_MOL_DEBUG"


class HelpFormatter(argparse.HelpFormatter):
    """Paragraphs of descriptions kept (each wrapped to the terminal, a hanging indent kept);
    ``(default: X)`` appended to every option's help.

    Not for defaults that say nothing (``None``, ``False`` of a flag, suppressed) nor when the
    help already states its default.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for para in text.strip().split("\n\n"):
            lines = para.splitlines()
            hanging = re.match(r"\s*", lines[1]).group() if len(lines) > 1 else ""
            paragraphs.append(textwrap.fill(" ".join(line.strip() for line in lines), width,
                                            initial_indent=indent, subsequent_indent=indent + hanging,
                                            break_on_hyphens=False))
        return "\n\n".join(paragraphs)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help if action.help is not None else ""
        default = action.default
        if (
            "default" in help_text.lower()
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or (not action.option_strings and action.nargs not in ("?", "*"))
            or (isinstance(default, list) and not default)
        ):
            return help_text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{help_text} (default: {shown})".lstrip()


def _subparser_actions(parser: argparse.ArgumentParser) -> Iterator[argparse._SubParsersAction]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield action


def walk_parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, str | None]]:
    """Every parser under ``parser`` (itself first), with the one-line help it was added with."""
    stack: list[tuple[argparse.ArgumentParser, str | None]] = [(parser, parser.description)]
    while stack:
        current, summary = stack.pop(0)
        yield current, summary
        for sub in _subparser_actions(current):
            helps = {a.dest: a.help for a in sub._choices_actions}
            for name, child in sub.choices.items():
                stack.append((child, helps.get(name)))


def _finish(parser: argparse.ArgumentParser) -> None:
    """What every command gets: the help formatter, a description, ``--debug``, its name."""
    for current, summary in walk_parsers(parser):
        current.formatter_class = HelpFormatter
        if current.description is None and summary is not None:
            current.description = summary[:1].upper() + summary[1:] + ("" if summary.endswith(".") else ".")
        is_leaf = not any(True for _ in _subparser_actions(current))
        if current is not parser and is_leaf:
            # SUPPRESS: a sub-command's --debug must not reset `flt-mol --debug COMMAND`.
            current.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                 help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
        # The innermost parser that runs sets it last, so errors name the full command.
        current.set_defaults(_prog=current.prog)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flt-mol",
        description="FourierLearner-Transformers: linear attention with learned Fourier RPEs.",
        epilog=f"Errors are one line; --debug (or {DEBUG_ENV}=1) shows the traceback. "
        "Exit codes: 0 success, 1 failure, 2 usage error.",
    )
    parser.add_argument("--debug", action="store_true", default=False,
                        help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen: set[str] = set()
    for _command, module_name in COMMAND_MODULES:
        if module_name in seen:
            continue
        seen.add(module_name)
        importlib.import_module(module_name).add_parser(sub)
    _finish(parser)
    return parser


# --------------------------------------------------------------------------------------------
# errors


# Paths the user named that are not there, or not of the right kind: the request is wrong.
_PATH_USAGE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def exit_code_for(err: BaseException) -> int | None:
    """The exit code of an expected error, or None for a bug (which keeps its traceback)."""
    from flt_mol.errors import FltMolError

    if isinstance(err, FltMolError):
        return err.exit_code
    if isinstance(err, _PATH_USAGE_ERRORS):
        return 2
    if isinstance(err, OSError) and (err.filename is not None or isinstance(err, PermissionError)):
        return 1  # permissions, a full disk, ...: the machine, not the code
    return None


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror is not None:
        # "[Errno 2] No such file or directory: 'x'" -> "x: No such file or directory"
        text = f"{err.filename}: {err.strerror}"
        if err.filename2 is not None:
            text += f" (-> {err.filename2})"
    else:
        text = str(err) if str(err) else type(err).__name__
    return re.sub(r"\s*\n\s*", " ", text).strip()


def _debug_requested(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")


# --------------------------------------------------------------------------------------------


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the overrides rule of the module docstring."""
    # Overrides after options (`flt-mol train RECIPE --out DIR key=value ...`): argparse stops
    # filling positionals once an option has been seen, so trailing key=value words come back
    # as extras. They go to the commands that declare an `overrides` positional, in key=value
    # form only; anything else is an unrecognised argument.
    args, extras = parser.parse_known_args(argv)
    if extras:
        accepts = isinstance(getattr(args, "overrides", None), list)
        bad = [e for e in extras if e.startswith("-") or "=" not in e]
        if not accepts or bad:
            # Report it with the sub-command's usage, not the top-level one.
            leaf = {p.prog: p for p, _ in walk_parsers(parser)}.get(getattr(args, "_prog", None), parser)
            hint = " (overrides are key=value)" if accepts else ""
            leaf.error(f"unrecognized arguments: {' '.join(bad if accepts else extras)}{hint}")
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    prog = getattr(args, "_prog", "flt-mol")
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        if _debug_requested(args):
            traceback.print_exc()
        # Outputs are written atomically: an interrupted run leaves the previous files, and
        # `flt-mol train ... --resume` continues from the last checkpoint.
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - re-raised unless it is one of the expected kinds
        code = exit_code_for(err)
        if code is None:
            raise
        if _debug_requested(args):
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return code
    return int(result) if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
