"""Learned update rule and the torch.optim wrapper."""

import copy
import math

import pytest
import torch
from torch import nn

from flt_mol.optim.learned import (
    LearnedOptimizer,
    LearnedOptimizerConfig,
    LearnedUpdateRule,
    MemoryConfig,
    preprocess_gradient,
)
from flt_mol.optim.meta import unroll
from flt_mol.optim.tasks import MLPRegressionTask, QuadraticTask

MEMORIES = [("lstm", None), ("flt", "local"), ("flt", "gaussian_mixture"), ("performer", None), ("exact", "local")]


def _rule(kind="flt", rpe="local", **kw):
    memory = MemoryConfig(kind=kind, rpe=rpe, hidden_dim=8, ffn_dim=16, window=8)
    return LearnedUpdateRule(LearnedOptimizerConfig(memory=memory, **kw))


def test_preprocess_gradient_matches_definition():
    p = 10.0
    g = torch.tensor([3.0, -0.5, 1e-6, -2e-5, 0.0])
    out = preprocess_gradient(g, p=p)
    big = g.abs() >= math.exp(-p)
    expected = torch.stack(
        [
            torch.where(big, torch.log(g.abs().clamp_min(1e-30)) / p, torch.tensor(-1.0)),
            torch.where(big, torch.sign(g), g * math.exp(p)),
        ],
        -1,
    )
    torch.testing.assert_close(out, expected)
    assert out[0, 1] == 1 and out[1, 1] == -1 and out[2, 0] == -1  # 1e-6 < exp(-10) ~ 4.5e-5: the small branch
    # gradients stay finite at g = 0 (the unused log branch must not leak NaN)
    g = torch.zeros(3, requires_grad=True)
    preprocess_gradient(g).sum().backward()
    assert torch.isfinite(g.grad).all()


@pytest.mark.parametrize(
    "kind,rpe,time_scales",
    [(kind, rpe, []) for kind, rpe in MEMORIES] + [("flt", "local", [10.0, 100.0])],
)
def test_meta_gradients_reach_every_parameter(kind, rpe, time_scales):
    rule = _rule(kind, rpe, time_scales=time_scales)
    task = MLPRegressionTask(in_dim=3, hidden=4, seed=1, batch_size=16)
    params = task.initial_params()
    worker = {"seed": 1, "step": 0, "params": params, "state": rule.initial_state(params.numel()),
              "initial_loss": float(task.loss(params, 0))}
    meta_loss, new_worker, _ = unroll(rule, task, worker, 4, kind="coordinate", loss_eps=1e-6)
    meta_loss.backward()
    for name, p in rule.named_parameters():
        assert p.grad is not None, f"{name} got no meta-gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got a zero meta-gradient"
    assert new_worker["step"] == 4 and not new_worker["params"].requires_grad


def _regression(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen)
    y = x @ torch.randn(5, 1, generator=gen) + 0.5
    return x, y


def test_state_dict_round_trip_continues_identically():
    rule = _rule("flt", "local")
    x, y = _regression()
    model = nn.Linear(5, 1)
    opt = LearnedOptimizer(model.parameters(), rule)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    train(model, opt, 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    train(model, opt, 5)  # continuing without a round trip

    model2 = nn.Linear(5, 1)
    model2.load_state_dict(saved_model)
    opt2 = LearnedOptimizer(model2.parameters(), rule)
    opt2.load_state_dict(saved_opt)
    state = opt2.state[model2.weight]
    assert state["memory"]["window"].shape == (5, 5, 3)  # 5 steps of history per coordinate
    train(model2, opt2, 5)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # and the history matters: a fresh optimiser from the same weights diverges
    model3 = nn.Linear(5, 1)
    model3.load_state_dict(saved_model)
    train(model3, LearnedOptimizer(model3.parameters(), rule), 5)
    assert not torch.equal(model3.weight, model.weight)


@pytest.mark.parametrize("kind,rpe", [("flt", "local"), ("lstm", None)])
def test_learned_optimizer_trains_regression_down(kind, rpe):
    """Known-good initialisation: the untrained rule is RMSprop plus a small learned term."""
    rule = _rule(kind, rpe, nominal_lr=0.05)
    x, y = _regression(1)
    model = nn.Linear(5, 1)
    opt = LearnedOptimizer(model.parameters(), rule)
    loss0 = nn.functional.mse_loss(model(x), y).item()
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.01 * loss0


def test_quadratic_task_is_solved_by_its_normal_equations():
    task = QuadraticTask(6, seed=2)
    x = torch.linalg.solve(task.matrix, task.target)
    assert task.loss(x, 0) < 1e-10
    assert task.loss(task.initial_params(), 0) > 1e-3


def test_invalid_configurations_raise():
    with pytest.raises(ValueError, match="kind"):
        MemoryConfig(kind="transformer")
    with pytest.raises(ValueError, match="takes no RPE"):
        MemoryConfig(kind="performer", rpe="local")
    with pytest.raises(ValueError, match="takes no RPE"):
        MemoryConfig(kind="lstm", rpe="gaussian_mixture")
    with pytest.raises(ValueError, match="needs rpe"):
        MemoryConfig(kind="flt", rpe=None)
    with pytest.raises(ValueError, match="window"):
        MemoryConfig(window=0)
    with pytest.raises(ValueError, match="rms_beta"):
        LearnedOptimizerConfig(rms_beta=1.0)
    with pytest.raises(ValueError, match="nominal_lr"):
        LearnedOptimizerConfig(nominal_lr=-1.0)
    with pytest.raises(TypeError, match="LearnedUpdateRule"):
        LearnedOptimizer([nn.Parameter(torch.zeros(2))], nn.Linear(2, 2))
    rule = _rule("lstm", None)
    with pytest.raises(ValueError, match="coordinates"):
        rule(torch.zeros(3), rule.initial_state(4))
    with pytest.raises(ValueError, match="flat"):
        rule(torch.zeros(3, 1), rule.initial_state(3))


def test_local_rpe_needs_integer_step_offsets():
    with pytest.raises(ValueError, match="position_scale"):
        MemoryConfig(kind="flt", rpe="local", position_scale=0.5)
    MemoryConfig(kind="flt", rpe="gaussian_mixture", position_scale=0.5)  # continuous positions are fine


def test_time_features_match_definition_and_validate():
    rule = _rule("lstm", None, time_scales=[10.0, 100.0])
    assert rule.num_features == 5 and rule.memory.input_dim == 5
    grad = torch.randn(4)
    feats = rule.features(grad, grad, torch.tensor(7.0))  # [4, 5]
    expected = torch.tensor([math.tanh(0.7), math.tanh(0.07)]).expand(4, 2)
    torch.testing.assert_close(feats[:, 3:], expected)
    torch.testing.assert_close(feats[:, :2], preprocess_gradient(grad))
    with pytest.raises(ValueError, match="pass step"):
        rule.features(grad, grad)
    # the rule feeds step t = 1, 2, ... to its memory: two steps give two different time features
    state = rule.initial_state(4)
    _, state = rule(grad, state)
    assert float(state["step"]) == 1.0
    with pytest.raises(ValueError, match="time_scales"):
        LearnedOptimizerConfig(time_scales=[10.0, 0.0])
