"""Property-test helpers shared by the test suite.

* :func:`assert_unbiased`: a Monte-Carlo estimator's sample mean agrees with the exact value within
  a t-test on the sample standard error (Bonferroni-corrected over entries, tight ``alpha``), so
  the tolerance comes from the estimator's own variance, not from a loose constant;
* :func:`assert_invariant`: ``fn(*transform(*args)) == out_transform(fn(*args))`` within the
  dtype tolerance (rotation, translation, permutation, padding ...);
* :data:`TOLERANCES` / :func:`tolerance`: dtype -> ``(rtol, atol)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["TOLERANCES", "tolerance", "assert_unbiased", "assert_invariant", "z_critical"]

#: dtype -> (rtol, atol) for comparisons of computations that are equal in exact arithmetic.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype`` (see :data:`TOLERANCES`)."""
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype}; known: {list(TOLERANCES)}")
    return TOLERANCES[dtype]


def z_critical(alpha: float, num_tests: int = 1, dof: int | None = None) -> float:
    """Two-sided critical value at family-wise level ``alpha`` over ``num_tests`` (Bonferroni).

    Student-t with ``dof`` degrees of freedom when given, else normal.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    p = 1.0 - alpha / (2.0 * max(int(num_tests), 1))
    if dof is not None:
        from scipy import stats

        return float(stats.t.ppf(p, dof))
    return float(math.sqrt(2.0) * torch.erfinv(torch.tensor(2.0 * p - 1.0, dtype=torch.float64)))


def assert_unbiased(
    estimates: torch.Tensor | Callable[[], torch.Tensor],
    exact: torch.Tensor,
    *,
    num_samples: int | None = None,
    alpha: float = 1e-6,
    atol: float | None = None,
    msg: str = "",
) -> torch.Tensor:
    """Assert ``E[estimate] == exact`` entrywise, with tolerance from the sample variance.

    Args:
        estimates: a tensor ``[S, ...]`` of S independent estimates, or a callable returning one
            estimate ``[...]`` per call (then ``num_samples`` calls are made).
        exact: the exact value ``[...]``.
        num_samples: S when ``estimates`` is a callable.
        alpha: family-wise false-failure probability (Bonferroni over the entries).
        atol: floor added (in quadrature) to the standard error, for rounding error and
            deterministic entries; default from the dtype table.

    Returns the ``z``-scores ``(mean - exact)/se`` (fp64).
    Raises AssertionError naming the worst entry when any ``|z|`` exceeds the critical value.
    """
    if callable(estimates):
        if num_samples is None or num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 with a callable, got {num_samples}")
        samples = torch.stack([estimates().detach() for _ in range(num_samples)])
    else:
        samples = estimates.detach()
    if samples.shape[0] < 2 or tuple(samples.shape[1:]) != tuple(exact.shape):
        raise ValueError(
            f"estimates must be [S>=2, *exact.shape] = [S, {tuple(exact.shape)}], got {tuple(samples.shape)}"
        )
    S = samples.shape[0]
    floor = atol if atol is not None else tolerance(exact.dtype if exact.is_floating_point() else torch.float32)[1]
    x = samples.double()
    mean = x.mean(0)
    se = torch.sqrt(x.var(0, unbiased=True) / S + floor**2)
    z = (mean - exact.detach().double()) / se
    crit = z_critical(alpha, exact.numel(), dof=S - 1)
    worst = int(z.abs().argmax())
    if float(z.abs().flatten()[worst]) > crit:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), tuple(z.shape))) if z.dim() else ()
        raise AssertionError(
            f"{msg + ': ' if msg else ''}estimator biased at entry {idx}: mean "
            f"{float(mean.flatten()[worst]):.6g} vs exact {float(exact.flatten()[worst]):.6g}, "
            f"se {float(se.flatten()[worst]):.3g}, |z| = {float(z.abs().flatten()[worst]):.2f} > {crit:.2f} "
            f"(S = {S}, alpha = {alpha}, {exact.numel()} entries)"
        )
    return z


def assert_invariant(
    fn: Callable[..., torch.Tensor],
    transform: Callable[..., Sequence[Any]],
    *args: Any,
    out_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    msg: str = "",
) -> None:
    """Assert ``fn(*transform(*args)) == out_transform(fn(*args))`` (identity when None).

    Invariance: ``out_transform=None``; equivariance: e.g. permute the output like the input.
    Tolerances default to :func:`tolerance` of the output dtype.
    """
    ref = fn(*args)
    if out_transform is not None:
        ref = out_transform(ref)
    new_args = transform(*args)
    if not isinstance(new_args, (tuple, list)):
        new_args = (new_args,)
    got = fn(*new_args)
    if got.shape != ref.shape:
        raise AssertionError(f"{msg + ': ' if msg else ''}shape {tuple(got.shape)} != {tuple(ref.shape)}")
    r, a = tolerance(ref.dtype)
    rtol = rtol if rtol is not None else r
    atol = atol if atol is not None else a
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=lambda m: f"{msg + ': ' if msg else ''}{m}")
