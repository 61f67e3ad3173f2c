"""``flt-mol bench data`` runs end to end and reports consistent counts."""

import json

import pytest

from flt_mol.cli import main


def test_data_bench_writes_consistent_json(tmp_path, capsys):
    out = tmp_path / "data.json"
    args = ["bench", "data", "--num-structures", "12", "--batch-size", "5", "--repeats", "1", "--out", str(out)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    assert res["num_structures"] == 12 and res["batch_size"] == 5 and res["images"]
    # 4x4x3 slab + a 1-2 atom adsorbate; every token is an atom or one of its images.
    assert 49.0 <= res["mean_atoms"] <= 50.0
    assert res["mean_tokens"] == pytest.approx(res["mean_atoms"] + res["mean_images"]) and res["mean_images"] > 0
    assert res["structures_per_s"] > 0 and res["structures_per_cpu_s"] > 0
    assert "read+images+collate" in capsys.readouterr().out


def test_data_bench_without_images_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "data.json"
    assert main(["bench", "data", "--num-structures", "4", "--no-images", "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["mean_images"] == 0 and res["cutoff"] is None
    assert main(["bench", "data", "--num-structures", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
