"""The S2EF task: collate carries energies and forces, the loss, metrics through ``s2ef_totals``
and ``flt-mol evaluate`` on an S2EF checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from flt_mol.cli import main
from flt_mol.data.collate import collate_atoms
from flt_mol.train.config import ConfigError, config_from_dict
from flt_mol.train.tasks import EnergyFieldCollater, S2EFTask, build_task, resolve_path, split_name
from tests.s2ef_fixtures import tiny_s2ef_raw_config
from tests.train.helpers import make_items, make_s2ef_items


def test_collate_carries_energies_and_forces_zero_on_padding():
    items = make_s2ef_items(2, seed=3)
    batch = collate_atoms(items)
    assert batch.y.dtype == torch.float64 and batch.y.tolist() == [d.y for d in items]
    n = items[0].pos.shape[0]
    torch.testing.assert_close(batch.force[0, :n], items[0].force)
    assert float(batch.force[batch.padding_mask].abs().sum()) == 0.0
    assert collate_atoms(make_items(2, seed=3)).force is None  # IS2RE items: no S2EF targets
    adsorption = EnergyFieldCollater("y_adsorption")(items)
    assert adsorption.y.tolist() == [d.y_adsorption for d in items]


def test_split_names_and_paths_of_the_embedded_s2ef_data():
    assert split_name("emt_s2ef:val_ood_ads") == "val_ood_ads"
    with pytest.raises(ValueError, match="split"):
        resolve_path("emt_s2ef:nope")


def test_loss_is_energy_mae_plus_weighted_per_atom_l2_on_free_atoms(s2ef_run):
    config = config_from_dict(tiny_s2ef_raw_config(s2ef_run["train"], s2ef_run["val"]))
    task = build_task(config)
    assert isinstance(task, S2EFTask)
    task.setup()
    model = task.build_model().train()
    batch = task.collate_fn()(make_s2ef_items(3, seed=9))
    loss, logs = task.loss(model, batch, step=1)
    assert logs["loss"] == pytest.approx(logs["energy_l1"] + 100.0 * logs["force_l2"], rel=1e-5)
    loss.backward()  # through the forces (double backward) into every trunk parameter
    assert float(model.layers[0].attention.qkv.weight.grad.abs().sum()) > 0
    # Only free atoms count: the fixed atoms' targets can be anything.
    batch.force[batch.fixed] += 100.0
    torch.manual_seed(0)
    _, logs2 = task.loss(model, batch, step=1)
    assert logs2["force_l2"] == pytest.approx(logs["force_l2"], rel=1e-5)


def test_adsorbate_force_weight_gives_a_weighted_mean_over_free_atoms(s2ef_run):
    """data.adsorbate_force_weight = 3: the force term is sum_i w_i |F_i - F_t,i| / sum_i w_i with
    w = 3 on adsorbate (tag 2) free atoms, 1 on other free atoms, 0 on fixed atoms and padding."""
    raw = tiny_s2ef_raw_config(s2ef_run["train"], s2ef_run["val"])
    raw["data"]["adsorbate_force_weight"] = 3.0
    task = build_task(config_from_dict(raw))
    task.setup()
    model = task.build_model().eval()
    batch = task.collate_fn()(make_s2ef_items(3, seed=9))
    free = batch.real_mask & (batch.fixed == 0)
    assert bool((free & (batch.tags == 2)).any()) and bool((free & (batch.tags != 2)).any())
    torch.manual_seed(0)
    _, logs = task.loss(model, batch, step=1)
    torch.manual_seed(0)
    err = (model(batch)["forces"].detach() - batch.force / task.normalizer.std).norm(dim=-1)  # [B, L]
    w = torch.where(batch.tags == 2, 3.0, 1.0) * free
    assert logs["force_l2"] == pytest.approx(float((err * w).sum() / w.sum()), rel=1e-5)
    plain = float((err * free).sum() / free.sum())
    assert abs(logs["force_l2"] - plain) > 1e-4 * plain  # the weight does change the loss


def test_config_checks():
    raw = tiny_s2ef_raw_config("a.lmdb", "b.lmdb")
    raw["data"]["energy_target"] = "y_relaxed"
    with pytest.raises(ConfigError, match="energy_target"):
        config_from_dict(raw)
    raw = tiny_s2ef_raw_config("a.lmdb", "b.lmdb")
    raw["model"]["periodic"] = "images"
    with pytest.raises(ConfigError, match="reciprocal"):
        config_from_dict(raw)
    raw = tiny_s2ef_raw_config("a.lmdb", "b.lmdb")
    raw["data"]["adsorbate_force_weight"] = 0.0
    with pytest.raises(ConfigError, match="adsorbate_force_weight"):
        config_from_dict(raw)


def test_evaluate_prints_s2ef_metrics_beside_trivial_baselines(s2ef_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(s2ef_run["ckpt"]), "--data", str(s2ef_run["val"]), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    for word in ("F MAE", "F cos", "EFwT", "train_mean_zero_forces", "composition_linear_zero_forces"):
        assert word in table, word
    metrics = json.loads(out.read_text())["val"]
    assert metrics["n"] == 4 and metrics["n_atoms"] > 0
    for key in ("energy_mae", "forces_mae", "forces_cos", "energy_forces_within_threshold"):
        assert key in metrics
    base = metrics["baselines"]["train_mean_zero_forces"]
    assert base["forces_cos"] == 0.0 and base["forces_mae"] > 0
