"""EMT-S2EF: frames regenerated from the seed, the LMDB built from them, the forces' physics."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from flt_mol.data.emt import load_split_arrays
from flt_mol.data.s2ef import (
    FRAME_INITIAL,
    FRAME_RELAXED,
    SHIPPED_S2EF_DIR,
    S2EFConfig,
    emt_energy_forces,
    emt_s2ef,
    select_systems,
    split_summary,
    system_frames,
    system_items,
)

# A few systems per split keep the LMDB tests at a second or two.
SMALL = dataclasses.replace(S2EFConfig(), systems=(("val_ood_both", 3), ("val_id", 2)))


def _index_of(arrays, sid: int) -> int:
    return int(np.flatnonzero(arrays["sid"] == sid)[0])


def test_regenerated_systems_match_the_reference_frames():
    """Frames regenerated from (seed, sid) alone equal the ones recorded in
    datasets/emt_s2ef/reference_frames.json when the data set was made."""
    ref = json.loads((SHIPPED_S2EF_DIR / "reference_frames.json").read_text())
    config = S2EFConfig()
    assert json.loads(config.to_json()) == ref["config"]
    for system in ref["systems"]:
        arrays = load_split_arrays(system["split"])
        index = _index_of(arrays, system["sid"])
        assert index in select_systems(arrays, system["split"], config)
        items = system_items(arrays, index, config)
        assert len(items) == len(system["frames"]) == len(config.frames)
        for d, want in zip(items, system["frames"]):
            assert d.fid == want["fid"] and d.frame_type == want["frame_type"]
            assert d.rattle == pytest.approx(want["rattle"], abs=1e-12)
            assert float(d.pos.double().sum()) == pytest.approx(want["pos_sum"], abs=1e-4)
            # Same positions, same EMT: only libm differences across machines could move these.
            assert d.y == pytest.approx(want["y"], abs=1e-6)
            assert d.y_adsorption == pytest.approx(want["y_adsorption"], abs=1e-6)
            assert float(d.force.double().abs().sum()) == pytest.approx(want["force_abs_sum"], abs=1e-4)
            np.testing.assert_allclose(d.force[d.fixed == 0][0].numpy(), want["force_first_free_atom"], atol=1e-5)


def test_frames_rattle_free_atoms_only_within_the_documented_range():
    arrays = load_split_arrays("val_id")
    config = S2EFConfig()
    for index in select_systems(arrays, "val_id", config)[:5]:
        a, b = int(arrays["offsets"][index]), int(arrays["offsets"][index + 1])
        free = arrays["tags"][a:b] != 0
        init, relaxed = arrays["pos_init"][a:b].astype(np.float64), arrays["pos_relaxed"][a:b].astype(np.float64)
        frames = system_frames(arrays, int(index), config)
        assert [f["frame_type"] for f in frames] == list(config.frames)
        for f in frames:
            base = (1 - f["t"]) * init + f["t"] * relaxed
            assert (f["t"] == 0.0) == (f["frame_type"] == FRAME_INITIAL)
            assert (f["t"] == 1.0) == (f["frame_type"] == FRAME_RELAXED)
            assert 0.1 <= f["t"] <= 0.9 or f["t"] in (0.0, 1.0)
            assert 0.02 <= f["rattle"] <= 0.2
            disp = f["pos"].astype(np.float64) - base
            np.testing.assert_allclose(disp[~free], 0.0, atol=1e-5)  # fixed atoms stay (float32 rounding)
            rms = np.sqrt((disp[free] ** 2).sum(axis=1).mean())
            assert 0.4 * f["rattle"] < rms < 1.8 * f["rattle"]  # ~20 free atoms: loose statistical bounds


def test_forces_are_the_negative_energy_gradient_on_every_atom():
    """Stored forces are EMT's raw -dE/dpos, fixed atoms included (no constraint applied)."""
    arrays = load_split_arrays("val_ood_cat")
    index = int(select_systems(arrays, "val_ood_cat", S2EFConfig())[0])
    a, b = int(arrays["offsets"][index]), int(arrays["offsets"][index + 1])
    numbers, cell = arrays["numbers"][a:b], arrays["cell"][index]
    pos = system_frames(arrays, index, S2EFConfig())[1]["pos"].astype(np.float64)
    _, forces = emt_energy_forces(numbers, pos, cell)
    tags = arrays["tags"][a:b]
    atoms = [int(np.flatnonzero(tags == 0)[0]), int(np.flatnonzero(tags == 2)[0]), int(np.flatnonzero(tags == 1)[3])]
    h = 1e-4
    for atom in atoms:
        for c in range(3):
            plus, minus = pos.copy(), pos.copy()
            plus[atom, c] += h
            minus[atom, c] -= h
            fd = -(emt_energy_forces(numbers, plus, cell)[0] - emt_energy_forces(numbers, minus, cell)[0]) / (2 * h)
            assert forces[atom, c] == pytest.approx(fd, abs=1e-5)
    assert np.abs(forces[tags == 0]).max() > 0.0


def test_emt_s2ef_builds_a_cached_oc20_s2ef_lmdb(tmp_path, monkeypatch):
    from flt_mol.data.oc20 import OC20LMDB

    monkeypatch.setenv("FLT_MOL_DATA_DIR", str(tmp_path))
    path = emt_s2ef("val_ood_both", config=SMALL)
    assert path.is_file() and path.parent.parent == tmp_path / "emt_s2ef"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json", "val_ood_both.lmdb"]
    mtime = path.stat().st_mtime_ns
    assert emt_s2ef("val_ood_both", config=SMALL) == path and path.stat().st_mtime_ns == mtime  # cached
    # another config is another file
    assert emt_s2ef("val_ood_both", config=dataclasses.replace(SMALL, seed=1)).parent != path.parent

    arrays = load_split_arrays("val_ood_both")
    chosen = select_systems(arrays, "val_ood_both", SMALL)
    assert len(chosen) == 3
    ds = OC20LMDB(path)
    assert len(ds) == 3 * len(SMALL.frames)
    expected = system_items(arrays, int(chosen[1]), SMALL)
    for fid, want in enumerate(expected):
        d = ds[len(SMALL.frames) + fid]
        n = d.natoms
        assert d.sid == int(arrays["sid"][chosen[1]]) and d.fid == fid
        assert d.force.dtype == torch.float32 and d.force.shape == (n, 3) and torch.isfinite(d.force).all()
        assert d.pos.dtype == torch.float32 and d.cell.shape == (1, 3, 3)
        assert torch.equal(d.fixed, (d.tags == 0).float())
        assert torch.equal(d.pos, want.pos) and torch.equal(d.force, want.force)
        assert isinstance(d.y, float) and d.y == want.y
        i = int(chosen[1])
        assert d.y_adsorption == pytest.approx(d.y - arrays["e_slab"][i] - arrays["e_gas"][i], abs=1e-9)


def test_relaxed_frames_have_small_forces_before_rattling():
    """Sanity of the physics: at the shipped relaxed positions (t = 1, no rattle) the free-atom
    forces are below the relaxation's fmax (0.05 eV/A, up to float32 storage of positions)."""
    arrays = load_split_arrays("val_id")
    index = int(select_systems(arrays, "val_id", S2EFConfig())[0])
    a, b = int(arrays["offsets"][index]), int(arrays["offsets"][index + 1])
    _, forces = emt_energy_forces(arrays["numbers"][a:b], arrays["pos_relaxed"][a:b], arrays["cell"][index])
    free = arrays["tags"][a:b] != 0
    assert np.linalg.norm(forces[free], axis=1).max() < 0.06


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="valid splits"):
        emt_s2ef("test", root=tmp_path)
    with pytest.raises(ValueError, match="no entry for split 'train'"):
        emt_s2ef("train", root=tmp_path, config=SMALL)
    with pytest.raises(FileNotFoundError, match="val_id.npz"):
        emt_s2ef("val_id", root=tmp_path, source=tmp_path, config=SMALL)


def test_shipped_statistics_match_a_rebuilt_split(tmp_path):
    """datasets/emt_s2ef/stats.json (the data card's numbers) against a fresh build of one
    validation split with the default config."""
    stored = json.loads((SHIPPED_S2EF_DIR / "stats.json").read_text())["stats"]["val_ood_both"]
    fresh = split_summary(emt_s2ef("val_ood_both", root=tmp_path))
    for key, value in fresh.items():
        assert stored[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_cli_s2ef_build_and_info(tmp_path, capsys):
    from flt_mol.cli import main

    assert main(["dataset", "s2ef-build", "nope", "--root", str(tmp_path)]) == 2
    assert "valid splits" in capsys.readouterr().err
    assert main(["dataset", "s2ef-info"]) == 0
    out = capsys.readouterr().out
    for split in ("train", "val_id", "val_ood_ads", "val_ood_cat", "val_ood_both"):
        assert split in out
    assert "EFwT" in out
