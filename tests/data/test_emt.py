"""EMT-IS2RE: the shipped files, the generator that made them, and the LMDBs built from them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from flt_mol.data import emt, emt_generator
from flt_mol.data.emt import EMT_SPLITS, SHIPPED_DIR, emt_is2re, load_split_arrays


@pytest.fixture(scope="module")
def config() -> emt_generator.GeneratorConfig:
    meta = json.loads((SHIPPED_DIR / "generator_config.json").read_text())
    return emt_generator.GeneratorConfig.from_dict(meta["config"])


@pytest.mark.parametrize("split", ["val_ood_cat", "train"])
def test_regenerated_surface_matches_shipped(config, split):
    """The first surface of a split, regenerated from the seed alone, equals the shipped one."""
    adsorbates, _source = emt_generator.load_adsorbates()
    records = emt_generator.generate_surface(config, split, 0, adsorbates)
    new = emt_generator.records_to_arrays(records)
    old = load_split_arrays(split)
    n = len(records)
    assert n == config.ads_per_surface * config.sites_per_ads
    assert np.all(old["surface_index"][:n] == 0)
    n_atoms = int(new["offsets"][-1])
    np.testing.assert_array_equal(new["offsets"], old["offsets"][: n + 1])
    for key in ("numbers", "tags"):
        np.testing.assert_array_equal(new[key], old[key][:n_atoms])
    for key in ("sid", "ads_index", "facet", "site_type", "flags"):
        np.testing.assert_array_equal(new[key], old[key][:n])
    # Same code, same seed: only BLAS/libm differences across machines could move anything; the
    # relaxation stops at fmax = 0.05 eV/A, so allow 1e-4 A and 1e-5 eV (well below what an IS2RE
    # model resolves) and exact float32 storage rounding on the initial structure.
    np.testing.assert_allclose(new["pos_init"], old["pos_init"][:n_atoms], atol=1e-5)
    np.testing.assert_allclose(new["pos_relaxed"], old["pos_relaxed"][:n_atoms], atol=1e-4)
    np.testing.assert_allclose(new["y_relaxed"], old["y_relaxed"][:n], atol=1e-5)
    np.testing.assert_allclose(new["y_init"], old["y_init"][:n], atol=1e-5)


def _pools(config):
    adsorbates, _ = emt_generator.load_adsorbates()
    ads_in, ads_out, combos_in, combos_out = emt_generator.holdout_pools(
        seed=config.seed, num_adsorbates=len(adsorbates), holdout_fraction=config.holdout_fraction)
    return ({adsorbates[i].index for i in ads_in}, {adsorbates[i].index for i in ads_out},
            set(combos_in), set(combos_out))


def _combos(arrays) -> set[tuple[str, ...]]:
    from ase.data import chemical_symbols

    out = set()
    off = arrays["offsets"]
    for i in range(len(arrays["sid"])):
        z = arrays["numbers"][off[i]:off[i + 1]][arrays["tags"][off[i]:off[i + 1]] < 2]
        out.add(tuple(m for m in emt_generator.METALS if m in {chemical_symbols[k] for k in z}))
    return out


def test_splits_hold_out_adsorbates_and_compositions(config):
    ads_in, ads_out, combos_in, combos_out = _pools(config)
    assert ads_in.isdisjoint(ads_out) and combos_in.isdisjoint(combos_out)
    arrays = {s: load_split_arrays(s) for s in EMT_SPLITS}
    for split, a in arrays.items():
        ads = set(a["ads_index"].tolist())
        combos = _combos(a)
        ood_ads = split in ("val_ood_ads", "val_ood_both")
        ood_cat = split in ("val_ood_cat", "val_ood_both")
        assert ads <= (ads_out if ood_ads else ads_in), split
        assert combos <= (combos_out if ood_cat else combos_in), split
    assert set(arrays["train"]["ads_index"].tolist()).isdisjoint(arrays["val_ood_ads"]["ads_index"].tolist())
    assert _combos(arrays["train"]).isdisjoint(_combos(arrays["val_ood_cat"]))


def test_shipped_files_are_consistent():
    for split in EMT_SPLITS:
        a = load_split_arrays(split)
        n = len(a["sid"])
        assert n > 0
        assert a["offsets"][0] == 0 and a["offsets"][-1] == len(a["numbers"]) == len(a["pos_init"])
        assert np.all(np.diff(a["offsets"]) > 0)
        assert a["cell"].shape == (n, 3, 3)
        assert len(np.unique(a["sid"])) == n
        kept = a["flags"] == 0
        assert np.isfinite(a["y_relaxed"][kept]).all() and np.isfinite(a["pos_relaxed"]).all()
        # Every system has exactly one adsorbate (tag 2) and both slab tags.
        for i in range(0, n, max(1, n // 50)):
            t = a["tags"][a["offsets"][i]:a["offsets"][i + 1]]
            assert set(t.tolist()) == {0, 1, 2}


def test_baselines_json_matches_recomputation():
    stored = json.loads((SHIPPED_DIR / "baselines.json").read_text())
    fresh = emt.compute_baselines()
    for split in EMT_SPLITS:
        for name, mae in fresh["splits"][split]["baselines"].items():
            assert stored["splits"][split]["baselines"][name] == pytest.approx(mae, rel=1e-9)
        assert stored["splits"][split]["n_kept"] == fresh["splits"][split]["n_kept"]


def test_emt_is2re_builds_lmdb_with_oc20_fields(tmp_path, monkeypatch):
    from flt_mol.data.oc20 import OC20LMDB

    monkeypatch.setenv("FLT_MOL_DATA_DIR", str(tmp_path))
    path = emt_is2re("val_ood_ads")
    assert path.is_file() and path.parent.parent == tmp_path / "emt_is2re"
    assert [p.name for p in path.parent.iterdir()] == ["val_ood_ads.lmdb"]  # no temp files left
    mtime = path.stat().st_mtime_ns
    assert emt_is2re("val_ood_ads") == path and path.stat().st_mtime_ns == mtime  # cached

    arrays = load_split_arrays("val_ood_ads")
    kept = np.flatnonzero(arrays["flags"] == 0)
    ds = OC20LMDB(path)
    assert len(ds) == len(kept)
    torch.manual_seed(0)
    for idx in [0, len(ds) - 1, int(torch.randint(len(ds), ()).item())]:
        d = ds[idx]
        i = kept[idx]
        n = int(arrays["offsets"][i + 1] - arrays["offsets"][i])
        assert d.pos.shape == (n, 3) and d.pos_relaxed.shape == (n, 3) and d.cell.shape == (1, 3, 3)
        assert d.atomic_numbers.dtype == torch.float32 and d.atomic_numbers.shape == (n,)
        assert d.natoms == n and d.tags.shape == (n,) and d.fixed.shape == (n,)
        assert torch.equal(d.fixed, (d.tags == 0).float())
        assert d.sid == int(arrays["sid"][i])
        assert d.facet == int(arrays["facet"][i]) and d.site_type == int(arrays["site_type"][i])
        assert d.y_relaxed == pytest.approx(float(arrays["y_relaxed"][i]), abs=0)
        for t in (d.pos, d.pos_relaxed, d.cell):
            assert torch.isfinite(t).all()
        assert np.isfinite(d.y_init) and np.isfinite(d.y_relaxed)


def test_site_baseline_through_the_lmdb_matches_baselines_json(tmp_path):
    """What `flt-mol evaluate` reports (fit dict from train, items read from the LMDB) equals
    the card's figure, and the issue's ~0.071 / 0.068 eV on val_id / val_ood_cat."""
    from flt_mol.data.oc20 import OC20LMDB
    from flt_mol.data.references import TrivialBaselines

    stored = json.loads((SHIPPED_DIR / "baselines.json").read_text())
    fit = TrivialBaselines.from_dict(stored["fit"])
    ds = OC20LMDB(emt_is2re("val_id", root=tmp_path))
    got = fit.evaluate(ds)
    assert got == pytest.approx(stored["splits"]["val_id"]["baselines"], rel=1e-9)
    assert got["per_adsorbate_facet_site_mean"] == pytest.approx(0.0707, abs=5e-4)
    assert stored["splits"]["val_ood_cat"]["baselines"]["per_adsorbate_facet_site_mean"] == pytest.approx(0.0684, abs=5e-4)


def test_emt_is2re_root_argument(tmp_path):
    path = emt_is2re("val_ood_both", root=tmp_path / "cache")
    assert path.is_relative_to(tmp_path / "cache" / "emt_is2re")


def test_unknown_split_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="val_ood_both") as info:
        emt_is2re("test", root=tmp_path)
    assert "'test'" in str(info.value)
    with pytest.raises(ValueError):
        load_split_arrays("val")


def test_missing_shipped_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.npz"):
        emt_is2re("train", root=tmp_path, source=tmp_path)


def test_cli_build_rejects_bad_split(tmp_path, capsys):
    from flt_mol.cli import main

    assert main(["dataset", "build", "val", "--root", str(tmp_path)]) == 2
    assert "valid splits" in capsys.readouterr().err
    assert not (tmp_path / "emt_is2re").exists()


def test_cli_info_prints_every_split(capsys):
    from flt_mol.cli import main

    assert main(["dataset", "info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == set(EMT_SPLITS)
    assert all("per_adsorbate_mean" in v["baselines"] for v in out.values())


def test_generator_config_round_trip_and_bad_field():
    cfg = emt_generator.GeneratorConfig(seed=3)
    assert emt_generator.GeneratorConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="bogus"):
        emt_generator.GeneratorConfig.from_dict({"bogus": 1})


def test_evaluate_reports_the_site_baseline_on_emt_data(tmp_path, capsys):
    """End to end: a model trained on EMT-IS2RE structures (which carry facet / site_type) is
    evaluated by `flt-mol evaluate` with the per (adsorbate, facet, site) baseline beside it."""
    import yaml

    from flt_mol.cli import main
    from flt_mol.data.oc20 import write_lmdb
    from flt_mol.data.references import TrivialBaselines
    from tests.train.conftest import tiny_raw_config

    arrays = load_split_arrays("val_id")
    items = emt.split_items(arrays)
    train, val = tmp_path / "train.lmdb", tmp_path / "val.lmdb"
    write_lmdb(items[:40], train)
    write_lmdb(items[40:52], val)
    raw = tiny_raw_config({"train": train, "val": val}, steps=1, eval_interval=1, ckpt_interval=1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    out = tmp_path / "m.json"
    assert main(["evaluate", str(tmp_path / "run" / "checkpoint.pt"), "--data", str(val), "--split", "val",
                 "--out", str(out)]) == 0
    reported = json.loads(out.read_text())["val"]["baselines"]
    want = TrivialBaselines.fit(items[:40]).evaluate(items[40:52])
    assert reported == pytest.approx(want, rel=1e-9)
    assert "per_adsorbate_facet_site_mean" in reported
    assert "per_adsorbate_facet_site_mean MAE" in capsys.readouterr().out
