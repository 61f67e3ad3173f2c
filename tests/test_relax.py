"""``flt-mol relax`` / ``flt-mol md``: outputs, IS2RS metrics, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from flt_mol import cli
from flt_mol.cli import main
from flt_mol.data.oc20 import OC20LMDB


def test_relax_writes_structures_and_is2rs_metrics(s2ef_run, tmp_path, capsys):
    import ase.io

    out = tmp_path / "relaxed"
    argv = ["relax", str(s2ef_run["ckpt"]), "--data", str(s2ef_run["is2re"]), "--out", str(out),
            "--steps", "3", "--fmax", "1e-5", "--no-progress", "--compare-emt"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "IS2RS ADwT" in text and "relax-then-predict IS2RE" in text and "EMT's own minimum" in text
    ds = OC20LMDB(out / "relaxed.lmdb")
    src = OC20LMDB(s2ef_run["is2re"])
    assert len(ds) == len(src) == 3
    d, s = ds[0], src[0]
    assert d.force.shape == d.pos.shape and isinstance(d.y, float) and d.sid == s.sid
    fixed = s.fixed.bool()
    torch.testing.assert_close(d.pos[fixed], s.pos[fixed])  # fixed atoms never move
    assert float((d.pos - s.pos).abs().max()) > 0
    frames = ase.io.read(out / "relaxed.extxyz", index=":")
    assert len(frames) == 3 and frames[0].info["steps"] <= 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["adwt"]["average_distance_within_threshold"] <= 1
    assert metrics["relax_then_predict"]["n"] == 3 and metrics["energy_target"] == "y_adsorption"
    assert len(metrics["emt_minimum"]["per_structure"]) == 3 and metrics["emt_minimum"]["distance_to_emt_minimum"] > 0
    per = json.loads((out / "relaxations.json").read_text())
    assert [p["sid"] for p in per] == [int(src[i].sid) for i in range(3)]


def test_md_reports_the_drift(s2ef_run, tmp_path, capsys):
    out = tmp_path / "md.json"
    assert main(["md", str(s2ef_run["ckpt"]), "--data", str(s2ef_run["val"]), "--steps", "4",
                 "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["steps"] == 4 and "drift_ev_per_atom_per_ps" in report
    assert "eV/atom/ps" in capsys.readouterr().out


@pytest.fixture
def bad(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not structures\n")
    is2re = tmp_path / "is2re.pt"
    torch.save({"version": 1, "config": {"task": "is2re"}, "task": {}, "model": {}}, is2re)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {"text": str(text), "is2re": str(is2re), "missing": str(tmp_path / "nope.lmdb"), "file": str(a_file),
            "out": str(tmp_path / "out")}


BAD = [
    (["--fmax", "0"], {}, 2, ["--fmax", "> 0"]),
    (["--steps", "-1"], {}, 2, ["--steps"]),
    ([], {"data": "missing"}, 2, ["nope.lmdb"]),
    ([], {"data": "text"}, 1, ["notes.txt", "cannot read"]),
    ([], {"ckpt": "is2re"}, 1, ["S2EF checkpoint", "is2re.pt"]),
    ([], {"ckpt": "text"}, 1, ["not a flt_mol checkpoint", "notes.txt"]),
    ([], {"out": "file"}, 2, ["--out", "not a folder"]),
    (["--is2re-checkpoint", "{missing}"], {}, 2, ["--is2re-checkpoint", "nope.lmdb"]),
]


@pytest.mark.parametrize("extra, swap, code, words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_relax_refuses_bad_input_with_one_line(s2ef_run, bad, extra, swap, code, words, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    ckpt = bad[swap["ckpt"]] if "ckpt" in swap else str(s2ef_run["ckpt"])
    data = bad[swap["data"]] if "data" in swap else str(s2ef_run["is2re"])
    out = bad[swap["out"]] if "out" in swap else bad["out"]
    argv = ["relax", ckpt, "--data", data, "--out", out, "--no-progress", *[e.format(**bad) for e in extra]]
    assert main(argv) == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flt-mol relax: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
