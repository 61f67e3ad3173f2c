"""flt_mol.testing: the helpers must pass on true properties and fail on false ones."""

import pytest
import torch

from flt_mol.testing import TOLERANCES, assert_invariant, assert_unbiased, tolerance, z_critical


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_assert_unbiased_accepts_unbiased_samples():
    exact = torch.linspace(-1, 1, 20)
    samples = exact + torch.randn(500, 20)
    z = assert_unbiased(samples, exact)
    assert z.shape == exact.shape


def test_assert_unbiased_rejects_a_bias_of_a_few_standard_errors():
    exact = torch.zeros(20)
    # mean shifted by 0.5 with se = 1/sqrt(500) ~ 0.045: about 11 standard errors.
    samples = 0.5 + torch.randn(500, 20)
    with pytest.raises(AssertionError, match="biased"):
        assert_unbiased(samples, exact)


def test_assert_unbiased_callable_and_bad_input():
    exact = torch.ones(3)
    assert_unbiased(lambda: exact + 0.1 * torch.randn(3), exact, num_samples=50)
    with pytest.raises(ValueError, match="num_samples"):
        assert_unbiased(lambda: exact, exact)
    with pytest.raises(ValueError, match="estimates must be"):
        assert_unbiased(torch.zeros(10, 4), exact)


def test_deterministic_entries_use_the_floor():
    exact = torch.ones(4)
    assert_unbiased(torch.ones(10, 4), exact)
    with pytest.raises(AssertionError):
        assert_unbiased(torch.ones(10, 4) + 1e-2, exact)


def test_z_critical_matches_normal_and_bonferroni():
    assert abs(z_critical(0.05) - 1.959964) < 1e-5
    assert z_critical(0.05, num_tests=100) > z_critical(0.05)
    assert z_critical(0.05, dof=5) > z_critical(0.05)
    with pytest.raises(ValueError):
        z_critical(1.5)


def test_assert_invariant():
    x = torch.randn(5, 3)
    norm = lambda v: v.norm(dim=-1)  # noqa: E731
    q, _ = torch.linalg.qr(torch.randn(3, 3))
    assert_invariant(norm, lambda v: (v @ q.T,), x)
    with pytest.raises(AssertionError):
        assert_invariant(norm, lambda v: (2 * v,), x)
    perm = torch.randperm(5)
    assert_invariant(norm, lambda v: (v[perm],), x, out_transform=lambda y: y[perm])


def test_tolerance_table():
    assert set(TOLERANCES) >= {torch.float32, torch.float64, torch.bfloat16}
    assert tolerance(torch.float64)[0] < tolerance(torch.float32)[0] < tolerance(torch.bfloat16)[0]
    with pytest.raises(ValueError, match="no tolerance"):
        tolerance(torch.int64)
