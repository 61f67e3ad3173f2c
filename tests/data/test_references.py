"""Element references and trivial baselines against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from flt_mol.data.references import (
    MAX_Z,
    ElementReferences,
    TrivialBaselines,
    adsorbate_key,
    composition_matrix,
    fit_element_references,
    targets,
)


def _system(slab: list[int], ads: list[int], y: float, sid: int = 0) -> Data:
    z = slab + ads
    n = len(z)
    tags = [0] * (len(slab) // 2) + [1] * (len(slab) - len(slab) // 2) + [2] * len(ads)
    g = torch.Generator().manual_seed(sid)
    return Data(
        pos=torch.rand(n, 3, generator=g) * 5, cell=torch.eye(3).view(1, 3, 3) * 10,
        atomic_numbers=torch.tensor(z, dtype=torch.float32), natoms=n,
        tags=torch.tensor(tags, dtype=torch.long), fixed=(torch.tensor(tags) == 0).float(),
        sid=sid, y_init=y + 1.0, y_relaxed=y, pos_relaxed=torch.rand(n, 3, generator=g) * 5,
    )


def _linear_set(seed: int = 0) -> tuple[list[Data], dict[int, float], float]:
    """Structures with random compositions over Cu, Pt, C, O and an exactly linear energy."""
    rng = np.random.default_rng(seed)
    coef = {29: -0.37, 78: 0.52, 6: -1.9, 8: 0.8}
    bias = 0.25
    items = []
    for i in range(30):
        n_cu, n_pt = rng.integers(1, 9, size=2)
        n_c, n_o = rng.integers(0, 3, size=2)
        slab = [29] * int(n_cu) + [78] * int(n_pt)
        ads = [6] * int(n_c) + [8] * int(n_o)
        y = n_cu * coef[29] + n_pt * coef[78] + n_c * coef[6] + n_o * coef[8] + bias
        items.append(_system(slab, ads, float(y), sid=i))
    return items, coef, bias


def test_composition_matrix_counts_every_atom():
    d = _system([29, 29, 78], [8, 1], 0.0)
    counts = composition_matrix([d])
    assert counts.shape == (1, MAX_Z + 1)
    expected = np.zeros(MAX_Z + 1)
    expected[[29, 78, 8, 1]] = [2, 1, 1, 1]
    np.testing.assert_array_equal(counts[0], expected)


def test_adsorbate_key_is_sorted_formula_of_tag2():
    assert adsorbate_key(_system([29, 29], [8, 1], 0.0)) == "H1O1"
    assert adsorbate_key(_system([78, 78], [6, 8, 1, 1, 1], 0.0)) == "C1H3O1"
    assert adsorbate_key(_system([78, 78], [], 0.0)) == ""


def test_exactly_linear_set_recovers_coefficients():
    items, coef, bias = _linear_set()
    ref = fit_element_references(items)
    # Full-rank design (independent counts + bias): the least-squares solution is exact up to
    # floating-point round-off of a well-conditioned 5-column solve.
    for z, c in coef.items():
        assert ref.coef[z] == pytest.approx(c, abs=1e-9)
    assert ref.bias == pytest.approx(bias, abs=1e-9)
    np.testing.assert_allclose(ref.predict(items), targets(items), atol=1e-9)
    assert set(np.flatnonzero(ref.seen)) == set(coef)


def test_references_refuse_unseen_elements_and_bad_shapes():
    items, _, _ = _linear_set()
    ref = fit_element_references(items)
    with pytest.raises(ValueError, match="Au"):
        ref.predict([_system([79, 79], [8], 0.0)])
    au = np.zeros((1, MAX_Z + 1))
    au[0, 79] = 2
    assert ref.predict_counts(au, unseen="zero")[0] == pytest.approx(ref.bias)
    with pytest.raises(ValueError, match="unseen"):
        ref.predict_counts(au, unseen="ignore")
    with pytest.raises(ValueError, match="counts must have shape"):
        ref.predict_counts(np.zeros((2, 5)))


def test_references_round_trip_dict():
    items, _, _ = _linear_set(1)
    ref = fit_element_references(items)
    back = ElementReferences.from_dict(ref.to_dict())
    np.testing.assert_array_equal(back.coef, ref.coef)
    np.testing.assert_array_equal(back.seen, ref.seen)
    assert back.bias == ref.bias


def test_trivial_baselines_by_hand():
    train = [
        _system([29] * 4, [8], -4.0, 0), _system([29] * 4, [8], -5.0, 1),
        _system([78] * 4, [8, 1], -2.0, 2), _system([78] * 4, [1], -3.0, 3),
    ]
    tb = TrivialBaselines.fit(train)
    assert tb.mean == pytest.approx(-3.5)
    assert tb.per_adsorbate == pytest.approx({"O1": -4.5, "H1O1": -2.0, "H1": -3.0})
    test = [_system([29] * 4, [8], -4.0, 4), _system([29] * 4, [8, 8], -1.0, 5)]  # O2 unseen
    pred = tb.predict(test)
    np.testing.assert_allclose(pred["train_mean"], [-3.5, -3.5])
    np.testing.assert_allclose(pred["per_adsorbate_mean"], [-4.5, -3.5])
    maes = tb.evaluate([test[0]])
    assert maes["train_mean"] == pytest.approx(0.5)
    assert maes["per_adsorbate_mean"] == pytest.approx(0.5)
    # The composition fit on 4 points: Cu4O twice (mean -4.5), Pt4OH, Pt4H are fitted exactly
    # (3 distinct compositions, enough free parameters), so Cu4O is predicted as -4.5.
    assert maes["composition_linear"] == pytest.approx(0.5, abs=1e-9)
    back = TrivialBaselines.from_dict(tb.to_dict())
    assert back.evaluate([test[0]]) == pytest.approx(maes)


def test_targets_missing_field_names_item():
    d = _system([29], [8], 0.0)
    del d.y_relaxed
    with pytest.raises(ValueError, match="item 1 has no field 'y_relaxed'"):
        targets([_system([29], [8], 0.0), d])


def test_fit_on_oc20_lmdb_equals_fit_on_list(tmp_path):
    from flt_mol.data.oc20 import OC20LMDB, write_lmdb

    items, _, _ = _linear_set(2)
    path = tmp_path / "x.lmdb"
    write_lmdb(items, path)
    ds = OC20LMDB(path)
    a, b = TrivialBaselines.fit(ds), TrivialBaselines.fit(items)
    assert a.mean == pytest.approx(b.mean, abs=1e-12)
    assert a.per_adsorbate == pytest.approx(b.per_adsorbate, abs=1e-12)
    np.testing.assert_allclose(fit_element_references(ds).coef, b.references.coef, atol=1e-9)


def _site(d: Data, facet: int, site: int) -> Data:
    d.facet, d.site_type = facet, site
    return d


def test_per_adsorbate_facet_site_mean_by_hand_and_fallbacks():
    train = [
        _site(_system([29] * 4, [8], -4.0, 0), 0, 2), _site(_system([29] * 4, [8], -5.0, 1), 0, 2),
        _site(_system([29] * 4, [8], -3.0, 2), 1, 0), _site(_system([78] * 4, [1], -2.0, 3), 0, 0),
    ]
    tb = TrivialBaselines.fit(train)
    assert tb.per_site == pytest.approx({"O1|facet=0|site=2": -4.5, "O1|facet=1|site=0": -3.0,
                                         "H1|facet=0|site=0": -2.0})
    test = [
        _site(_system([29] * 4, [8], -4.0, 4), 0, 2),   # seen key -> -4.5
        _site(_system([29] * 4, [8], -4.0, 5), 2, 1),   # unseen key, seen adsorbate -> O1 mean -4.0
        _site(_system([29] * 4, [8, 8], -1.0, 6), 0, 2),  # unseen adsorbate -> train mean -3.5
    ]
    pred = tb.predict(test)
    np.testing.assert_allclose(pred["per_adsorbate_facet_site_mean"], [-4.5, -4.0, -3.5])
    maes = tb.evaluate(test)
    assert maes["per_adsorbate_facet_site_mean"] == pytest.approx((0.5 + 0.0 + 2.5) / 3)
    back = TrivialBaselines.from_dict(tb.to_dict())
    assert back.evaluate(test) == pytest.approx(maes)


def test_site_baseline_needs_facet_and_site_fields():
    plain = [_system([29] * 4, [8], -4.0, 0), _system([78] * 4, [1], -2.0, 1)]
    tb = TrivialBaselines.fit(plain)
    assert tb.per_site is None and "per_site" not in tb.to_dict()
    assert "per_adsorbate_facet_site_mean" not in tb.evaluate(plain)
    # A dict from before the per-site table existed loads; so does scoring items with the
    # fields under a fit without them, and vice versa: the baseline is simply not reported.
    old = {k: v for k, v in tb.to_dict().items()}
    assert TrivialBaselines.from_dict(old).per_site is None
    with_fields = [_site(_system([29] * 4, [8], -4.0, 2), 0, 0)]
    assert set(tb.evaluate(with_fields)) == {"train_mean", "per_adsorbate_mean", "composition_linear"}
    fitted = TrivialBaselines.fit(with_fields)
    assert "per_adsorbate_facet_site_mean" not in fitted.evaluate(plain)


def test_s2ef_baselines_by_hand():
    from flt_mol.data.references import S2EFBaselines

    def frame(slab, ads, y, force, sid):
        d = _system(slab, ads, 0.0, sid)
        d.y = y
        d.force = torch.tensor(force, dtype=torch.float32)
        return d

    # 2 slab atoms (first fixed: tags 0, 1) + 1 adsorbate atom per frame
    f_a = [[9.0, 9.0, 9.0], [0.01, 0.0, -0.02], [0.0, 0.0, 0.0]]  # free components all < 0.03
    f_b = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, -2.0, 0.0]]
    train = [frame([29, 29], [8], -1.0, f_a, 0), frame([29, 29], [8], -3.0, f_b, 1)]
    fit = S2EFBaselines.fit(train)
    assert fit.mean == pytest.approx(-2.0)
    m = fit.evaluate(train)
    assert set(m) == {"train_mean_zero_forces", "composition_linear_zero_forces"}
    zero = m["train_mean_zero_forces"]
    assert zero["energy_mae"] == pytest.approx(1.0)
    # free atoms only (the 9 eV/A on the fixed atom is ignored): (0.01 + 0.02 + 1 + 2) / 12
    assert zero["forces_mae"] == pytest.approx(3.03 / 12, rel=1e-6)
    assert zero["forces_cos"] == 0.0
    assert zero["energy_forces_within_threshold"] == 0.0  # energies are 1 eV off
    # An exact energy with zero forces passes EFwT on the frame whose free forces are tiny.
    exact = S2EFBaselines(mean=-1.0, references=fit.references)
    assert exact.evaluate(train)["train_mean_zero_forces"]["energy_forces_within_threshold"] == 0.5
    back = S2EFBaselines.from_dict(fit.to_dict())
    again = back.evaluate(train)
    for name in m:
        assert again[name] == pytest.approx(m[name])
    del train[1].force
    with pytest.raises(ValueError, match="item 1 has no field 'force'"):
        fit.evaluate(train)
