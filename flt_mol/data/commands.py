"""``flt-mol convert`` (any ASE-readable structure file(s) -> OC20 legacy LMDB) and
``flt-mol dataset`` (the embedded EMT-IS2RE data set, :mod:`flt_mol.data.emt`).

What is read (``--mode``):

* ``frames`` (default for every format except ``traj``): each selected frame is one structure.
  ``pos`` = the frame's positions; ``tags`` = its tags (extxyz column ``tags``, traj/db tags);
  ``fixed`` = its ``FixAtoms`` constraints (extxyz ``move_mask`` column, traj/db constraints);
  ``y_relaxed`` / ``y_init`` / ``sid`` = per-frame info keys of those names when present
  (extxyz comment line, ASE db key-value pairs: db files are read row by row so that the
  key-value pairs survive); ``pos_relaxed`` = a per-atom array
  ``pos_relaxed`` when present (extxyz column). The energy a frame carries (extxyz ``energy=``,
  a calculator in traj/db) is stored as ``--calc-energy`` (default ``y_relaxed``; ``y_init``
  or ``none`` are the alternatives) unless the info key of that name is present.
  ``sid`` defaults to the frame's position in the output.
* ``relaxation`` (default for ``traj``): each input file holds one relaxation; the first
  selected frame is the initial structure and the last the relaxed one: ``pos`` / ``y_init``
  from the first, ``pos_relaxed`` / ``y_relaxed`` from the last (energies from info keys or
  the frames' calculators). ``sid`` = the first frame's info ``sid``, else the file's position
  among the inputs.

Several inputs can be given; they are written in order into one LMDB.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flt_mol.errors import InputError, UsageError

__all__ = ["add_parser", "run_convert", "read_structures", "add_s2ef_actions"]

_CALC_ENERGY_CHOICES = ("y_relaxed", "y_init", "none")


CONVERT_DESCRIPTION = """\
Write structures from any file ASE can read (extxyz, traj, ASE db, ...) as one OC20 legacy
LMDB, in the order given.

--mode frames (default for every format but traj): each selected frame is one structure.
  pos, tags and fixed (FixAtoms / the extxyz move_mask column) come from the frame;
  y_relaxed, y_init and sid from per-frame info keys of those names (extxyz comment line,
  ASE db key-value pairs); pos_relaxed from a per-atom pos_relaxed column. The energy a
  frame carries (extxyz energy=, a calculator in traj/db) goes to the field named by
  --calc-energy unless an info key of that name is present. sid defaults to the
  structure's position in the output.

--mode relaxation (default for traj): each input file is one relaxation. The first selected
  frame gives pos and y_init, the last gives pos_relaxed and y_relaxed; sid is the first
  frame's info sid, else the file's position among the inputs.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``convert`` and ``dataset {info,build,generate}`` to the ``flt-mol`` command line."""
    parser = subparsers.add_parser(
        "convert",
        help="convert ASE-readable structures (extxyz, traj, ASE db, ...) to an OC20 LMDB",
        description=CONVERT_DESCRIPTION,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="structure file(s) ASE can read")
    parser.add_argument("output", metavar="OUTPUT.lmdb", help="OC20 LMDB file to write")
    parser.add_argument("--index", default=":", help="ASE index of the frames to read in each input")
    parser.add_argument("--format", default=None, help="ASE format name (default: guessed from the file)")
    parser.add_argument(
        "--mode",
        choices=("auto", "frames", "relaxation"),
        default="auto",
        help="frames: one structure per frame; relaxation: one per file (first frame initial, "
        "last frame relaxed); auto: relaxation for traj files, frames otherwise",
    )
    parser.add_argument(
        "--calc-energy",
        choices=_CALC_ENERGY_CHOICES,
        default="y_relaxed",
        help="(frames mode) field that receives a frame's own energy",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    parser.set_defaults(func=run_convert)
    _add_dataset_parser(subparsers)


def _frame_energy(atoms: Any) -> float | None:
    from flt_mol.data.oc20 import _stored_energy

    return _stored_energy(atoms)


def _frame_info(atoms: Any) -> dict[str, Any]:
    """``atoms.info`` with an ASE db row's key-value pairs lifted to the top level."""
    info = dict(atoms.info)
    kvp = info.pop("key_value_pairs", None)
    if isinstance(kvp, dict):
        for key, value in kvp.items():
            info.setdefault(key, value)
    return info


def _frames_to_data(frames: list[Any], *, start_sid: int, calc_energy: str) -> Iterator[Any]:
    import numpy as np
    import torch

    from flt_mol.data.oc20 import atoms_to_data

    for offset, atoms in enumerate(frames):
        info = _frame_info(atoms)
        sid = info.get("sid")
        energy = _frame_energy(atoms)
        # atoms.copy() drops the calculator, so the frame's energy lands only where
        # --calc-energy says (atoms_to_data would otherwise take it as y_init).
        data = atoms_to_data(
            atoms.copy(),
            y_init=info.get("y_init"),
            y_relaxed=info.get("y_relaxed"),
            sid=sid if sid is not None else start_sid + offset,
        )
        if energy is not None and calc_energy != "none" and calc_energy not in data.keys():
            data[calc_energy] = energy
        if "pos_relaxed" in atoms.arrays:
            data.pos_relaxed = torch.tensor(
                np.asarray(atoms.arrays["pos_relaxed"], dtype=np.float64), dtype=torch.float32
            )
        yield data


def _relaxation_to_data(frames: list[Any], *, sid: int) -> Any:
    from flt_mol.data.oc20 import atoms_to_data

    first, last = frames[0], frames[-1]
    y_init = _frame_info(first).get("y_init")
    y_relaxed = _frame_info(last).get("y_relaxed")
    return atoms_to_data(
        first,
        relaxed=last,
        y_init=y_init if y_init is not None else _frame_energy(first),
        y_relaxed=y_relaxed if y_relaxed is not None else _frame_energy(last),
        sid=_frame_info(first).get("sid", sid),
    )


def _read_db(path: Path, index: str) -> list[Any]:
    """ASE db rows as Atoms whose info keeps the key-value pairs (ase.io.read drops them)."""
    import ase.db
    from ase.io.formats import string2index

    selection = string2index(index)
    with ase.db.connect(str(path)) as db:
        rows = list(db.select())
    chosen = rows[selection] if isinstance(selection, slice) else [rows[selection]]
    return [row.toatoms(add_additional_information=True) for row in chosen]


def read_structures(
    inputs: list[str | Path],
    *,
    index: str = ":",
    format: str | None = None,
    mode: str = "auto",
    calc_energy: str = "y_relaxed",
) -> Iterator[Any]:
    """Yield OC20 ``Data`` for the structures in ``inputs`` (see the module docstring).

    Raises:
        FileNotFoundError: an input does not exist.
        UsageError: a bad ``mode``, ``calc_energy`` or ``format`` (a ``ValueError``).
        InputError: an input cannot be read by ASE in the given format, or selects no frames.
    """
    import ase.io
    from ase.io.formats import UnknownFileTypeError, filetype, ioformats

    if mode not in ("auto", "frames", "relaxation"):
        raise UsageError(f"mode must be auto, frames or relaxation, got {mode!r}")
    if calc_energy not in _CALC_ENERGY_CHOICES:
        raise UsageError(f"calc_energy must be one of {_CALC_ENERGY_CHOICES}, got {calc_energy!r}")
    if format is not None and format not in ioformats:
        raise UsageError(f"format {format!r} is not an ASE format (see `ase info --formats`)")
    count = 0
    for file_number, name in enumerate(inputs):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such input file")
        try:
            fmt = format if format is not None else filetype(str(path), guess=True)
            if fmt == "db":
                frames = _read_db(path, index)
            else:
                frames = ase.io.read(str(path), index=index, format=fmt)
        except (UnknownFileTypeError, ValueError, KeyError, IndexError, OSError, EOFError) as err:
            raise InputError(
                f"{path}: cannot be read by ASE"
                + (f" as format {format!r}" if format is not None else "")
                + f" ({type(err).__name__}: {err})"
            ) from err
        if not isinstance(frames, list):
            frames = [frames]
        if not frames:
            raise InputError(f"{path}: index {index!r} selects no frames")
        file_mode = mode if mode != "auto" else ("relaxation" if fmt == "traj" else "frames")
        if file_mode == "relaxation":
            yield _relaxation_to_data(frames, sid=file_number)
            count += 1
        else:
            for data in _frames_to_data(frames, start_sid=count, calc_energy=calc_energy):
                yield data
                count += 1


def run_convert(args: argparse.Namespace) -> int:
    """Entry point of ``flt-mol convert``; returns the exit code."""
    from flt_mol.data.oc20 import write_lmdb

    output = Path(args.output)
    stats = {"n": 0, "y_relaxed": 0, "pos_relaxed": 0, "no_adsorbate": 0}

    def counted() -> Iterator[Any]:
        for data in read_structures(
            args.inputs,
            index=args.index,
            format=args.format,
            mode=args.mode,
            calc_energy=args.calc_energy,
        ):
            keys = data.keys()
            stats["n"] += 1
            stats["y_relaxed"] += "y_relaxed" in keys
            stats["pos_relaxed"] += "pos_relaxed" in keys
            stats["no_adsorbate"] += not bool((data.tags == 2).any())
            yield data

    n = write_lmdb(counted(), output, overwrite=args.overwrite)
    print(
        f"wrote {n} structures to {output} ({stats['y_relaxed']} with y_relaxed, "
        f"{stats['pos_relaxed']} with pos_relaxed)"
    )
    if stats["no_adsorbate"]:
        print(
            f"note: {stats['no_adsorbate']} structures have no atom tagged 2 (adsorbate); "
            "periodic images and per-tag energy factors rely on OC20 tags",
            file=sys.stderr,
        )
    return 0


# --------------------------------------------------------------------------------------------
# flt-mol dataset


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from flt_mol.data.emt import EMT_SPLITS, SHIPPED_DIR, cache_root, cached_lmdb_path, compute_baselines

    source = Path(args.source) if args.source is not None else SHIPPED_DIR
    path = source / "baselines.json"
    result = json.loads(path.read_text()) if path.is_file() else compute_baselines(source=source)
    if args.json:
        print(json.dumps(result["splits"], indent=1))
        return 0
    from flt_mol.data.references import BASELINE_NAMES

    names = [n for n in BASELINE_NAMES if all(n in st["baselines"] for st in result["splits"].values())]
    print(f"EMT-IS2RE ({source}); energies in eV, baselines fitted on train (MAE)")
    print(f"{'split':<14}{'systems':>8}{'kept':>7}{'mean':>8}{'std':>7}" + "".join(f"{n:>{len(n) + 2}}" for n in names))
    for s, st in result["splits"].items():
        print(f"{s:<14}{st['n_systems']:>8}{st['n_kept']:>7}{st['energy_mean']:>8.3f}{st['energy_std']:>7.3f}"
              + "".join(f"{st['baselines'][n]:>{len(n) + 2}.3f}" for n in names))
    root = cache_root(args.root)
    print(f"\nLMDB cache: {root / 'emt_is2re'} (built on first use; FLT_MOL_DATA_DIR or --root moves it)")
    for s in EMT_SPLITS:
        lmdb = cached_lmdb_path(s, root=root, source=source)
        print(f"  {s:<14}{lmdb}{'' if lmdb.is_file() else '  (not built yet)'}")
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from flt_mol.data.emt import EMT_SPLITS, emt_is2re

    splits = args.splits if args.splits else list(EMT_SPLITS)
    for s in splits:
        if s not in EMT_SPLITS:
            raise UsageError(f"unknown EMT-IS2RE split {s!r}; valid splits: {', '.join(EMT_SPLITS)}")
    for s in splits:
        print(f"{s}: {emt_is2re(s, root=args.root, source=args.source)}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import json

    from flt_mol.data import emt_generator
    from flt_mol.data.emt import ship

    argv = ["--seed", str(args.seed), "--out", str(args.out)]
    if args.num:
        argv += ["--num", *args.num]
    if args.max_chunks is not None:
        argv += ["--max-chunks", str(args.max_chunks)]
    if args.merge_only:
        argv.append("--merge-only")
    code = emt_generator.main(argv)
    if code == 0 and args.ship:
        result = ship(args.out, dest=args.source)
        print(json.dumps({s: v["n_kept"] for s, v in result["splits"].items()}))
    return code


_SPLITS_TEXT = "train, val_id, val_ood_ads, val_ood_cat, val_ood_both"
_ROOT_HELP = "cache root of the LMDBs (default: $FLT_MOL_DATA_DIR, else ~/.cache/flt_mol)"
_SOURCE_HELP = "folder of the shipped <split>.npz files (default: datasets/emt_is2re)"


def _add_dataset_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dataset", help="the embedded EMT-IS2RE and EMT-S2EF data sets (info, build, generate, s2ef-build, s2ef-info)",
        description="The embedded EMT-IS2RE data set: shipped as compact .npz files, built into OC20 "
        "LMDBs on first use under <cache root>/emt_is2re/<hash>/ (cache root: $FLT_MOL_DATA_DIR, "
        "else ~/.cache/flt_mol). Recipes and --data name a split as emt:SPLIT.",
    )
    sub = parser.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    p = sub.add_parser("info", help="sizes, energy mean/std and trivial baselines per split; where the LMDBs are")
    p.add_argument("--source", default=None, help=_SOURCE_HELP)
    p.add_argument("--root", default=None, help=_ROOT_HELP)
    p.add_argument("--json", action="store_true", help="print the per-split statistics as JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("build", help="build the OC20 LMDBs of the splits (cached; prints their paths)")
    p.add_argument("splits", nargs="*", metavar="SPLIT", help=f"splits to build (default: all of {_SPLITS_TEXT})")
    p.add_argument("--root", default=None, help=_ROOT_HELP)
    p.add_argument("--source", default=None, help=_SOURCE_HELP)
    p.set_defaults(func=_cmd_build)
    p = sub.add_parser("generate", help="rerun the EMT generator (slow: ~0.3 s per system)")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    p.add_argument("--out", type=Path, required=True, help="working folder (shards; resumable)")
    p.add_argument("--num", nargs="*", default=None, metavar="SPLIT=N",
                   help="kept systems per split (default: the generator's built-in targets)")
    p.add_argument("--max-chunks", type=int, default=None, help="stop after this many chunks (default: all)")
    p.add_argument("--merge-only", action="store_true", help="only merge existing shards")
    p.add_argument("--ship", action="store_true",
                   help="then copy the merged files into --source and write baselines.json")
    p.add_argument("--source", default=None, help="shipped folder for --ship (default: datasets/emt_is2re)")
    p.set_defaults(func=_cmd_generate)
    add_s2ef_actions(sub)


# --------------------------------------------------------------------------------------------
# flt-mol dataset s2ef-build | s2ef-info  (EMT-S2EF)


def add_s2ef_actions(sub: argparse._SubParsersAction) -> None:
    """Add ``s2ef-build`` and ``s2ef-info`` to the ``flt-mol dataset`` actions."""
    from flt_mol.data.s2ef import S2EF_SPLITS

    p = sub.add_parser("s2ef-build", help="build the EMT-S2EF LMDBs (energies + forces; ~1-2 min, cached)")
    p.add_argument("splits", nargs="*", metavar="SPLIT", help=f"default: all of {', '.join(S2EF_SPLITS)}")
    p.add_argument("--root", default=None, help="cache root (default $FLT_MOL_DATA_DIR or ~/.cache/flt_mol)")
    p.add_argument("--source", default=None, help="folder of the shipped EMT-IS2RE files")
    p.set_defaults(func=run_s2ef_build)
    p = sub.add_parser("s2ef-info", help="EMT-S2EF sizes, energy/force statistics and trivial baselines")
    p.add_argument("--compute", action="store_true",
                   help="build the splits and measure (default: print datasets/emt_s2ef/stats.json)")
    p.add_argument("--root", default=None, help="cache root for --compute")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run_s2ef_info)


def run_s2ef_build(args: argparse.Namespace) -> int:
    """``flt-mol dataset s2ef-build [SPLIT ...]``: print each split's LMDB path."""
    import time

    from flt_mol.data.s2ef import S2EF_SPLITS, emt_s2ef

    splits = args.splits if args.splits else list(S2EF_SPLITS)
    bad = [s for s in splits if s not in S2EF_SPLITS]
    if bad:
        raise UsageError(f"unknown EMT-S2EF split {bad[0]!r}; valid splits: {', '.join(S2EF_SPLITS)}")
    for s in splits:
        t0 = time.perf_counter()
        path = emt_s2ef(s, root=args.root, source=args.source)
        print(f"{s}: {path} ({time.perf_counter() - t0:.1f} s)")
    return 0


def run_s2ef_info(args: argparse.Namespace) -> int:
    """``flt-mol dataset s2ef-info``: the data card's statistics table."""
    import json

    from flt_mol.data.s2ef import SHIPPED_S2EF_DIR, s2ef_statistics

    path = SHIPPED_S2EF_DIR / "stats.json"
    if args.compute or not path.is_file():
        stats = s2ef_statistics(root=args.root)
    else:
        stats = json.loads(path.read_text())["stats"]
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print("EMT-S2EF; energies eV (y: total EMT energy), forces eV/A on free atoms; baselines fitted on train")
    header = (f"{'split':<14}{'frames':>7}{'systems':>8}{'E mean':>8}{'E std':>7}{'|F| mean':>9}{'F rms':>7}"
              f"{'mean-E MAE':>11}{'linear-E MAE':>13}{'0-force MAE':>12}{'EFwT':>7}")
    print(header)
    for s, st in stats.items():
        b = st["baselines"]
        print(f"{s:<14}{st['n_frames']:>7}{st['n_systems']:>8}{st['energy_mean']:>8.3f}{st['energy_std']:>7.3f}"
              f"{st['force_abs_mean']:>9.3f}{st['force_rms']:>7.3f}"
              f"{b['train_mean_zero_forces']['energy_mae']:>11.3f}{b['composition_linear_zero_forces']['energy_mae']:>13.3f}"
              f"{b['train_mean_zero_forces']['forces_mae']:>12.3f}"
              f"{100 * b['composition_linear_zero_forces']['energy_forces_within_threshold']:>6.1f}%")
    return 0
