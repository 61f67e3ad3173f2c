"""The training loop: schedule, outputs, exact resume after a kill, displacement-weight schedule."""

from __future__ import annotations

import json

import pytest
import torch

from flt_mol.train.checkpoint import load_checkpoint
from flt_mol.train.config import ConfigError, apply_overrides, config_from_dict
from flt_mol.train.loop import StepBatchSampler, lr_factor, train
from flt_mol.train.tasks import displacement_weight


def test_lr_factor():
    f = lambda s: lr_factor(s, warmup_steps=4, total_steps=12, final_fraction=0.1)  # noqa: E731
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)
    assert f(8) == pytest.approx(1.0 - 0.9 * 0.5)
    assert f(12) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert lr_factor(0, warmup_steps=0, total_steps=10) == pytest.approx(1.0)


def test_displacement_weight_decays_15_to_1():
    w = [displacement_weight(s, total_steps=11, start=15.0, end=1.0) for s in range(1, 12)]
    assert w[0] == pytest.approx(15.0) and w[-1] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(w, w[1:]))


def test_step_batches_split_the_global_batch():
    """The union over ranks of each step's batches is the single-process batch."""
    one = list(StepBatchSampler(23, batch_size=4, rank=0, world_size=1, seed=3, start_step=0, total_steps=9))
    two = [list(StepBatchSampler(23, batch_size=2, rank=r, world_size=2, seed=3, start_step=0, total_steps=9))
           for r in range(2)]
    for s in range(9):
        assert sorted(one[s]) == sorted(two[0][s] + two[1][s])
    # Starting at step 4 continues the same sequence (what --resume relies on).
    tail = list(StepBatchSampler(23, batch_size=4, rank=0, world_size=1, seed=3, start_step=4, total_steps=9))
    assert tail == one[4:]
    # A new epoch reshuffles.
    assert sorted(sum(one[:5], [])) != sum(one[:5], [])


def test_train_writes_outputs(raw_config, tmp_path):
    config = config_from_dict(raw_config)
    metrics = train(config, tmp_path)
    for name in ("checkpoint.pt", "best.pt", "metrics.json", "log.csv", "log.json", "learning_curve.png"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert set(saved) == {"val"}
    entry = saved["val"]
    assert set(entry) == {"energy_mae", "energy_mse", "energy_within_threshold", "n", "baselines"}
    assert entry["n"] == 8 and set(entry["baselines"]) and metrics["val"]["energy_mae"] == entry["energy_mae"]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 6
    assert any(k.endswith("rpe_noise") for k in ckpt["model"])  # random features are saved
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def _params(path):
    return load_checkpoint(path)["model"]


def test_killed_and_resumed_equals_uninterrupted(tiny_data, tmp_path):
    """Stop at step 5 (last checkpoint at step 3, so steps 4-5 are lost as in a kill), resume:
    parameters, EMA and random features equal an uninterrupted run's."""
    from tests.train.conftest import tiny_raw_config

    raw = tiny_raw_config(tiny_data)
    raw["model"]["dropout"] = 0.1  # RNG state matters
    raw["optim"]["ema_decay"] = 0.9
    config = config_from_dict(raw)
    train(config, tmp_path / "full")
    assert train(config, tmp_path / "killed", stop_after=5) is None
    assert load_checkpoint(tmp_path / "killed" / "checkpoint.pt")["step"] == 3
    train(config, tmp_path / "killed", resume=True)
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "killed" / "checkpoint.pt")
    for section in ("model", "ema"):
        assert a[section].keys() == b[section].keys()
        for k in a[section]:
            assert torch.equal(a[section][k], b[section][k]), (section, k)
    assert json.loads((tmp_path / "full" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "killed" / "metrics.json").read_text())


def test_resume_refuses_another_config(raw_config, tmp_path):
    config = config_from_dict(raw_config)
    train(config, tmp_path, stop_after=4)
    other = config_from_dict(apply_overrides(raw_config, ["optim.lr=0.1"]))
    with pytest.raises(ConfigError, match="optim.lr"):
        train(other, tmp_path, resume=True)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        train(config, tmp_path / "empty", resume=True)
