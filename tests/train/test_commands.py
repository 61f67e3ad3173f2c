"""flt-mol train / evaluate / predict from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from flt_mol.cli import main


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    from tests.train.conftest import tiny_raw_config

    root = tmp_path_factory.mktemp("cli")
    raw = tiny_raw_config(tiny_data, steps=2, eval_interval=2, ckpt_interval=2)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--out", str(root / "run"), "optim.lr=1e-3", "run.log_interval=1"]) == 0
    return root / "run"


def test_evaluate_writes_metrics_and_plot(trained, tiny_data, tmp_path, capsys):
    out, plot = tmp_path / "m.json", tmp_path / "parity.png"
    assert main(["evaluate", str(trained / "checkpoint.pt"), "--data", str(tiny_data["val"]), str(tiny_data["train"]),
                 "--split", "val", "train", "--out", str(out), "--plot", str(plot)]) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"val", "train", "average"}
    assert metrics["val"]["n"] == 8 and metrics["train"]["n"] == 24
    assert set(metrics["val"]["baselines"]) == {"train_mean", "per_adsorbate_mean", "composition_linear"}
    assert plot.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "MAE" in printed and "EwT" in printed and "composition_linear MAE" in printed
    # The training run's metrics.json holds the same numbers for its validation split.
    saved = json.loads((trained / "metrics.json").read_text())
    assert saved["val"]["energy_mae"] == pytest.approx(metrics["val"]["energy_mae"], rel=1e-6)


def test_split_without_targets_is_refused_but_predict_works(trained, tiny_data, tmp_path, capsys):
    code = main(["evaluate", str(trained / "checkpoint.pt"), "--data", str(tiny_data["test"]),
                 "--out", str(tmp_path / "m.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "'test'" in err and "no energy targets" in err and "flt-mol predict" in err
    assert not (tmp_path / "m.json").exists()

    out = tmp_path / "pred.npz"
    assert main(["predict", str(trained / "checkpoint.pt"), "--data", str(tiny_data["test"]), "--out", str(out)]) == 0
    pred = np.load(out)
    assert list(pred["ids"]) == [str(1000 + k) for k in range(6)]
    assert pred["energy"].shape == (6,) and np.isfinite(pred["energy"]).all()


def test_missing_files(trained, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nope.pt"), "--data", "x.lmdb", "--out", str(tmp_path / "m.json")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    assert main(["predict", str(trained / "checkpoint.pt"), "--data", str(tmp_path / "missing.lmdb"),
                 "--out", str(tmp_path / "p.npz")]) == 2
    assert "missing.lmdb" in capsys.readouterr().err


def test_invariance_report_on_a_trained_checkpoint(trained, tiny_data, tmp_path):
    """The invariance script runs on a checkpoint; with the cell frame the trained draw is exact."""
    from flt_mol.train import invariance

    out = tmp_path / "inv.json"
    assert invariance.main([str(trained / "checkpoint.pt"), "--data", str(tiny_data["val"]), "--draws", "3",
                            "--max-items", "4", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4 and res["draws"] == 3 and res["frame"] == "cell"
    assert res["trained_draw_rot_trans_change_eV"] < 1e-3
    assert res["trained_draw_mae_eV"] == pytest.approx(res["trained_draw_rotated_mae_eV"], abs=1e-3)
    assert res["feature_noise_std_eV"] > 0  # redraws change the prediction: the noise is real


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_empty_or_invalid_data_file_is_one_line(command, trained, tmp_path, capsys):
    empty, text = tmp_path / "empty.lmdb", tmp_path / "notes.txt"
    empty.write_bytes(b"")
    text.write_text("not an lmdb\n")
    out = tmp_path / ("m.json" if command == "evaluate" else "p.npz")
    for data, words in ((empty, ("empty.lmdb", "empty file")), (text, ("notes.txt", "LMDB"))):
        assert main([command, str(trained / "checkpoint.pt"), "--data", str(data), "--out", str(out)]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"flt-mol {command}: error: ")
        assert all(w in lines[0] for w in words), lines[0]
    assert not out.exists()


def test_training_logs_one_line_per_evaluation(tiny_data, tmp_path, capsys):
    from tests.train.conftest import tiny_raw_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_raw_config(tiny_data, steps=2, eval_interval=1, ckpt_interval=2)))
    assert main(["train", str(recipe), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    evaluations = [line for line in printed.splitlines() if line.startswith("validation at step")]
    assert len(evaluations) == 2 and all("val energy MAE (eV)" in line for line in evaluations)
    assert "EwT" not in printed  # the table is for `flt-mol evaluate`
