"""``flt-mol bench {attention, rpe, data, train-step, scaling}``.

``attention``: speed / peak memory of one pre-LN layer per attention method (paper Fig. 1), see
:mod:`flt_mol.bench.attention`. ``rpe``: max-norm error of the RPE random features versus r (paper
Thm 4.2), see :mod:`flt_mol.bench.rpe`. ``data``: the data-pipeline benchmark of
:mod:`flt_mol.bench.data_pipeline`. ``train-step``: one IS2RE training step phase by phase
(:mod:`flt_mol.bench.train_step`). ``scaling``: one prediction from 1k to 1M atoms beside exact
attention (:mod:`flt_mol.bench.scaling`).
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _run_attention(args: argparse.Namespace) -> int:
    from flt_mol.bench import attention

    return attention.run(args)


def _run_rpe(args: argparse.Namespace) -> int:
    from flt_mol.bench import rpe

    return rpe.run(args)


def add_parser(subparsers) -> None:
    """Add ``bench`` and its sub-commands to the ``flt-mol`` parser."""
    bench = subparsers.add_parser(
        "bench", help="benchmarks: attention speed/memory, RPE error, data pipeline",
        description="Benchmarks: forward time and peak memory of attention layers (paper Fig. 1), the "
        "max-norm error of RPE random features (paper Thm 4.2), and data-pipeline throughput.",
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.set_defaults(func=lambda args: (bench.print_help(), 2)[1])

    # Light modules: their heavy imports (torch, ase, lmdb) live inside their functions.
    from flt_mol.bench import attention, data_pipeline, rpe, scaling, train_step

    p = sub.add_parser(
        "attention", help="forward time and peak memory vs length (paper Fig. 1)",
        description="Forward time and peak memory of one pre-LN layer per attention method and sequence "
        "length (paper Fig. 1), each run in a fresh process; a method that would not fit the memory "
        "budget gets a row with nulls and the reason.",
    )
    attention.add_arguments(p)
    p.set_defaults(func=_run_attention)

    p = sub.add_parser(
        "rpe", help="RPE mask max-norm error vs number of features (paper Thm 4.2)",
        description="Max-norm error of the random-feature RPE mask estimate against the exact mask, per "
        "family, length and number of features, beside the Thm 4.2 bound and the constant c = max |g|/p.",
    )
    rpe.add_arguments(p)
    p.set_defaults(func=_run_rpe)

    p = sub.add_parser(
        "train-step", help="one IS2RE training step: phases, top operators, tokens/s, FLOP bound",
        description="Time one training step of a recipe (default recipes/emt_is2re_flt.yaml) phase by phase, "
        "list the top operators from torch.profiler, count its FLOPs and compare with this machine's fp32 "
        "FLOP rate; --compare times other checkouts beside it, alternating.",
    )
    train_step.add_arguments(p)
    p.set_defaults(func=train_step.run)

    p = sub.add_parser(
        "scaling", help="time and memory of one IS2RE predict from 1k to 1M atoms, beside exact attention",
        description="Time and peak memory of one prediction on Pt(111)+O slabs from 1k to 1M atoms (fresh "
        "process per row, chunked inference above 65,536 tokens), beside exact attention measured on small "
        "slabs and its a L^2 + b L fit extrapolated.",
    )
    scaling.add_arguments(p)
    p.set_defaults(func=scaling.run)

    p = sub.add_parser("data", help="data pipeline throughput: read + periodic images + collate")
    data_pipeline.add_arguments(p)
    p.set_defaults(func=data_pipeline.run)
