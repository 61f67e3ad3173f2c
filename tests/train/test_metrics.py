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


# --------------------------------------------------------------------------------------------
# S2EF and IS2RS metrics

from itertools import product  # noqa: E402

import numpy as np  # noqa: E402

from flt_mol.train.metrics import (  # noqa: E402
    adwt_metrics_from_totals,
    adwt_thresholds,
    adwt_totals,
    minimum_image_displacement,
    s2ef_metrics_from_totals,
    s2ef_totals,
)


def test_s2ef_metrics_by_hand_on_free_atoms():
    # Two structures: 2 atoms (second fixed) and 1 atom.
    e_pred = torch.tensor([1.00, 0.50])
    e_true = torch.tensor([1.01, 0.40])
    f_true = torch.tensor([[1.0, 0.0, 0.0], [5.0, 5.0, 5.0], [0.0, 2.0, 0.0]])
    f_pred = torch.tensor([[1.0, 0.02, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    fixed = torch.tensor([0, 1, 0])
    m = s2ef_metrics_from_totals(s2ef_totals(e_pred, e_true, f_pred, f_true, torch.tensor([2, 1]), fixed=fixed))
    # scored atoms 0 and 2: errors (0, .02, 0) and (0, -2, 1)
    assert m["n"] == 2 and m["n_atoms"] == 2
    assert m["energy_mae"] == pytest.approx((0.01 + 0.10) / 2, rel=1e-5)
    assert m["forces_mae"] == pytest.approx((0.02 + 2 + 1) / 6, rel=1e-6)
    assert m["forces_mse"] == pytest.approx((0.0004 + 4 + 1) / 6, rel=1e-5)
    cos0 = 1.0 / np.sqrt(1 + 0.02**2)
    assert m["forces_cos"] == pytest.approx((cos0 + 0.0) / 2, rel=1e-6)
    # structure 0: |dE| = 0.01 and worst component 0.02 -> passes; structure 1 fails on both.
    assert m["energy_forces_within_threshold"] == pytest.approx(0.5)
    # Without the mask the fixed atom's huge error counts and structure 0 fails EFwT.
    m_all = s2ef_metrics_from_totals(s2ef_totals(e_pred, e_true, f_pred, f_true, torch.tensor([2, 1])))
    assert m_all["n_atoms"] == 3 and m_all["energy_forces_within_threshold"] == 0.0
    assert m_all["forces_mae"] == pytest.approx((0.02 + 15 + 3) / 9, rel=1e-6)


def test_s2ef_thresholds_are_strict_and_per_component():
    e = torch.zeros(1)
    f_true = torch.zeros(2, 3)
    # 0.029 on every component of every atom passes (the norm would be 0.05): per component.
    m = s2ef_metrics_from_totals(s2ef_totals(e + 0.019, e, f_true + 0.029, f_true, torch.tensor([2])))
    assert m["energy_forces_within_threshold"] == 1.0
    m = s2ef_metrics_from_totals(s2ef_totals(e + 0.019, e, f_true + 0.031, f_true, torch.tensor([2])))
    assert m["energy_forces_within_threshold"] == 0.0
    m = s2ef_metrics_from_totals(s2ef_totals(e + 0.021, e, f_true, f_true, torch.tensor([2])))
    assert m["energy_forces_within_threshold"] == 0.0


def test_s2ef_totals_reduce_exactly_over_batches():
    g = torch.Generator().manual_seed(1)
    natoms = torch.randint(1, 6, (11,), generator=g)
    n = int(natoms.sum())
    e_p, e_t = torch.randn(11, generator=g), torch.randn(11, generator=g)
    f_p, f_t = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    fixed = torch.rand(n, generator=g) < 0.3
    whole = s2ef_metrics_from_totals(s2ef_totals(e_p, e_t, f_p, f_t, natoms, fixed=fixed))
    parts, start = 0, 0
    for lo, hi in [(0, 4), (4, 5), (5, 11)]:
        k = int(natoms[lo:hi].sum())
        parts = parts + s2ef_totals(e_p[lo:hi], e_t[lo:hi], f_p[start:start + k], f_t[start:start + k],
                                    natoms[lo:hi], fixed=fixed[start:start + k])
        start += k
    split = s2ef_metrics_from_totals(parts)
    for key in whole:
        assert split[key] == pytest.approx(whole[key], rel=1e-12)
    # forces_cos agrees with torch's per-atom cosine averaged over free atoms
    free = ~fixed
    assert whole["forces_cos"] == pytest.approx(float(torch.cosine_similarity(f_p[free], f_t[free]).double().mean()), rel=1e-6)


def test_s2ef_bad_input():
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        s2ef_totals(torch.zeros(1), torch.zeros(1), torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([2]))
    with pytest.raises(ValueError, match="natoms sums"):
        s2ef_totals(torch.zeros(1), torch.zeros(1), torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([3]))
    with pytest.raises(ValueError, match="entries for"):
        s2ef_totals(torch.zeros(1), torch.zeros(1), torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="fixed"):
        s2ef_totals(torch.zeros(1), torch.zeros(1), torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([2]),
                    fixed=torch.zeros(3))


def _brute_min_image(delta: np.ndarray, cell: np.ndarray, pbc) -> np.ndarray:
    # every lattice shift within +-3 cells of the one that cancels the integer part
    centre = -np.rint(np.linalg.solve(cell.T, delta))
    ranges = [range(int(c) - 3, int(c) + 4) if p else [0] for c, p in zip(centre, pbc)]
    cands = np.array([delta + np.array(m) @ cell for m in product(*ranges)])
    return cands[np.argmin(np.linalg.norm(cands, axis=1))]


@pytest.mark.parametrize("pbc", [(True, True, True), (True, True, False)])
def test_minimum_image_matches_brute_force(pbc):
    rng = np.random.default_rng(0)
    for _ in range(20):
        # Mildly skewed (reduced) cells: 60-120 degree angles, like fcc(111)/(110) slab cells.
        cell = np.diag(rng.uniform(4, 10, 3)) + np.triu(rng.uniform(-0.5, 0.5, (3, 3)), 1) * 4
        delta = rng.normal(scale=8.0, size=(16, 3))
        got = minimum_image_displacement(torch.from_numpy(delta), torch.from_numpy(cell), torch.tensor(pbc)).numpy()
        want = np.array([_brute_min_image(d, cell, pbc) for d in delta])
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(want, axis=1), atol=1e-10)
        # the result is the input shifted by a lattice vector of the periodic axes
        m = np.linalg.solve(cell.T, (got - delta).T).T
        np.testing.assert_allclose(m, np.rint(m), atol=1e-9)
        assert np.all(np.rint(m)[:, [not p for p in pbc]] == 0)


def test_minimum_image_hexagonal_cell_beats_fractional_wrapping():
    # fcc(111)-like 60-degree cell: wrapping fractional coordinates alone (fairchem's min_diff)
    # leaves a longer vector than the true minimum image.
    cell = np.array([[3.0, 0.0, 0.0], [1.5, 2.598076211353316, 0.0], [0.0, 0.0, 20.0]])
    delta = np.array([[1.45, -1.299, 0.0]])  # frac (0.7833, -0.5) -> wrapped stays long
    got = minimum_image_displacement(torch.from_numpy(delta), torch.from_numpy(cell)).numpy()
    want = _brute_min_image(delta[0], cell, (True, True, True))
    assert np.linalg.norm(got) == pytest.approx(np.linalg.norm(want), abs=1e-12)
    frac = np.linalg.solve(cell.T, delta.T).T
    frac -= np.rint(frac)
    assert np.linalg.norm(frac @ cell) > np.linalg.norm(want) + 0.1


def test_minimum_image_non_periodic_rows_unchanged():
    delta = torch.tensor([[5.0, 0.0, 0.0], [5.0, 0.0, 0.0]], dtype=torch.float64)
    cell = torch.stack([torch.eye(3, dtype=torch.float64) * 4, torch.zeros(3, 3, dtype=torch.float64)])
    out = minimum_image_displacement(delta, cell, torch.tensor([[True, True, True], [False, False, False]]))
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, 0.0], [5.0, 0.0, 0.0]], dtype=torch.float64))


def test_adwt_by_hand():
    t = adwt_thresholds()
    assert len(t) == 490 and float(t[0]) == pytest.approx(0.01) and float(t[-1]) == pytest.approx(0.499)
    cell = torch.eye(3, dtype=torch.float64).expand(2, 3, 3) * 10.0
    target = torch.zeros(5, 3, dtype=torch.float64)
    pred = target.clone()
    # structure 0 (3 atoms, last fixed): distances 0.1 and 0.3 (free), 5.0 on the fixed atom.
    pred[0, 0], pred[1, 1], pred[2, 2] = 0.1, 0.3105, 5.0
    # structure 1 (2 atoms): one atom moved by 9.9455 = -0.0545 under the minimum image, one by 0.
    pred[3, 0] = 9.9455
    fixed = torch.tensor([0, 0, 1, 0, 0])
    m = adwt_metrics_from_totals(adwt_totals(pred, target, cell, torch.tensor([3, 2]), fixed=fixed))
    d = np.array([0.20525, 0.02725])  # per-structure mean distances
    want = np.mean([(d < th).mean() for th in np.arange(0.01, 0.5, 0.001)])
    assert m["average_distance_within_threshold"] == pytest.approx(want, rel=1e-12)
    assert m["mean_distance"] == pytest.approx(d.mean(), rel=1e-9) and m["n"] == 2
    # Hand count: structure 0 passes the thresholds 0.206..0.499 (294), structure 1 0.028..0.499 (472).
    assert m["average_distance_within_threshold"] == pytest.approx((294 + 472) / 980, rel=1e-12)
    # Smaller custom thresholds; no periodicity means the 9.9455 A move counts in full.
    m = adwt_metrics_from_totals(adwt_totals(pred, target, cell, torch.tensor([3, 2]), fixed=fixed, pbc=False,
                                             thresholds=torch.tensor([0.25, 5.0])))
    assert m["average_distance_within_threshold"] == pytest.approx(0.5 * (1 + 0) / 2 + 0.5 * (1 + 1) / 2)


def test_adwt_totals_reduce_over_batches_and_bad_input():
    g = torch.Generator().manual_seed(3)
    natoms = torch.tensor([3, 4, 2, 5])
    n = int(natoms.sum())
    target = torch.rand(n, 3, generator=g, dtype=torch.float64) * 8
    pred = target + 0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    cell = torch.eye(3, dtype=torch.float64).repeat(4, 1, 1) * 8
    whole = adwt_metrics_from_totals(adwt_totals(pred, target, cell, natoms))
    parts = adwt_totals(pred[:7], target[:7], cell[:2], natoms[:2]) + adwt_totals(pred[7:], target[7:], cell[2:], natoms[2:])
    assert adwt_metrics_from_totals(parts) == pytest.approx(whole, rel=1e-12)
    with pytest.raises(ValueError, match="cell has"):
        adwt_totals(pred, target, cell[:3], natoms)
    with pytest.raises(ValueError, match="N = 0"):
        adwt_metrics_from_totals(torch.zeros(4, dtype=torch.float64))


def test_average_and_table_with_forces_positions_and_nested_baselines():
    def entry(e, f, cos, efwt, adwt, n, base_e, base_f):
        return {"energy_mae": e, "energy_mse": e * e, "energy_within_threshold": 0.5, "forces_mae": f,
                "forces_mse": f * f, "forces_cos": cos, "energy_forces_within_threshold": efwt,
                "average_distance_within_threshold": adwt, "mean_distance": 0.1, "n": n, "n_atoms": 3 * n,
                "baselines": {"mean_energy_zero_forces": {"energy_mae": base_e, "forces_mae": base_f},
                              "train_mean": base_e}}

    metrics = {"a": entry(0.1, 0.05, 0.9, 0.2, 0.4, 10, 2.0, 0.5), "b": entry(0.3, 0.15, 0.5, 0.0, 0.6, 30, 1.0, 0.3)}
    avg = average_entry(metrics)
    assert avg["forces_mae"] == pytest.approx(0.1) and avg["forces_cos"] == pytest.approx(0.7)
    assert avg["energy_forces_within_threshold"] == pytest.approx(0.1)
    assert avg["average_distance_within_threshold"] == pytest.approx(0.5)
    assert avg["n"] == 40 and avg["n_atoms"] == 120
    assert avg["baselines"]["mean_energy_zero_forces"] == pytest.approx({"energy_mae": 1.5, "forces_mae": 0.4})
    assert avg["baselines"]["train_mean"] == pytest.approx(1.5)
    lines = format_table({**metrics, "average": avg}).splitlines()
    head = lines[0]
    for col in ("EwT", "F MAE", "F cos", "EFwT", "ADwT", "mean_energy_zero_forces MAE (E / F)", "train_mean MAE"):
        assert col in head
    assert lines[2].split()[:10] == ["a", "10", "0.1000", "0.0100", "50.00%", "0.0500", "0.9000", "20.00%",
                                     "40.00%", "0.1000"]
    assert "2.0000 / 0.5000" in lines[2]
    # Energy-only entries keep the IS2RE table exactly (no force / ADwT columns).
    plain = {"x": {"energy_mae": 0.1, "energy_mse": 0.02, "energy_within_threshold": 0.5, "n": 3}}
    assert format_table(plain).splitlines()[0].split() == ["split", "n", "MAE", "MSE", "EwT"]
