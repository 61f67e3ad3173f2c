"""Energy metrics against hand computation, and their exact reduction from totals."""

from __future__ import annotations

import pytest
import torch

from flt_mol.train.metrics import average_entry, energy_totals, format_table, metrics_from_totals


def test_metrics_by_hand():
    pred = torch.tensor([1.00, 2.00, -0.50, 0.30])
    target = torch.tensor([1.01, 2.50, -0.49, 0.00])
    # errors: -0.01, -0.5, -0.01, 0.3
    m = metrics_from_totals(energy_totals(pred, target))
    assert m["n"] == 4
    assert m["energy_mae"] == pytest.approx((0.01 + 0.5 + 0.01 + 0.3) / 4, rel=1e-6)
    assert m["energy_mse"] == pytest.approx((0.0001 + 0.25 + 0.0001 + 0.09) / 4, rel=1e-5)
    assert m["energy_within_threshold"] == pytest.approx(2 / 4)


def test_totals_reduce_exactly_over_batches():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(37, generator=g), torch.randn(37, generator=g)
    whole = metrics_from_totals(energy_totals(pred, target))
    parts = sum(energy_totals(p, t) for p, t in zip(pred.split(5), target.split(5)))
    split = metrics_from_totals(parts)
    for k in whole:
        assert split[k] == pytest.approx(whole[k], rel=1e-12)
    # The mean of per-batch MAEs is not the MAE when batches differ in size: totals are needed.
    naive = sum(float((p - t).abs().mean()) for p, t in zip(pred.split(5), target.split(5))) / 8
    assert naive != pytest.approx(whole["energy_mae"], rel=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="1-D"):
        energy_totals(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="N = 0"):
        metrics_from_totals(torch.zeros(4, dtype=torch.float64))


def test_average_and_table():
    metrics = {
        "a": {"energy_mae": 0.1, "energy_mse": 0.02, "energy_within_threshold": 0.5, "n": 10,
              "baselines": {"train_mean": 0.4, "composition": 0.2}},
        "b": {"energy_mae": 0.3, "energy_mse": 0.04, "energy_within_threshold": 0.1, "n": 30,
              "baselines": {"train_mean": 0.6, "composition": 0.4}},
    }
    avg = average_entry(metrics)
    assert avg["energy_mae"] == pytest.approx(0.2)
    assert avg["n"] == 40
    assert avg["baselines"]["composition"] == pytest.approx(0.3)
    table = format_table({**metrics, "average": avg})
    lines = table.splitlines()
    assert "train_mean MAE" in lines[0] and "EwT" in lines[0]
    assert lines[2].split()[:5] == ["a", "10", "0.1000", "0.0200", "50.00%"]
    assert lines[-1].split()[0] == "average"
