"""ViT: shapes, batching without padding (a batch equals its items), fitting a tiny batch."""

from __future__ import annotations

import json

import pytest
import torch

from flt_mol.models.vit import ViTConfig, VisionTransformer, patch_grid
from flt_mol.train.config import ConfigError

VARIANTS = [
    ("flt", "gaussian_mixture", "learnable_relu"),
    ("flt", "local", "favor+"),
    ("performer", "none", "favor+"),
    ("cosformer", "none", "favor+"),
    ("exact", "gaussian_mixture", "favor+"),
]
IDS = [f"{a}-{r}-{k}" for a, r, k in VARIANTS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(attention: str, rpe: str, kernel: str) -> VisionTransformer:
    # 15 / 3 = a 5x5 grid: odd, so the grid's mean position (FLTAttention centres positions) stays
    # on the integer lattice the box RPE requires.
    cfg = ViTConfig(attention=attention, rpe=rpe, kernel=kernel, image_size=15, patch_size=3, num_classes=4,
                    num_layers=2, num_heads=2, dim=32, ffn_dim=64, num_kernel_features=16,
                    num_rpe_features=8, rpe_terms=5, dropout=0.0)
    return VisionTransformer(cfg)


def test_patch_grid_is_row_major_integer_grid():
    g = patch_grid(3)
    assert g.shape == (9, 2)
    assert g[5].tolist() == [1.0, 2.0]  # patch 5 = row 1, col 2
    assert torch.equal(g, g.round())


@pytest.mark.parametrize("attention,rpe,kernel", VARIANTS, ids=IDS)
def test_shapes_and_batch_equals_items(attention, rpe, kernel):
    model = tiny(attention, rpe, kernel).eval()
    images = torch.rand(3, 1, 15, 15)
    feats = model.forward_features(images)
    assert feats.shape == (3, 25, 32)
    logits = model.forward_head(feats)
    assert logits.shape == (3, 4) and torch.isfinite(logits).all()
    one_by_one = torch.cat([model(images[i : i + 1]) for i in range(3)])
    # Same computation per item; float32 rounding of O(1) logits through 2 layers < 1e-5.
    torch.testing.assert_close(logits, one_by_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention,rpe,kernel", VARIANTS, ids=IDS)
def test_overfits_a_tiny_batch(attention, rpe, kernel):
    model = tiny(attention, rpe, kernel)
    images = torch.rand(8, 1, 15, 15)
    labels = torch.arange(8) % 4
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert (model(images).argmax(-1) == labels).all()


def test_rpe_shared_and_pos_is_2d():
    model = tiny("flt", "gaussian_mixture", "learnable_relu")
    assert all(b.attention.rpe is model.rpe for b in model.blocks)
    assert model.rpe.dim == 2 and model.rpe.num_modes == 5


def test_bad_config_and_input():
    with pytest.raises(ConfigError, match="patch_size"):
        ViTConfig(image_size=28, patch_size=5).validate()
    with pytest.raises(ConfigError, match="attention"):
        ViTConfig(attention="loglinear").validate()
    with pytest.raises(ConfigError, match="rpe"):
        ViTConfig(attention="flt", rpe="none").validate()
    model = tiny("cosformer", "none", "favor+")
    with pytest.raises(ValueError, match="images must be"):
        model(torch.rand(2, 1, 12, 12))


def test_vit_task_trains_and_writes_accuracy(tmp_path):
    from flt_mol.train.config import config_from_dict
    from flt_mol.train.loop import train

    config = config_from_dict({
        "task": "vit",
        "data": {"train_per_class": 2, "val_per_class": 1, "batch_size": 4, "eval_batch_size": 8},
        "model": {"attention": "flt", "num_layers": 1, "num_heads": 2, "dim": 16, "ffn_dim": 32,
                  "num_kernel_features": 8, "num_rpe_features": 4, "rpe_terms": 3, "patch_size": 7},
        "optim": {"warmup_steps": 1},
        "run": {"steps": 2, "eval_interval": 0, "ckpt_interval": 0, "log_interval": 1, "progress": False,
                "device": "cpu"},
    })
    train(config, tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) == {"val"} and set(saved["val"]) >= {"loss", "accuracy"}
    assert saved["val"]["n"] == 10 and 0.0 <= saved["val"]["accuracy"] <= 1.0
