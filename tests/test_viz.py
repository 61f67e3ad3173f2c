"""viz: the locality statistic on matrices with known answers; figures written by the commands."""

from __future__ import annotations

import json

import pytest
import torch

from flt_mol.viz import local_rpe_grid, locality_statistic


def causal_uniform(length: int) -> torch.Tensor:
    a = torch.ones(length, length).tril()
    return a / a.sum(-1, keepdim=True)


def test_uniform_attention_gives_the_fraction():
    # Rows with n visible keys put k/n of their mass on each set, k = round(n/10); rows with n a
    # multiple of 10 give exactly 0.1, the others deviate by < 0.05/n; the mean is within 0.01.
    near, far = locality_statistic(causal_uniform(100), causal=True)
    assert abs(float(near) - 0.1) < 0.01 and abs(float(far) - 0.1) < 0.01
    assert torch.isclose(near, far)  # the same k keys on both sides
    bi = torch.full((40, 40), 1 / 40)
    near, far = locality_statistic(bi, causal=False)
    assert torch.isclose(near, torch.tensor(0.1, dtype=torch.float64))
    assert torch.isclose(far, torch.tensor(0.1, dtype=torch.float64))


def test_diagonal_and_first_token_attention():
    eye = torch.eye(30)
    near, far = locality_statistic(eye, causal=True)
    assert near.item() == 1.0 and far.item() == 0.0
    first = torch.zeros(30, 30)
    first[:, 0] = 1.0  # every query looks at token 0: the farthest visible key
    near, far = locality_statistic(first, causal=True)
    assert near.item() == 0.0 and far.item() == 1.0


def test_batched_heads_and_bad_input():
    attn = torch.stack([torch.eye(20), causal_uniform(20)])
    near, far = locality_statistic(attn, causal=True)
    assert near.shape == (2,) and near[0] == 1.0 and far[0] == 0.0
    with pytest.raises(ValueError, match="square"):
        locality_statistic(torch.zeros(3, 4), causal=True)
    with pytest.raises(ValueError, match="too short"):
        locality_statistic(torch.eye(5), causal=True)
    with pytest.raises(ValueError, match="fraction"):
        locality_statistic(torch.eye(20), causal=True, fraction=0.9)


def test_local_rpe_grid_is_the_box_and_the_triangle_product():
    d1, d2, f = local_rpe_grid((3.0, 2.0), lattice=True, amplitude=2.0, extent=5)
    box = 2.0 * ((d1.abs() <= 3) & (d2.abs() <= 2)).float()
    torch.testing.assert_close(f, box, atol=1e-5, rtol=0)
    # Continuous order 2: the self-convolution of the box is a triangle of half-support 2v per
    # axis, so f = C (1 - |x|/(2 v1))_+ (1 - |y|/(2 v2))_+ (paper Fig. 4 right, up to scale).
    d1, d2, f = local_rpe_grid((3.0, 2.0), lattice=False, order=2, amplitude=1.0, extent=8, points=33)
    tri = (1 - d1.abs() / 6).clamp_min(0) * (1 - d2.abs() / 4).clamp_min(0)
    torch.testing.assert_close(f, tri, atol=1e-3, rtol=0)  # v carries softplus round-off ~1e-4
    with pytest.raises(ValueError, match="half_widths"):
        local_rpe_grid((3.0, -1.0), lattice=True)


def test_commands_write_figures(tmp_path):
    from flt_mol.cli import main
    from flt_mol.train.config import config_from_dict
    from flt_mol.train.loop import train

    assert main(["viz", "local-rpe", "--out", str(tmp_path / "rpe")]) == 0
    assert (tmp_path / "rpe" / "local_rpe_2d.png").stat().st_size > 1000

    torch.manual_seed(0)
    config = config_from_dict({
        "task": "lm",
        "data": {"block_size": 32, "batch_size": 2, "max_val_blocks": 1},
        "model": {"attention": "flt", "rpe": "local", "num_layers": 1, "num_heads": 2, "dim": 16,
                  "ffn_dim": 16, "num_kernel_features": 8, "num_rpe_features": 4, "max_len": 32},
        "run": {"steps": 1, "eval_interval": 0, "ckpt_interval": 0, "progress": False, "device": "cpu"},
    })
    train(config, tmp_path / "run")
    out = tmp_path / "maps"
    assert main(["viz", "attention-maps", str(tmp_path / "run" / "best.pt"), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["layer0_head0.png", "layer0_head1.png", "layer0_heads.png"]
    stats = json.loads((out / "layer0_locality.json").read_text())
    assert stats["length"] == 32 and len(stats["per_head"]) == 2
    assert 0.0 <= stats["far_10pct"] <= 1.0 and 0.0 <= stats["near_10pct"] <= 1.0
    assert main(["viz", "local-rpe", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "l")]) == 0
    assert list((tmp_path / "l").glob("rpe_*.png"))
