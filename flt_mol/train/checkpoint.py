"""Checkpoints: atomic writes and the RNG states that make ``--resume`` exact.

A checkpoint is a dict saved with ``torch.save``:

    version, config (plain dict), task (task state: normalisers, baselines, ...), model,
    ema (or None), optimizer, scheduler, step, best, history, rng (one entry per rank)

The model state includes the random features (they are buffers), so a resumed or evaluated
model sees exactly the features it had when it was saved.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flt_mol.errors import CheckpointError
from flt_mol.fileio import atomic_write

CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("version", "config", "task", "model")
_EXPECTED = "expected a checkpoint.pt / best.pt written by flt-mol train"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``.

    A kill at any moment leaves either the previous file or the new one, never a torn file. The
    file gets the mode a plain ``open()`` would give it (see :mod:`flt_mol.fileio`).
    """
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def atomic_write_text(text: str, path: str | Path) -> None:
    """Write text atomically (temp file in the same folder + fsync + ``os.replace``)."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) generator states of this process."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_torch_file(path: str | Path, *, expected: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` a file the user named, saying what it is not when it cannot be read.

    Args:
        path: the file.
        expected: what the file should have been, for the message (``expected ...``).
        map_location: passed to ``torch.load``.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: ``not a flt_mol checkpoint: PATH (EXPECTED; why)``: a folder, an empty
            file, or a file ``torch.load`` cannot read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"not a flt_mol checkpoint: {path} ({expected}; this is a folder)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"not a flt_mol checkpoint: {path} ({expected}; the file is empty)")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, UnicodeDecodeError,
            AttributeError, ImportError, ValueError, TypeError) as err:
        # torch raises all of these for files it cannot read (a text file: UnpicklingError; a
        # zip that is not a torch archive or a torn file: RuntimeError; a pickle of a class
        # that no longer exists: AttributeError / ImportError).
        reason = " ".join(str(err).split())[:160]
        raise CheckpointError(
            f"not a flt_mol checkpoint: {path} ({expected}; torch.load failed: {type(err).__name__}: {reason})"
        ) from err


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *,
                    task: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Load a checkpoint written by :func:`flt_mol.train.loop.train`, checking what was opened.

    Checkpoints hold numpy RNG states and plain Python objects, so they are loaded with
    ``weights_only=False``: only load checkpoints you trust (a pickle can execute code).

    Args:
        path: the checkpoint file.
        map_location: passed to ``torch.load``.
        task: when given, the checkpoint must hold a model of this task (``is2re``, ``s2ef``, ``lm``,
            ``vit``) or of one of these tasks (a tuple).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: (a ``ValueError``) ``not a flt_mol checkpoint: PATH (expected ...)``: the
            file is empty, not a torch file, lacks the checkpoint keys, has another version, or
            holds another task.
    """
    path = Path(path)
    ckpt = load_torch_file(path, expected=_EXPECTED, map_location=map_location)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"not a flt_mol checkpoint: {path} ({_EXPECTED}; it holds a {type(ckpt).__name__})")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        hint = " (a learned-optimiser checkpoint: use flt-mol optim evaluate)" if "rule" in ckpt else ""
        raise CheckpointError(
            f"not a flt_mol checkpoint: {path} (expected the keys {', '.join(CHECKPOINT_KEYS)}; "
            f"missing {', '.join(missing)}){hint}"
        )
    if ckpt["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"not a flt_mol checkpoint: {path} (expected checkpoint version {CHECKPOINT_VERSION}, "
            f"got {ckpt['version']!r})"
        )
    if task is not None:
        config = ckpt["config"]
        found = config.get("task") if isinstance(config, dict) else None
        wanted = (task,) if isinstance(task, str) else tuple(task)
        if found not in wanted:
            names = {"is2re": "IS2RE", "s2ef": "S2EF", "lm": "LM", "vit": "ViT"}
            kinds = " or ".join(names.get(t, t) for t in wanted)
            expected = " or ".join(repr(t) for t in wanted)
            raise CheckpointError(
                f"not a flt_mol {kinds} checkpoint: {path} (expected a model of task "
                f"{expected}, this one holds task {found!r})"
            )
    return ckpt
