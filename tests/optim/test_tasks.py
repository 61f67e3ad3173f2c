"""Task distribution: exact minima, determinism in (params, step), bad input."""

import math

import pytest
import torch

from flt_mol.optim.tasks import (
    DigitsMLPTask,
    MLPRegressionTask,
    RastriginTask,
    TaskDistributionConfig,
    rastrigin,
    sample_task,
)


def test_rastrigin_minimum_and_local_minima():
    task = RastriginTask(4, seed=0)
    assert task.loss(task.shift.clone(), 0) == 0
    x = torch.randn(100, 4) * 3
    assert (rastrigin(x, shift=task.shift, amplitude=task.amplitude) >= 0).all()
    # integer offsets from the shift are near-stationary points (local minima for a > 1/(2 pi^2))
    z = task.shift + torch.tensor([1.0, -2.0, 0.0, 3.0])
    z.requires_grad_(True)
    (g,) = torch.autograd.grad(task.loss(z, 0), z)
    expected = 2 * torch.tensor([1.0, -2.0, 0.0, 3.0]) / 4  # only the quadratic part remains
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-4)
    assert math.isclose(float(task.loss(z.detach(), 0)), (1 + 4 + 0 + 9) / 4, rel_tol=1e-5)


def test_minibatch_tasks_are_deterministic_in_step():
    task = MLPRegressionTask(seed=5)
    p = task.initial_params()
    assert task.loss(p, 3) == task.loss(p, 3)
    assert task.loss(p, 3) != task.loss(p, 4)
    assert p.numel() == task.num_params == 4 * 8 + 8 + 8 + 1


def test_digits_task():
    pytest.importorskip("sklearn", reason="scikit-learn provides the digits data")
    task = DigitsMLPTask(hidden=16, seed=0)
    p = task.initial_params()
    assert p.numel() == 64 * 16 + 16 + 16 * 10 + 10
    loss = task.loss(p, 0)
    assert 1.0 < float(loss) < 5.0  # about log(10) at init
    metrics = task.test_metrics(p)
    assert set(metrics) == {"test_loss", "test_accuracy"}


def test_sample_task_deterministic_and_covers_kinds():
    config = TaskDistributionConfig()
    names = {sample_task(config, s).name for s in range(30)}
    assert names == {"quadratic", "rastrigin", "mlp"}
    a, b = sample_task(config, 7), sample_task(config, 7)
    assert type(a) is type(b) and torch.equal(a.initial_params(), b.initial_params())


def test_task_bad_input():
    with pytest.raises(ValueError, match="unknown task"):
        TaskDistributionConfig(kinds=["rosenbrock"])
    with pytest.raises(ValueError, match="dims"):
        TaskDistributionConfig(dims=(5, 2))
    with pytest.raises(ValueError, match="dim"):
        RastriginTask(0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        MLPRegressionTask(seed=0, batch_size=1000, num_samples=10)
