"""The errors flt_mol expects a user to make, and nothing else.

Every module may raise these (this module imports nothing from flt_mol, so ``models/``,
``data/`` and ``train/`` can all use it without knowing each other). The command line
(:func:`flt_mol.cli.main`) turns them into one line on stderr and an exit code; any other
exception is a bug and keeps its traceback.

    FltMolError            base; exit code 1
      UsageError           the request is wrong: an argument, option, config key or value (exit 2)
        ConfigError        a recipe or a key=value override does not match the typed config
      InputError           a file that was named exists but cannot be used (exit 1)
        CheckpointError    not a flt_mol checkpoint (or not the kind the command needs)

All of them are also :class:`ValueError`, so code written against the earlier
``except ValueError`` keeps working. Missing paths stay :class:`FileNotFoundError` (the
command line reports them as usage errors).
"""

from __future__ import annotations

__all__ = ["FltMolError", "UsageError", "ConfigError", "InputError", "CheckpointError"]


class FltMolError(ValueError):
    """Base of the errors a user can cause; ``exit_code`` is what ``flt-mol`` exits with."""

    exit_code: int = 1


class UsageError(FltMolError):
    """The request itself is wrong: a bad argument, option, config key or value."""

    exit_code = 2


class ConfigError(UsageError):
    """A recipe or an override does not match the typed configuration (names the key)."""


class InputError(FltMolError):
    """A named file exists but is not what was expected (names the file, entry or field)."""

    exit_code = 1


class CheckpointError(InputError):
    """A file is not a flt_mol checkpoint, or not one of the kind the command needs."""
