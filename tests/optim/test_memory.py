"""Memories: causality (no step sees the future), bounded window, window path vs causal attention."""

import pytest
import torch

from flt_mol.optim.learned import LearnedOptimizerConfig, LearnedUpdateRule, MemoryConfig, build_memory
from flt_mol.optim.memory import AttentionMemory, LSTMMemory

MEMORIES = [
    ("lstm", None),
    ("flt", "local"),
    ("flt", "gaussian_mixture"),
    ("performer", None),
    ("exact", "local"),
]


@pytest.mark.parametrize("kind,rpe", MEMORIES)
@pytest.mark.parametrize("window", [4, 16])
def test_memory_never_sees_future_steps(kind, rpe, window):
    memory = build_memory(MemoryConfig(kind=kind, rpe=rpe, hidden_dim=8, window=window, ffn_dim=16), 3)
    x = torch.randn(5, 10, 3)
    t = 6
    x2 = x.clone()
    x2[:, t:] += torch.randn(5, 10 - t, 3)
    y, y2 = memory(x), memory(x2)
    assert y.shape == (5, 10, 8)
    assert torch.equal(y[:, :t], y2[:, :t])  # bit-identical before t
    assert not torch.allclose(y[:, t], y2[:, t])  # and the change is seen at t (the test can fail)


@pytest.mark.parametrize("kind,rpe", MEMORIES)
def test_update_rule_is_causal_in_the_gradient_sequence(kind, rpe):
    rule = LearnedUpdateRule(LearnedOptimizerConfig(memory=MemoryConfig(kind=kind, rpe=rpe, hidden_dim=8, window=8)))

    def updates(grads):
        state = rule.initial_state(grads.shape[1])
        out = []
        for g in grads:
            u, state = rule(g, state)
            out.append(u)
        return torch.stack(out)

    grads = torch.randn(9, 4)
    grads2 = grads.clone()
    grads2[5] *= -3.0
    u, u2 = updates(grads), updates(grads2)
    assert torch.equal(u[:5], u2[:5])
    assert not torch.allclose(u[5], u2[5])


def test_window_bounds_context():
    """With window W, h_t depends on x_{t-W+1..t} only."""
    memory = AttentionMemory(3, 8, window=3, mode="flt", rpe="local", ffn_dim=16)
    x = torch.randn(2, 8, 3)
    x2 = x.clone()
    x2[:, 2] += 1.0
    y, y2 = memory(x), memory(x2)
    assert not torch.allclose(y[:, 4], y2[:, 4])  # step 2 is inside the window of step 4
    assert torch.equal(y[:, 5:], y2[:, 5:])  # and outside the windows of steps >= 5
    state = memory.initial_state(2)
    for s in range(8):
        _, state = memory.step(x[:, s], state)
    assert state["window"].shape == (2, 3, 3)


def test_windowed_steps_match_one_causal_pass_exact_mode():
    """Exact softmax with a shift-invariant RPE: stepping with relative positions (window >= T)
    equals one causal pass over the whole sequence, so the online path is causal attention."""
    memory = AttentionMemory(3, 8, window=16, mode="exact", rpe="gaussian_mixture", ffn_dim=16, num_layers=2)
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    memory = memory.double()
    stepped = memory(x)
    full = memory.encode(x)
    torch.testing.assert_close(stepped, full, rtol=1e-10, atol=1e-10)


def test_lstm_step_matches_sequence_lstm():
    memory = LSTMMemory(3, 8, num_layers=2)
    x = torch.randn(4, 6, 3)
    ref, _ = memory.lstm(x)
    torch.testing.assert_close(memory(x), ref, rtol=1e-5, atol=1e-6)


def test_memory_bad_input():
    memory = LSTMMemory(3, 8)
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        memory.step(torch.randn(4, 2), memory.initial_state(4))
    with pytest.raises(ValueError, match=r"\[N, T, 3\]"):
        memory(torch.randn(4, 3))
    with pytest.raises(ValueError, match="rpe=None"):
        AttentionMemory(3, 8, mode="performer", rpe="local")
    with pytest.raises(ValueError, match="needs rpe"):
        AttentionMemory(3, 8, mode="flt", rpe=None)
    with pytest.raises(ValueError, match="window"):
        AttentionMemory(3, 8, window=0)
    with pytest.raises(ValueError, match="divisible"):
        AttentionMemory(3, 9, num_heads=2)
