"""Tiny runs of the benchmarks: JSON schema, null rows with a reason, CLI wiring (no timing checks)."""

import argparse
import json
import math

import pytest
import torch

from flt_mol.bench import attention as bench_attention
from flt_mol.bench import commands
from flt_mol.bench import rpe as bench_rpe
from flt_mol.cli import main

KEYS = {"method", "length", "batch", "forward_s", "peak_mem_mb"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _attention_args(tmp_path, **over):
    parser = argparse.ArgumentParser()
    bench_attention.add_arguments(parser)
    argv = [
        "--lengths", "16", "--batch", "1", "--methods", "flt", "exact", "--repeats", "1",
        "--embed-dim", "8", "--heads", "2", "--ffn-dim", "16", "--num-kernel-features", "4",
        "--num-rpe-features", "2", "--num-kernels", "2", "--out", str(tmp_path / "a.json"),
    ]
    args = parser.parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


def test_attention_rows_schema_and_budget_skip(tmp_path, monkeypatch):
    # An exact-method estimate above the budget: its row is skipped with a reason.
    assert bench_attention.estimate_exact_bytes(2, 12, 4096) > bench_attention.estimate_exact_bytes(2, 12, 2048)
    monkeypatch.setattr(bench_attention, "estimate_exact_bytes", lambda b, h, L: 2**50)
    args = _attention_args(tmp_path, lengths=[16], mem_budget_gb=1.0)
    rows = bench_attention.run_rows(args, log=lambda *_: None)
    assert [(r["method"], r["length"]) for r in rows] == [("flt", 16), ("exact", 16)]
    for r in rows:
        assert KEYS <= set(r)
        assert r["batch"] == 1
    ran, skipped = rows
    assert ran["forward_s"] > 0 and ran["peak_mem_mb"] >= 0 and "reason" not in ran
    assert skipped["forward_s"] is None and skipped["peak_mem_mb"] is None
    assert "mem-budget-gb" in skipped["reason"]
    table = bench_attention.ratio_table(rows + [dict(ran, method="performer")])
    assert len(table) == 2 and "exact/flt" in table[0] and "1.00" in table[1]
    slower = dict(ran, method="loglinear", forward_s=3 * ran["forward_s"])
    table = bench_attention.ratio_table(rows + [slower])
    assert "loglin/flt t" in table[0] and table[1].split()[-2] == "3.00"


def test_unavailable_method_gets_a_null_row(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_attention, "_check_methods_importable", lambda methods: {"cosformer": "not built"})
    args = _attention_args(tmp_path, methods=["cosformer"])
    rows = bench_attention.run_rows(args, log=lambda *_: None)
    assert rows == [{"method": "cosformer", "length": 16, "batch": 1, "forward_s": None, "peak_mem_mb": None, "reason": "not built"}]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--batch"):
        bench_attention.run_rows(_attention_args(tmp_path, batch=0), log=lambda *_: None)
    with pytest.raises(ValueError, match="divisible"):
        bench_attention.run_rows(_attention_args(tmp_path, heads=3), log=lambda *_: None)


def test_cli_attention_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    code = main([
        "bench", "attention", "--lengths", "8", "--batch", "1", "--methods", "performer", "--repeats", "1",
        "--embed-dim", "8", "--heads", "2", "--ffn-dim", "8", "--num-kernel-features", "4",
        "--num-kernels", "1", "--out", str(out), "--plot", str(png),
    ])
    assert code == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and KEYS <= set(rows[0]) and rows[0]["forward_s"] > 0
    assert png.stat().st_size > 0
    assert "flt/perf" in capsys.readouterr().out


def test_rpe_bench_rows_and_plot(tmp_path):
    parser = argparse.ArgumentParser()
    bench_rpe.add_arguments(parser)
    args = parser.parse_args([
        "--lengths", "8", "20", "--features", "2", "8", "--draws", "1", "--block", "7",
        "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png"),
    ])
    assert bench_rpe.run(args) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert {r["family"] for r in rows} == set(bench_rpe.FAMILIES)
    assert len(rows) == len(bench_rpe.FAMILIES) * 2 * 2
    for r in rows:
        assert {"family", "length", "features", "max_error", "c", "bound", "mean_a2"} <= set(r)
        assert r["max_error"] >= 0 and math.isfinite(r["c"]) and r["bound"] > 0
    assert (tmp_path / "r.png").stat().st_size > 0


def test_rpe_max_error_blocks_match_dense():
    from flt_mol.attention import GaussianBasisRPE

    rpe = GaussianBasisRPE(2, 2, 3)
    pos = torch.randn(1, 13, 3)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    blocked = bench_rpe.max_error(rpe, pos, 4, g1, block=5)
    with torch.no_grad():
        dense = float((rpe.estimate_mask(pos, 4, g2) - rpe.exact_mask(pos)).abs().max())
    assert blocked == pytest.approx(dense, rel=1e-5)
    assert bench_rpe.theorem_bound(math.inf, 10, 1, 4, 0.05) == math.inf


def _subcommands(parser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = sub.choices["bench"]
    return set(next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction)).choices)


def test_every_bench_subcommand_is_registered():
    parser = argparse.ArgumentParser()
    commands.add_parser(parser.add_subparsers())
    assert _subcommands(parser) == {"attention", "rpe", "data", "train-step", "scaling"}


def test_bench_without_subcommand_prints_help(capsys):
    assert main(["bench"]) == 2
    assert "attention" in capsys.readouterr().out


def test_method_outgrowing_the_budget_gets_a_null_row(tmp_path):
    """Workers cap their address space at set-up size + budget: an allocation failure becomes a reason."""
    args = _attention_args(tmp_path, methods=["flt"], lengths=[64], mem_budget_gb=1e-4)
    (row,) = bench_attention.run_rows(args, log=lambda *_: None)
    assert row["forward_s"] is None and row["peak_mem_mb"] is None
    assert "out of memory" in row["reason"]


def test_train_step_bench_runs_one_code_base(tmp_path):
    """Two timed steps of a tiny recipe in a worker process: every field is there (no timing asserted)."""
    from flt_mol.bench import train_step

    parser = argparse.ArgumentParser()
    train_step.add_arguments(parser)
    args = parser.parse_args(["--steps", "2", "--warmup", "1", "--profile-steps", "1", "--top", "3",
                              "--out", str(tmp_path / "ts.json"), "data.max_train_items=64",
                              "model.periodic=reciprocal", "data.periodic_images=false"])
    assert train_step.run(args) == 0
    (row,) = json.loads((tmp_path / "ts.json").read_text())
    for key in ("step_s", "forward_s", "backward_s", "optimizer_s", "tokens_per_s", "flops", "bound_ratio"):
        assert row[key] > 0
    assert len(row["top_ops"]) == 3


def test_train_step_flop_count_matches_torch_and_survives_a_gradient_inside_the_forward():
    """The bench's FLOP counter gives FlopCounterMode's total, and also counts a forward that calls
    torch.autograd.grad (conservative forces), which FlopCounterMode's module hooks refuse."""
    from torch.utils.flop_counter import FlopCounterMode

    from flt_mol.bench.train_step import _FlopCount

    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x = torch.randn(5, 8)
    ref = FlopCounterMode(display=False)
    with ref:
        net(x).sum().backward()
    with _FlopCount() as got:
        net(x).sum().backward()
    assert got.total == ref.get_total_flops() > 0

    def forces_loss():
        pos = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(pos).sum(), pos, create_graph=True)
        return grad.square().sum()

    with _FlopCount() as got:
        forces_loss().backward()  # double backward through both matmuls
    assert got.total > ref.get_total_flops()


def test_scaling_slab_has_oc20_tags_and_one_adsorbate():
    from flt_mol.bench.scaling import pt111_slab

    atoms = pt111_slab(3, 3)
    assert len(atoms) == 3 * 3 * 4 + 1
    tags = atoms.get_tags()
    assert (tags == 2).sum() == 1 and (tags == 1).sum() == 9 and (tags == 0).sum() == 27
    assert list(atoms.pbc) == [True, True, False]
