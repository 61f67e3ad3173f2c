"""OC20 legacy LMDB: reader, writer and ASE conversion.

Format (what fairchem's ``LmdbDataset`` reads and OC20 IS2RE downloads contain): one ``.lmdb``
file (``subdir=False``) or a folder of ``*.lmdb`` shards; keys are ASCII integers ``b"0"``,
``b"1"``, ...; an optional key ``b"length"`` holds the pickled entry count; each value is a
pickled torch_geometric ``Data`` with

==============  ==============  =========================================================
field           shape           dtype (as written by :func:`write_lmdb`)
==============  ==============  =========================================================
pos             [N, 3]          float32, initial positions (Angstrom)
cell            [1, 3, 3]       float32, lattice vectors as rows
atomic_numbers  [N]             float32 (OC20 stores them as floats)
natoms          scalar          Python int
tags            [N]             int64: 0 subsurface, 1 surface, 2 adsorbate
fixed           [N]             float32, 1.0 for atoms under ``FixAtoms``
sid             scalar          Python int (system id; absent in some splits)
y_init          scalar          Python float, energy of the initial structure (eV)
y_relaxed       scalar          Python float, IS2RE target (eV)
pos_relaxed     [N, 3]          float32, relaxed positions
y               scalar          Python float, S2EF energy of ``pos`` (eV)
force           [N, 3]          float32, S2EF forces on ``pos`` (eV/A)
fid             scalar          Python int, S2EF frame id within the system's trajectory
==============  ==============  =========================================================

IS2RE entries carry ``y_init`` / ``y_relaxed`` / ``pos_relaxed``; S2EF entries (fairchem's
``LmdbDataset`` names, as written by OC20's S2EF preprocessing) carry ``y`` / ``force`` /
``fid``. Every target field is optional. Test splits carry no targets. Values are unpickled through
:mod:`flt_mol.data.safe_pickle` (allow-list). Objects pickled under PyG 1.x (no ``_store``) are
rebuilt as ``Data(**obj.__dict__)``, as fairchem does.
"""

from __future__ import annotations

import bisect
import copy
import math
import os
import pickle
import struct
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torch_geometric.data import Data

from flt_mol.data.safe_pickle import UnsafePickleError, safe_loads
from flt_mol.errors import InputError
from flt_mol.fileio import default_file_mode

if TYPE_CHECKING:  # pragma: no cover
    import ase

__all__ = [
    "OC20FormatError",
    "OC20LMDB",
    "validate_data",
    "write_lmdb",
    "atoms_to_data",
    "data_to_atoms",
    "oc20_tags_from_ase_layers",
    "LMDB_READ_KWARGS",
    "close_environments",
]

# How every reader opens an OC20 LMDB: read-only and without the lock file, so read-only
# media and many concurrent readers work; no readahead (random access).
LMDB_READ_KWARGS: dict[str, Any] = dict(
    subdir=False, readonly=True, lock=False, readahead=False, meminit=False
)

_LENGTH_KEY = b"length"
MAX_ATOMIC_NUMBER = 118
_REQUIRED_FIELDS = ("pos", "cell", "atomic_numbers", "tags", "fixed")
_ABSENT = object()


class OC20FormatError(InputError):
    """An LMDB file or entry that is not a valid OC20 structure (the message names file, key,
    field). A :class:`ValueError`, like every :class:`~flt_mol.errors.InputError`."""


# --------------------------------------------------------------------------------------------
# Validation / normalisation
# --------------------------------------------------------------------------------------------


def _as_scalar(value: Any, *, source: str, field: str, kind: type) -> int | float:
    # What the writer stores (and so nearly every entry holds): a Python int / finite float.
    if type(value) is kind and (kind is int or math.isfinite(value)):
        return value
    if torch.is_tensor(value) or isinstance(value, np.ndarray):
        size = value.numel() if torch.is_tensor(value) else value.size
        if size != 1:
            raise OC20FormatError(
                f"{source}: field {field!r} must be a scalar, got shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise OC20FormatError(f"{source}: field {field!r} must be a number, got {type(value).__name__}")
    if kind is int:
        if float(value) != int(value):
            raise OC20FormatError(f"{source}: field {field!r} must be an integer, got {value!r}")
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise OC20FormatError(f"{source}: field {field!r} is not finite ({value})")
    return value


def _as_tensor(value: Any, *, source: str, field: str) -> torch.Tensor:
    if torch.is_tensor(value):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, (list, tuple)):
        return torch.as_tensor(value)
    raise OC20FormatError(f"{source}: field {field!r} must be a tensor, got {type(value).__name__}")


def _check_finite(t: torch.Tensor, *, source: str, field: str) -> None:
    """Raise unless every value of the float32 tensor ``t`` is finite (call it under
    ``np.errstate(invalid="ignore")``: a sum of inf and -inf warns otherwise).

    One reduction over a numpy view (``force`` detaches / copies to CPU only when needed),
    cheaper per call than ``np.isfinite(a).all()`` or torch ops on these small tensors: the
    float64 sum is finite iff every value is, since NaN and +-inf propagate (inf - inf is
    NaN) and float32 values (< 3.5e38) cannot overflow a float64 sum of < 1e270 terms.
    """
    if not math.isfinite(t.numpy(force=True).sum(dtype=np.float64)):
        raise OC20FormatError(f"{source}: field {field!r} has non-finite values")


def _check_atomic_numbers(numbers: torch.Tensor, *, source: str) -> None:
    z = numbers.numpy(force=True)
    # min/max first: two reductions decide the range (NaN fails both comparisons).
    if z.min() >= 1 and z.max() <= MAX_ATOMIC_NUMBER and (z == np.rint(z)).all():
        return
    ok = (z >= 1) & (z <= MAX_ATOMIC_NUMBER) & (z == np.rint(z))
    raise OC20FormatError(
        f"{source}: field 'atomic_numbers' holds {z[~ok][0]!r}, not an element (1..118)"
    )


def validate_data(data: Data, *, source: str, check: bool = True) -> Data:
    """Check one OC20 structure and normalise dtypes in place; return it.

    Normalised: ``pos``/``pos_relaxed``/``force``/``cell``/``atomic_numbers``/``fixed``
    float32, ``cell`` [1,3,3], ``tags`` int64, ``natoms``/``sid``/``fid`` int, ``y``/``y_*``
    float.

    Args:
        data: the structure.
        source: where it comes from (file and key), used in every error message.
        check: run the value checks (finite positions, atomic numbers in 1..118, matching
            lengths, ``natoms``). Missing required fields are always reported.

    Raises:
        OC20FormatError: naming ``source`` and the field.
    """
    store = data._store
    # Reads go to the plain dict behind PyG's storage: its __getitem__ / __contains__ are
    # Python methods, and this function makes ~30 lookups per structure. Writes still go
    # through the storage (which keeps its attribute caches consistent).
    mapping = store._mapping
    for field in _REQUIRED_FIELDS:
        if field not in mapping:
            raise OC20FormatError(f"{source}: required field {field!r} is missing")
    # Only changed values are written back: PyG's storage __setitem__ is slow (cache pops).
    updates: dict[str, Any] = {}

    def normalised(field: str, dtype: torch.dtype) -> torch.Tensor:
        value = mapping[field]
        if type(value) is torch.Tensor and value.dtype == dtype:  # as written: nothing to do
            return value
        t = _as_tensor(value, source=source, field=field)
        if t.dtype != dtype:
            t = t.to(dtype)
        if t is not value:
            updates[field] = t
        return t

    pos = normalised("pos", torch.float32)
    if check and (pos.dim() != 2 or pos.shape[1] != 3):
        raise OC20FormatError(f"{source}: field 'pos' must have shape [N, 3], got {tuple(pos.shape)}")
    n = pos.shape[0]
    if check and n == 0:
        raise OC20FormatError(f"{source}: empty structure (field 'pos' has 0 atoms)")
    cell = normalised("cell", torch.float32)
    if check and cell.numel() != 9:
        raise OC20FormatError(
            f"{source}: field 'cell' must have shape [1, 3, 3] or [3, 3], got {tuple(cell.shape)}"
        )
    if cell.shape != (1, 3, 3):
        cell = updates["cell"] = cell.reshape(1, 3, 3)
    numbers = normalised("atomic_numbers", torch.float32)
    tags = normalised("tags", torch.long)
    fixed = normalised("fixed", torch.float32)
    pos_relaxed = normalised("pos_relaxed", torch.float32) if "pos_relaxed" in mapping else None
    force = normalised("force", torch.float32) if "force" in mapping else None
    if check:
        for field, t in (("atomic_numbers", numbers), ("tags", tags), ("fixed", fixed)):
            if t.shape != (n,):
                raise OC20FormatError(
                    f"{source}: field {field!r} must have shape [{n}] (one per atom), "
                    f"got {tuple(t.shape)}"
                )
        for field, t in (("pos_relaxed", pos_relaxed), ("force", force)):
            if t is not None and t.shape != (n, 3):
                raise OC20FormatError(
                    f"{source}: field {field!r} must have shape [{n}, 3], got {tuple(t.shape)}"
                )
        # inf + -inf in the sums below is NaN by design: no numpy "invalid value" warning.
        with np.errstate(invalid="ignore"):
            _check_finite(pos, source=source, field="pos")
            _check_finite(cell, source=source, field="cell")
            if pos_relaxed is not None:
                _check_finite(pos_relaxed, source=source, field="pos_relaxed")
            if force is not None:
                _check_finite(force, source=source, field="force")
        _check_atomic_numbers(numbers, source=source)

    # A sentinel, not None: a field present with the value None is reported, not skipped.
    current = mapping.get("natoms", _ABSENT)
    if current is not _ABSENT:
        natoms = _as_scalar(current, source=source, field="natoms", kind=int)
        if check and natoms != n:
            raise OC20FormatError(f"{source}: field 'natoms' is {natoms} but 'pos' has {n} atoms")
    else:
        natoms = n
    if type(current) is not int or current != natoms:
        updates["natoms"] = natoms
    if "pbc" in mapping:  # optional periodic flags per cell row (default: a slab, (T, T, F))
        pbc = _as_tensor(mapping["pbc"], source=source, field="pbc")
        if check and pbc.numel() != 3:
            raise OC20FormatError(f"{source}: field 'pbc' must have 3 entries (one per cell row), got {tuple(pbc.shape)}")
        if pbc.dtype != torch.bool or pbc.shape != (1, 3):
            updates["pbc"] = pbc.reshape(1, 3).bool()
    for field, kind in (("y_init", float), ("y_relaxed", float), ("y", float), ("sid", int), ("fid", int)):
        value = mapping.get(field, _ABSENT)
        if value is not _ABSENT:
            scalar = _as_scalar(value, source=source, field=field, kind=kind)
            if type(value) is not kind:
                updates[field] = scalar
    for field, value in updates.items():
        store[field] = value
    return data


def _rebuild_pyg1(obj: Any) -> Any:
    """PyG 1.x pickles carry the fields in ``__dict__`` and no ``_store``: rebuild a Data."""
    if isinstance(obj, Data) and "_store" not in obj.__dict__:
        fields = {
            k: v for k, v in obj.__dict__.items() if v is not None and not k.startswith("__")
        }
        return Data(**fields)
    return obj


# Errors that a truncated or corrupt pickle can raise from inside the unpickler.
_CORRUPT_ERRORS = (
    pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
    AttributeError, struct.error, RuntimeError, MemoryError, OverflowError,
)


def _decode_entry(raw: bytes, *, source: str, check: bool) -> Data:
    try:
        obj = safe_loads(raw, source=source)
    except UnsafePickleError:
        raise
    except _CORRUPT_ERRORS as err:
        raise OC20FormatError(
            f"{source}: truncated or corrupt entry ({type(err).__name__}: {err})"
        ) from err
    obj = _rebuild_pyg1(obj)
    if not isinstance(obj, Data):
        raise OC20FormatError(
            f"{source}: entry is a {type(obj).__module__}.{type(obj).__qualname__}, "
            "expected a torch_geometric Data"
        )
    return validate_data(obj, source=source, check=check)


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------


def _open_read(path: Path) -> Any:
    import lmdb

    if path.is_file() and path.stat().st_size == 0:
        raise OC20FormatError(f"{path}: empty file (expected an OC20 LMDB: a .lmdb file or a folder of shards)")
    try:
        return lmdb.open(str(path), **LMDB_READ_KWARGS)
    except lmdb.Error as err:
        raise OC20FormatError(f"{path}: cannot open as an LMDB file ({err})") from err


# Read-only environments of this process, shared by every OC20LMDB instance and keyed by the
# file's identity (st_dev, st_ino): LMDB forbids opening one file twice in a process (py-lmdb
# raises "already open"), and an environment must not be used across fork(). So the handles
# are closed just before every fork (DataLoader workers re-open lazily, and so does the
# parent), and dropped if this process turns out to be a child that missed the hook.
_ENVS: dict[tuple[int, int], Any] = {}
_ENVS_PID = os.getpid()


def close_environments() -> None:
    """Close every LMDB environment this module opened in this process (re-opened on demand)."""
    global _ENVS_PID
    if _ENVS_PID == os.getpid():
        for env in _ENVS.values():
            env.close()
    _ENVS.clear()
    _ENVS_PID = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=close_environments)


def _file_identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _shared_env(path: Path, identity: tuple[int, int]) -> Any:
    if _ENVS_PID != os.getpid():
        close_environments()
    env = _ENVS.get(identity)
    if env is None:
        env = _ENVS[identity] = _open_read(path)
    return env


class OC20LMDB(Dataset):
    """A torch ``Dataset`` over an OC20 legacy LMDB file or a folder of ``*.lmdb`` shards.

    Shards are ordered by file name; global index ``i`` maps to (shard, local key) through
    cumulative counts and ``bisect``. A shard's count is its pickled ``"length"`` key when
    present, else its count of integer keys. Environments are opened read-only and lazily in
    each process and shared between instances (see :func:`close_environments`): the dataset
    holds no handle, so it pickles to DataLoader workers (fork or spawn), which open their own.

    Args:
        path: an ``.lmdb`` file or a folder of ``*.lmdb`` shards.
        transform: optional callable applied to each ``Data`` after validation.
        validate: run the per-entry value checks of :func:`validate_data` (shape, finite,
            element range). Missing fields and corrupt entries are always reported.

    Shapes (of ``ds[i]``): pos [N,3], cell [1,3,3], atomic_numbers [N], tags [N], fixed [N],
    pos_relaxed [N,3] (IS2RE), force [N,3] (S2EF); natoms, sid, fid int; y_init, y_relaxed,
    y float. Fields a file does not hold are absent.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        transform: Callable[[Data], Data] | None = None,
        validate: bool = True,
    ) -> None:
        self.path = Path(path)
        self.transform = transform
        self.validate = validate
        if self.path.is_dir():
            files = sorted(self.path.glob("*.lmdb"))
            if not files:
                raise FileNotFoundError(f"{self.path}: folder holds no *.lmdb shards")
        elif self.path.is_file():
            files = [self.path]
        else:
            raise FileNotFoundError(f"{self.path}: no such LMDB file or folder")
        self.files: list[Path] = files
        self._identities = [_file_identity(f) for f in files]
        self.lengths: list[int] = [self._shard_length(i) for i in range(len(files))]
        self._cumulative: list[int] = np.cumsum(self.lengths).tolist()

    def _env(self, shard: int) -> Any:
        """This process's read-only environment of a shard (opened on first use)."""
        return _shared_env(self.files[shard], self._identities[shard])

    def _shard_length(self, shard: int) -> int:
        env = self._env(shard)
        with env.begin() as txn:
            raw = txn.get(_LENGTH_KEY)
            if raw is None:
                return self._count_keys(shard, txn)
            source = f"{self.files[shard]}, key {_LENGTH_KEY!r}"
            try:
                length = safe_loads(raw, source=source)
            except UnsafePickleError:
                raise
            except _CORRUPT_ERRORS as err:
                raise OC20FormatError(f"{source}: corrupt length entry ({err})") from err
            if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
                raise OC20FormatError(f"{source}: length must be a non-negative int, got {length!r}")
            return int(length)

    def _count_keys(self, shard: int, txn: Any) -> int:
        """Entry count of a shard without a "length" key: its integer keys, which must be
        exactly b"0" .. b"n-1" (other keys, e.g. metadata, are ignored)."""
        count, largest = 0, -1
        for key in txn.cursor().iternext(keys=True, values=False):
            if key.isdigit():
                count += 1
                largest = max(largest, int(key))
        if largest != count - 1:
            raise OC20FormatError(
                f"{self.files[shard]}: integer keys are not contiguous ({count} keys, largest "
                f"{largest}); expected b'0' .. b'{count - 1}'"
            )
        return count

    # -- Dataset API --------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._cumulative[-1] if self._cumulative else 0

    def locate(self, idx: int) -> tuple[int, bytes]:
        """(shard number, key) of global index ``idx`` (negative indices count from the end)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for {self.path} with {n} entries")
        idx = idx + n if idx < 0 else idx
        shard = bisect.bisect_right(self._cumulative, idx)
        local = idx - (self._cumulative[shard - 1] if shard > 0 else 0)
        return shard, f"{local}".encode("ascii")

    def get_raw(self, idx: int) -> bytes:
        """The pickled bytes of entry ``idx`` (not unpickled)."""
        shard, key = self.locate(idx)
        with self._env(shard).begin() as txn:
            raw = txn.get(key)
        if raw is None:
            raise KeyError(f"{self.files[shard]}: key {key!r} is missing (index {idx})")
        return raw

    def __getitem__(self, idx: int) -> Data:
        shard, key = self.locate(int(idx))
        with self._env(shard).begin() as txn:
            raw = txn.get(key)
        source = f"{self.files[shard]}, key {key!r}"
        if raw is None:
            raise KeyError(f"{source} is missing (index {idx})")
        data = _decode_entry(raw, source=source, check=self.validate)
        if self.transform is not None:
            data = self.transform(data)
        return data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, shards={len(self.files)}, len={len(self)})"


# --------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_lmdb(
    items: Iterable[Data],
    path: str | os.PathLike,
    *,
    map_size: int | None = None,
    overwrite: bool = False,
) -> int:
    """Write structures as an OC20 legacy LMDB file; return the number written.

    Keys ``b"0"``, ``b"1"``, ... and a pickled ``b"length"``; values are pickled ``Data``
    (standard pickle, protocol 4: fairchem's ``LmdbDataset`` reads them with ``pickle.loads``)
    after :func:`validate_data` normalised them to the OC20 dtypes (module docstring). The file
    is written under a temporary name in the same folder, fsynced and renamed, so an
    interrupted write leaves no partial ``path``.

    Args:
        items: ``Data`` objects (see :func:`atoms_to_data`).
        path: output ``.lmdb`` file (a single file, ``subdir=False``).
        map_size: initial LMDB map size in bytes (grown automatically when full; default 1 GiB).
        overwrite: replace an existing ``path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        OC20FormatError: an item is not a valid OC20 structure (names the item index).
    """
    import lmdb

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: output folder does not exist")
    size = int(map_size) if map_size is not None else 1 << 30
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    env = lmdb.open(str(tmp), subdir=False, map_size=size, lock=False, meminit=False)
    count = 0
    try:
        pending: list[tuple[bytes, bytes]] = []

        def flush() -> None:
            nonlocal size
            while True:
                try:
                    with env.begin(write=True) as txn:
                        for key, value in pending:
                            txn.put(key, value)
                    break
                except lmdb.MapFullError:
                    size *= 2
                    env.set_mapsize(size)
            pending.clear()

        for i, item in enumerate(items):
            if not isinstance(item, Data):
                raise TypeError(f"write_lmdb: item {i} is a {type(item).__name__}, expected Data")
            # A shallow copy: validation replaces fields of the copy, never the caller's object.
            data = validate_data(copy.copy(item), source=f"write_lmdb item {i}")
            pending.append((f"{i}".encode("ascii"), pickle.dumps(data, protocol=4)))
            count = i + 1
            if len(pending) >= 1000:
                flush()
        pending.append((_LENGTH_KEY, pickle.dumps(count, protocol=4)))
        flush()
        env.sync(True)
        env.close()
        _fsync_path(tmp)
        # LMDB creates its file with its own mode; give it the one a plain open() would.
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        env.close()
        tmp.unlink(missing_ok=True)
        raise
    return count


# --------------------------------------------------------------------------------------------
# ASE -> Data
# --------------------------------------------------------------------------------------------


def _stored_energy(atoms: ase.Atoms) -> float | None:
    """Energy already held by the attached calculator for these positions (never computes)."""
    calc = atoms.calc
    if calc is None:
        return None
    from ase.calculators.calculator import PropertyNotImplementedError

    try:
        energy = calc.get_property("energy", atoms, allow_calculation=False)
    except PropertyNotImplementedError:
        return None
    return float(energy) if energy is not None else None


def oc20_tags_from_ase_layers(atoms: ase.Atoms) -> np.ndarray:
    """OC20 tags for a slab built by ``ase.build`` (``fcc111`` ..., then ``add_adsorbate``).

    ASE tags slab layers 1, 2, ... from the top and adsorbate atoms 0; OC20 uses 2 for the
    adsorbate, 1 for the surface (top) layer and 0 below. Returns int64 [N]; set them with
    ``atoms.set_tags(...)`` before :func:`atoms_to_data`.
    """
    ase_tags = np.asarray(atoms.get_tags())
    out = np.zeros(len(ase_tags), dtype=np.int64)
    out[ase_tags == 1] = 1
    out[ase_tags == 0] = 2
    return out


def structure_fields(atoms: ase.Atoms, *, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The geometry fields of one ASE structure as OC20 stores them: ``pos`` and ``cell`` in
    ``dtype``, ``atomic_numbers``, ``natoms``, OC20 ``tags`` as they are, ``fixed`` = 1 on the
    atoms of every ``FixAtoms`` constraint, ``pbc [1, 3]``. Nothing is read from a calculator."""
    from ase.constraints import FixAtoms

    n = len(atoms)
    fixed = np.zeros(n, dtype=np.float32)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.index] = 1.0
    return {
        "pos": torch.tensor(np.asarray(atoms.get_positions()), dtype=dtype),
        "cell": torch.tensor(np.asarray(atoms.get_cell(complete=True)), dtype=dtype).view(1, 3, 3),
        "atomic_numbers": torch.tensor(atoms.get_atomic_numbers(), dtype=torch.float32),
        "natoms": n,
        "tags": torch.tensor(atoms.get_tags(), dtype=torch.long),
        "fixed": torch.from_numpy(fixed),
        "pbc": torch.tensor(np.asarray(atoms.get_pbc(), dtype=bool)).view(1, 3),
    }


def atoms_to_data(
    atoms: ase.Atoms,
    *,
    relaxed: ase.Atoms | None = None,
    y_relaxed: float | None = None,
    y_init: float | None = None,
    sid: int | None = None,
    y: float | None = None,
    force: Any = None,
    fid: int | None = None,
) -> Data:
    """One ASE structure (plus optionally its relaxed state) as an OC20 ``Data``.

    ``tags`` from ``atoms.get_tags()`` as they are: they must already follow OC20 (0 sub-surface,
    1 surface, 2 adsorbate; see :func:`oc20_tags_from_ase_layers` for ASE-built slabs, whose
    tags count layers instead); ``fixed`` = 1 for indices of every ``FixAtoms``
    constraint; ``y_init`` from the argument, else the energy the attached calculator already
    holds for ``atoms`` (nothing is computed); ``pos_relaxed`` from ``relaxed`` and ``y_relaxed``
    from the argument, else ``relaxed``'s stored calculator energy. Positions are not wrapped.
    S2EF fields: ``y`` (energy of ``atoms``), ``force`` (``[N, 3]`` eV/A, array-like) and
    ``fid`` from the arguments (nothing is computed or read from the calculator for them).

    Raises:
        ValueError: ``relaxed`` has other elements or another atom count than ``atoms``.
    """
    n = len(atoms)
    data = Data(**structure_fields(atoms))
    if sid is not None:
        data.sid = int(sid)
    energy = y_init if y_init is not None else _stored_energy(atoms)
    if energy is not None:
        data.y_init = float(energy)
    if relaxed is not None:
        if len(relaxed) != n or not np.array_equal(
            relaxed.get_atomic_numbers(), atoms.get_atomic_numbers()
        ):
            raise ValueError(
                "atoms_to_data: 'relaxed' must hold the same elements in the same order as "
                f"'atoms' ({relaxed.get_chemical_formula()} vs {atoms.get_chemical_formula()})"
            )
        data.pos_relaxed = torch.tensor(np.asarray(relaxed.get_positions()), dtype=torch.float32)
        if y_relaxed is None:
            y_relaxed = _stored_energy(relaxed)
    if y_relaxed is not None:
        data.y_relaxed = float(y_relaxed)
    if y is not None:
        data.y = float(y)
    if force is not None:
        data.force = torch.as_tensor(np.asarray(force, dtype=np.float64), dtype=torch.float32)
        if data.force.shape != (n, 3):
            raise ValueError(f"atoms_to_data: 'force' must have shape [{n}, 3], got {tuple(data.force.shape)}")
    if fid is not None:
        data.fid = int(fid)
    return data


def data_to_atoms(data: Data, *, positions: str = "pos") -> ase.Atoms:
    """One OC20 ``Data`` as ASE ``Atoms`` (the inverse of :func:`atoms_to_data`), e.g. to relax it.

    ``numbers`` from ``atomic_numbers``; positions from the field ``positions`` (``"pos"`` or
    ``"pos_relaxed"``); ``cell`` and ``pbc`` from the fields of those names (no ``pbc`` field:
    OC20's slab convention ``(True, True, False)``); OC20 ``tags`` as ASE tags; a ``FixAtoms``
    constraint on the atoms with ``fixed`` nonzero. When the structure carries S2EF targets for
    ``pos`` (``y`` and/or ``force``) they are attached as a ``SinglePointCalculator``, so
    ``atoms.get_potential_energy()`` / ``get_forces()`` return them (forces with the constraint
    applied, as ASE does; ``get_forces(apply_constraint=False)`` gives the stored ones).

    Raises:
        KeyError: ``positions`` names a field the structure does not have.
    """
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    fields = data.to_dict()
    if positions not in fields:
        raise KeyError(f"data_to_atoms: the structure has no field {positions!r}")
    pbc = fields.get("pbc")
    atoms = Atoms(
        numbers=np.rint(np.asarray(fields["atomic_numbers"], dtype=np.float64)).astype(np.int64),
        positions=np.asarray(fields[positions], dtype=np.float64),
        cell=np.asarray(fields["cell"], dtype=np.float64).reshape(3, 3),
        pbc=np.asarray(pbc, dtype=bool).reshape(3) if pbc is not None else (True, True, False),
        tags=np.asarray(fields["tags"], dtype=np.int64),
    )
    fixed = np.flatnonzero(np.asarray(fields["fixed"]) != 0)
    if len(fixed):
        atoms.set_constraint(FixAtoms(indices=fixed))
    if positions == "pos" and ("y" in fields or "force" in fields):
        results: dict[str, Any] = {}
        if "y" in fields:
            results["energy"] = float(fields["y"])
        if "force" in fields:
            results["forces"] = np.asarray(fields["force"], dtype=np.float64)
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms
