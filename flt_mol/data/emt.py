"""EMT-IS2RE, the embedded default IS2RE data set: shipped files -> OC20 LMDBs (the
``flt-mol dataset`` command is in :mod:`flt_mol.data.commands`).

The generator (:mod:`flt_mol.data.emt_generator`) writes one compressed ``<split>.npz`` per split
(concatenated per-atom arrays plus ``offsets``; see :func:`flt_mol.data.emt_generator.records_to_arrays`)
into ``datasets/emt_is2re/``. :func:`emt_is2re` turns a split into an OC20 legacy LMDB on first
use, written by :func:`flt_mol.data.oc20.write_lmdb` under a temporary name and renamed (two
processes racing both produce the same file; the last rename wins), cached under

    <root>/emt_is2re/<sha256 of the split's npz, 16 hex>-v<LMDB_VERSION>/<split>.lmdb

with ``root`` = the argument, else ``$FLT_MOL_DATA_DIR``, else ``~/.cache/flt_mol``
(``LMDB_VERSION`` changes when the entries gain fields, so old caches are not reused). Besides
the OC20 fields each entry carries the integer ``facet`` (0 (111), 1 (100), 2 (110)) and
``site_type`` (0 top, 1 bridge, 2 hollow, of the initial placement), which the
``per_adsorbate_facet_site_mean`` baseline reads (:mod:`flt_mol.data.references`). Systems
flagged anomalous by the generator (desorbed, dissociated, reconstructed, not converged) are kept
in the shipped files but left out of the LMDBs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EMT_SPLITS",
    "SHIPPED_DIR",
    "emt_is2re",
    "load_split_arrays",
    "split_items",
    "split_statistics",
    "compute_baselines",
    "ship",
    "cache_root",
    "cached_lmdb_path",
]

EMT_SPLITS: tuple[str, ...] = ("train", "val_id", "val_ood_ads", "val_ood_cat", "val_ood_both")
# Version of the LMDB entries built from the shipped files (2: + facet, site_type).
LMDB_VERSION = 2
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "datasets" / "emt_is2re"


def _check_split(split: str) -> None:
    if split not in EMT_SPLITS:
        from flt_mol.errors import UsageError

        raise UsageError(f"unknown EMT-IS2RE split {split!r}; valid splits: {', '.join(EMT_SPLITS)}")


def _shipped_file(split: str, source: Path | None) -> Path:
    _check_split(split)
    folder = Path(source) if source is not None else SHIPPED_DIR
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shipped EMT-IS2RE split file is missing (run `flt-mol dataset generate`)")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_split_arrays(split: str, *, source: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The shipped arrays of a split (all systems, anomalous ones included; ``flags == 0`` marks
    the kept ones)."""
    path = _shipped_file(split, Path(source) if source is not None else None)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def split_items(arrays: dict[str, np.ndarray], *, keep_anomalous: bool = False) -> list[Any]:
    """OC20 ``Data`` objects (fields of :mod:`flt_mol.data.oc20`) from shipped arrays."""
    import torch
    from torch_geometric.data import Data

    off = arrays["offsets"]
    out = []
    for i in range(len(arrays["sid"])):
        if not keep_anomalous and arrays["flags"][i] != 0:
            continue
        a, b = int(off[i]), int(off[i + 1])
        tags = torch.from_numpy(arrays["tags"][a:b].astype(np.int64))
        out.append(Data(
            pos=torch.from_numpy(arrays["pos_init"][a:b].astype(np.float32)),
            cell=torch.from_numpy(arrays["cell"][i].astype(np.float32)).view(1, 3, 3),
            atomic_numbers=torch.from_numpy(arrays["numbers"][a:b].astype(np.float32)),
            natoms=b - a,
            tags=tags,
            fixed=(tags == 0).float(),
            sid=int(arrays["sid"][i]),
            y_init=float(arrays["y_init"][i]),
            y_relaxed=float(arrays["y_relaxed"][i]),
            pos_relaxed=torch.from_numpy(arrays["pos_relaxed"][a:b].astype(np.float32)),
            facet=int(arrays["facet"][i]),
            site_type=int(arrays["site_type"][i]),
        ))
    return out


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """The folder the LMDBs are cached under: ``root``, else ``$FLT_MOL_DATA_DIR``, else
    ``~/.cache/flt_mol`` (the LMDBs are in ``<cache root>/emt_is2re/<hash>/``)."""
    if root is not None:
        return Path(root)
    env = os.environ.get("FLT_MOL_DATA_DIR")
    return Path(env) if env is not None and env != "" else Path.home() / ".cache" / "flt_mol"


def _folder(source: str | os.PathLike | None) -> Path | None:
    return Path(source) if source is not None else None


def cached_lmdb_path(split: str, *, root: str | os.PathLike | None = None,
                     source: str | os.PathLike | None = None) -> Path:
    """Where :func:`emt_is2re` keeps (or will build) the LMDB of ``split``; builds nothing."""
    shipped = _shipped_file(split, _folder(source))
    return cache_root(root) / "emt_is2re" / f"{_sha256(shipped)[:16]}-v{LMDB_VERSION}" / f"{split}.lmdb"


def emt_is2re(split: str, *, root: str | os.PathLike | None = None,
              source: str | os.PathLike | None = None) -> Path:
    """Path of the OC20 LMDB of an EMT-IS2RE split, built from the shipped files on first use.

    Args:
        split: one of :data:`EMT_SPLITS`.
        root: cache root (default ``$FLT_MOL_DATA_DIR``, else ``~/.cache/flt_mol``); the file is
            ``root/emt_is2re/<hash of the shipped npz>-v<LMDB_VERSION>/<split>.lmdb``.
        source: folder of the shipped ``<split>.npz`` files (default ``datasets/emt_is2re``).

    Raises:
        UsageError (a ValueError): unknown split (the message lists the valid ones).
        FileNotFoundError: the shipped file is missing.
    """
    from flt_mol.data.oc20 import write_lmdb

    path = cached_lmdb_path(split, root=root, source=source)
    if path.is_file():
        return path
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    items = split_items(load_split_arrays(split, source=source))
    # write_lmdb is itself atomic; writing under a private name and renaming makes a race between
    # two processes harmless (both files are identical, the last os.replace wins).
    tmp = folder / f".{split}.{os.getpid()}.{uuid.uuid4().hex[:8]}.lmdb"
    try:
        write_lmdb(items, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# statistics and baselines


def _site_keys(arrays: dict[str, np.ndarray], mask: np.ndarray, keys: list[str]) -> list[str]:
    from flt_mol.data.references import site_key

    idx = np.flatnonzero(mask)
    return [site_key(k, int(arrays["facet"][i]), int(arrays["site_type"][i])) for k, i in zip(keys, idx)]


def _keys_and_counts(arrays: dict[str, np.ndarray], mask: np.ndarray) -> tuple[np.ndarray, list[str]]:
    from flt_mol.data.references import MAX_Z
    from ase.data import chemical_symbols

    off = arrays["offsets"]
    counts, keys = [], []
    for i in np.flatnonzero(mask):
        z = arrays["numbers"][off[i]:off[i + 1]].astype(np.int64)
        t = arrays["tags"][off[i]:off[i + 1]]
        counts.append(np.bincount(z, minlength=MAX_Z + 1).astype(np.float64))
        c = np.bincount(z[t == 2], minlength=MAX_Z + 1)
        keys.append("".join(f"{chemical_symbols[k]}{int(c[k])}" for k in
                            sorted(np.flatnonzero(c), key=lambda k: chemical_symbols[k])))
    return (np.stack(counts) if counts else np.zeros((0, MAX_Z + 1))), keys


def split_statistics(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Sizes and energy spread of one split's arrays (energies over kept systems)."""
    kept = arrays["flags"] == 0
    y = arrays["y_relaxed"][kept]
    natoms = np.diff(arrays["offsets"])[kept]
    flags = arrays["flags"]
    return {
        "n_systems": int(len(flags)),
        "n_kept": int(kept.sum()),
        "n_desorbed": int(((flags & 1) > 0).sum()),
        "n_dissociated": int(((flags & 2) > 0).sum()),
        "n_reconstructed": int(((flags & 4) > 0).sum()),
        "n_not_converged": int(((flags & 8) > 0).sum()),
        "energy_mean": float(y.mean()) if len(y) else float("nan"),
        "energy_std": float(y.std()) if len(y) else float("nan"),
        "natoms_min": int(natoms.min()) if len(y) else 0,
        "natoms_max": int(natoms.max()) if len(y) else 0,
        "n_adsorbates": int(len(np.unique(arrays["ads_index"][kept]))),
    }


def compute_baselines(*, source: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fit the trivial baselines on the kept train systems and evaluate them on every split.

    Returns:
        ``{"fit": TrivialBaselines.to_dict(), "splits": {split: {**statistics, "baselines":
        {name: mae}}}}``.
    """
    from flt_mol.data.references import TrivialBaselines

    arrays = {s: load_split_arrays(s, source=source) for s in EMT_SPLITS}
    tr = arrays["train"]
    kept = tr["flags"] == 0
    counts, keys = _keys_and_counts(tr, kept)
    fit = TrivialBaselines.fit_arrays(counts, keys, tr["y_relaxed"][kept], _site_keys(tr, kept, keys))
    out: dict[str, Any] = {"fit": fit.to_dict(), "splits": {}}
    for s in EMT_SPLITS:
        a = arrays[s]
        mask = a["flags"] == 0
        c, k = _keys_and_counts(a, mask)
        out["splits"][s] = {**split_statistics(a), "baselines": fit.evaluate_arrays(
            c, k, a["y_relaxed"][mask], _site_keys(a, mask, k))}
    return out


def ship(generated: str | os.PathLike, *, dest: str | os.PathLike | None = None) -> dict[str, Any]:
    """Copy the merged ``<split>.npz`` files and ``generator_config.json`` of a generation run
    into the shipped folder and write ``baselines.json`` there."""
    generated = Path(generated)
    dest = Path(dest) if dest is not None else SHIPPED_DIR
    dest.mkdir(parents=True, exist_ok=True)
    for name in [f"{s}.npz" for s in EMT_SPLITS] + ["generator_config.json"]:
        src = generated / name
        if not src.is_file():
            raise FileNotFoundError(f"{src}: missing from the generation run (merge it first)")
        tmp = dest / f".{name}.{os.getpid()}.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest / name)
    result = compute_baselines(source=dest)
    tmp = dest / f".baselines.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, dest / "baselines.json")
    return result
