"""Outputs written through a temporary file get the mode a plain ``open()`` would give them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from flt_mol.fileio import atomic_write, default_file_mode


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_default_mode_is_what_open_gives(umask, tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert default_file_mode() == _mode(plain) == 0o666 & ~umask
    assert os.umask(umask) == umask  # reading the umask left it as it was


def test_every_atomic_writer_respects_the_umask(umask, tmp_path):
    from flt_mol.optim.meta import save_atomic
    from flt_mol.train.checkpoint import atomic_torch_save, atomic_write_text
    from tests.train.helpers import make_lmdb

    expected = 0o666 & ~umask
    atomic_torch_save({"a": torch.zeros(1)}, tmp_path / "checkpoint.pt")
    atomic_write_text("{}", tmp_path / "metrics.json")
    save_atomic({"a": 1}, tmp_path / "rule.pt")
    with atomic_write(tmp_path / "log.csv") as fh:
        fh.write("step\n")
    lmdb = make_lmdb(tmp_path / "data.lmdb", 2, seed=0)  # write_lmdb
    for name in ("checkpoint.pt", "metrics.json", "rule.pt", "log.csv"):
        assert _mode(tmp_path / name) == expected, name
    assert _mode(lmdb) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "data.lmdb", "log.csv",
                                                          "metrics.json", "rule.pt"]  # no temp files left


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as fh:
            fh.write("new")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_an_unwritable_target_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError) as info:
        with atomic_write(blocker / "metrics.json") as fh:
            fh.write("{}")
    assert info.value.filename == str(blocker / "metrics.json")
