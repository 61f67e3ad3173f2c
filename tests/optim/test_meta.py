"""Meta-training: typed recipes, exact resume, atomic checkpoints, the CLI."""

import dataclasses
import glob
import json
from pathlib import Path

import pytest
import torch

from flt_mol.optim.meta import MetaTrainConfig, config_from_dict, load_config, load_rule, meta_train

RECIPES = sorted(glob.glob(str(Path(__file__).resolve().parents[2] / "recipes" / "optim_*.yaml")))


def _tiny(kind="coordinate", memory="lstm", rpe=None, **kw):
    data = {
        "kind": kind,
        "optimizer": {"memory": {"kind": memory, "rpe": rpe, "hidden_dim": 8, "ffn_dim": 16, "window": 4}},
        "swarm": {"dim": 2, "population": 4, "mode": "performer" if memory == "performer" else "flt",
                  "rpe": None if memory == "performer" else "gaussian_basis", "hidden_dim": 8, "ffn_dim": 16},
        "tasks": {"dims": [2, 4], "mlp_hidden": 4},
        "meta_iterations": 4,
        "unroll_length": 3,
        "horizon": 6,
        "parallel_tasks": 2,
        "checkpoint_every": 2,
        "log_every": 1,
    }
    data.update(kw)
    return config_from_dict(MetaTrainConfig, data)


def test_recipes_load_and_build():
    assert len(RECIPES) >= 6
    for path in RECIPES:
        config = load_config(path)
        assert config.meta_iterations > 0, path


def test_overrides_and_unknown_keys(tmp_path):
    config = load_config(RECIPES[0], ["meta_iterations=7", "optimizer.memory.window=5"])
    assert config.meta_iterations == 7 and config.optimizer.memory.window == 5
    with pytest.raises(ValueError, match="unknown key"):
        load_config(RECIPES[0], ["optimizer.memory.windw=5"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(RECIPES[0], ["meta_iterations"])
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="horizon"):
        _tiny(horizon=2)
    with pytest.raises(ValueError, match="kind"):
        _tiny(kind="population")
    with pytest.raises(ValueError, match="swarm_meta_loss"):
        _tiny(kind="swarm", swarm_meta_loss="median")


class _Crash(Exception):
    pass


def test_meta_training_resumes_exactly(tmp_path, monkeypatch):
    import flt_mol.optim.meta as meta

    config = _tiny()
    straight = meta_train(config, tmp_path / "a")
    assert straight["skipped"] == 0
    assert not list((tmp_path / "a").glob("*.tmp"))  # atomic writes leave no temp files
    rows = (tmp_path / "a" / "meta_log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("iteration") and len(rows) == 5

    original = meta.save_atomic

    def crash_after_first_checkpoint(obj, path):
        original(obj, path)
        raise _Crash  # the process dies right after the checkpoint of iteration 2

    monkeypatch.setattr(meta, "save_atomic", crash_after_first_checkpoint)
    with pytest.raises(_Crash):
        meta_train(config, tmp_path / "b")
    monkeypatch.setattr(meta, "save_atomic", original)
    resumed = meta_train(config, tmp_path / "b")
    assert resumed["resumed_from"] == 2
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    for key in a["rule"]:
        assert torch.equal(a["rule"][key], b["rule"][key]), key
    for wa, wb in zip(a["workers"], b["workers"]):
        assert wa["seed"] == wb["seed"] and torch.equal(wa["params"], wb["params"])


def test_resume_refuses_a_different_config(tmp_path):
    meta_train(_tiny(meta_iterations=2), tmp_path)
    with pytest.raises(ValueError, match="different config"):
        meta_train(_tiny(meta_iterations=2, meta_lr=0.5), tmp_path)


def test_swarm_meta_training_and_load_rule(tmp_path):
    config = _tiny(kind="swarm", memory="performer", meta_iterations=2)
    summary = meta_train(config, tmp_path)
    rule, loaded = load_rule(tmp_path / "checkpoint.pt")
    assert loaded == config and not rule.training
    assert summary["final_meta_loss"] == summary["final_meta_loss"]  # finite, not NaN


def test_cli_meta_train_and_evaluate(tmp_path):
    from flt_mol.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(dataclasses.asdict(_tiny(meta_iterations=2))))  # JSON is YAML
    out = tmp_path / "run"
    assert main(["optim", "meta-train", str(recipe), "log_every=1", "--out", str(out)]) == 0
    assert (out / "checkpoint.pt").is_file() and (out / "summary.json").is_file()
    ev = tmp_path / "eval"
    assert main(["optim", "evaluate", "--checkpoint", f"lstm={out / 'checkpoint.pt'}", "--out", str(ev),
                 "--dims", "2", "--num-functions", "2", "--tune-functions", "1", "--steps", "5",
                 "--digits-steps", "0", "--adam-lrs", "0.01", "0.1"]) == 0
    results = json.loads((ev / "results.json").read_text())
    assert set(results["rastrigin"]["2"]["methods"]) == {"adam (lr=0.1)", "lstm"} or \
        set(results["rastrigin"]["2"]["methods"]) == {"adam (lr=0.01)", "lstm"}
    assert (ev / "rastrigin_d2.png").is_file()
    with pytest.raises(FileNotFoundError):
        load_rule(tmp_path / "nope.pt")


def test_swarm_best_member_meta_loss_is_the_log_min_ratio():
    from flt_mol.optim.meta import _new_worker, _task_for, build_rule, unroll

    config = _tiny(kind="swarm", swarm_meta_loss="best")
    rule = build_rule(config)
    worker = _new_worker(config, rule, 7)
    task = _task_for(config, 7)
    with torch.no_grad():
        l0 = float(task.loss(worker["params"], 0).min())
    assert worker["initial_loss"] == pytest.approx(l0)
    meta_loss, new_worker, seen = unroll(rule, task, worker, 2, kind="swarm", loss_eps=config.loss_eps,
                                         swarm_meta_loss="best")
    # reference: the mean over the two steps of log(min_k f_k(x_t) / min_k f_k(x_0) + eps)
    expected = sum(torch.log(torch.tensor(s / l0) + config.loss_eps) for s in seen) / 2
    assert float(meta_loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    meta_loss.backward()
    assert all(p.grad is not None for p in rule.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="swarm_meta_loss"):
        unroll(rule, task, new_worker, 1, kind="swarm", loss_eps=1e-6, swarm_meta_loss="median")
