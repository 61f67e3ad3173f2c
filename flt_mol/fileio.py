"""Atomic file writes that leave files as readable as a plain ``open()`` would.

``tempfile.mkstemp`` creates its file with mode 0o600 whatever the umask, and ``os.replace``
keeps that mode; so every output written through a temporary file gets
:func:`default_file_mode` (``0o666 & ~umask``) before it is renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "default_file_mode", "fsync_dir"]


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask``."""
    # The umask can only be read by setting it; set it straight back.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a directory entry (makes a rename durable on POSIX; a no-op elsewhere)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it, give it
    :func:`default_file_mode` and ``os.replace`` it onto ``path``.

    A kill at any moment leaves either the previous file or the new one, never a torn file; an
    exception leaves the previous file and removes the temporary one.

    Args:
        path: the file to write (its folder is created).
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        # Name the file the caller asked for, not the temporary one.
        raise type(err)(err.errno, err.strerror, str(path)) from err
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
