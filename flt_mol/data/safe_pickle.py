"""Restricted unpickling for OC20 LMDB entries.

A pickle is a program: ``pickle.loads`` imports and calls whatever callables the byte stream
names, so an LMDB file from an untrusted source can run arbitrary code. OC20 entries only need a
handful of constructors (torch_geometric ``Data`` and its storages, torch tensor rebuilds, numpy
array reconstruction, a few builtins), so :class:`SafeUnpickler` resolves globals through an
explicit allow-list and refuses everything else *before* it is called: the refusal is raised by
``find_class``, which runs when the stream first names the global, so no payload that needs a
refused callable is ever executed.

Tensor storages pickled by ``torch`` (``torch.storage._load_from_bytes``) embed a second,
complete ``torch.save`` stream which ``torch`` would load with an unrestricted unpickler. Here
that call is replaced by :func:`load_storage_bytes`, which parses the legacy ``torch.save``
layout with the same restrictions (and falls back to ``torch.load(..., weights_only=True)``,
torch's own restricted loader, for layouts it does not recognise). The storage record torch
usually writes is recognised by a byte pattern that can only match data (see
``_STORAGE_RECORD``); every other spelling goes through the restricted unpickler.
"""

from __future__ import annotations

import _compat_pickle
import copyreg
import io
import pickle
import re
import struct
from collections import OrderedDict
from typing import Any

import torch

__all__ = [
    "UnsafePickleError",
    "SafeUnpickler",
    "safe_loads",
    "allowed_globals",
    "load_storage_bytes",
]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle named a global outside the allow-list; nothing of it was called."""


# ``torch.save`` legacy format constants (torch/serialization.py).
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

_STORAGE_DTYPE_NAMES = {
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


def load_storage_bytes(b: bytes) -> Any:
    """Safe replacement for ``torch.storage._load_from_bytes``.

    Parses the legacy ``torch.save`` layout of a single storage: five pickles (magic number,
    protocol version, system info, the storage as a persistent id, the list of storage keys)
    followed, per key, by an int64 element count and the raw little-endian bytes. Anything
    else goes to ``torch.load(weights_only=True)`` (torch's own restricted unpickler).
    """
    storage = _parse_legacy_storage(b)
    if storage is not None:
        return storage
    try:
        return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, AssertionError, RuntimeError, EOFError, ValueError,
            KeyError, TypeError, IndexError) as err:
        raise pickle.UnpicklingError(
            f"tensor storage bytes are corrupt ({type(err).__name__}: {err})"
        ) from err


# dtype name -> (torch dtype, element size in bytes).
_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    name: (getattr(torch, name), getattr(torch, name).itemsize)
    for name in set(_STORAGE_DTYPE_NAMES.values())
}


def rebuild_tensor_v2(
    storage: Any,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool,
    backward_hooks: Any,
    metadata: Any = None,
) -> Any:
    """Stand-in for ``torch._utils._rebuild_tensor_v2`` (same result, fewer checks: CPU only).

    Backward hooks are callables and so could only be allow-listed ones; a non-empty hook
    dict is refused rather than attached.
    """
    if backward_hooks:
        raise UnsafePickleError("refusing a tensor pickled with backward hooks")
    # ``set_`` checks size/stride/offset against the storage's length (and raises if they
    # do not fit); an int shape is a faster overload than torch's own ``(0,)``.
    t = torch.empty(0, dtype=storage.dtype).set_(
        storage._untyped_storage, storage_offset, size, stride
    )
    if requires_grad:
        t.requires_grad_(True)
    if metadata:
        torch._utils.set_tensor_metadata(t, metadata)
    return t


class _StorageType:
    __slots__ = ("dtype_name",)

    def __init__(self, dtype_name: str) -> None:
        self.dtype_name = dtype_name


class _LegacyHeaderUnpickler(pickle.Unpickler):
    """Reads the small header pickles of a legacy ``torch.save`` stream; knows only storage types."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPE_NAMES:
            return _StorageType(_STORAGE_DTYPE_NAMES[name])
        raise UnsafePickleError(f"tensor storage bytes name {module}.{name}, not a storage type")

    def persistent_load(self, pid: Any) -> Any:
        return ("__persistent__", pid)


_HEADER: bytes | None = None


def _known_header() -> bytes:
    """The first three pickles (magic number, protocol version, little-endian system info)
    of a legacy ``torch.save`` stream written by this torch (computed once)."""
    global _HEADER
    if _HEADER is None:
        buf = io.BytesIO()
        torch.save(torch.zeros(1).untyped_storage(), buf, _use_new_zipfile_serialization=False)
        raw = buf.getvalue()
        f = io.BytesIO(raw)
        unpickler = _LegacyHeaderUnpickler(f)
        magic, version, sys_info = unpickler.load(), unpickler.load(), unpickler.load()
        ok = (
            magic == _LEGACY_MAGIC_NUMBER
            and version == _LEGACY_PROTOCOL_VERSION
            and isinstance(sys_info, dict)
            and sys_info.get("little_endian") is True
        )
        # On an unexpected layout, a header that never matches: every stream is fully parsed.
        _HEADER = raw[: f.tell()] if ok else b"\xff" * 64
    return _HEADER


# The two pickles after the header, byte for byte as torch's legacy ``torch.save`` writes a
# CPU storage (protocol 2, C pickler): the persistent id
# ``('storage', torch.<Type>Storage, key, 'cpu', numel, None)`` and the key list ``[key]``.
# Matching these bytes costs ~1 us where unpickling them costs ~20 us. The match only
# recognises data (a storage type name, two digit strings, an integer); a stream spelt in
# any other way (another device, a storage view, other memo numbering, a length prefix that
# disagrees, an unknown type name) is left to the unpickler of :func:`_parse_legacy_storage`,
# so this changes the speed of reading, never what is accepted or refused.
_STORAGE_RECORD = (
    rb"\x80\x02\(X\x07\x00\x00\x00storageq\x00ctorch\n(\w+)\nq\x01"  # ('storage', type,
    rb"X(.{4})(\d+)q\x02X\x03\x00\x00\x00cpuq\x03"  # key, 'cpu',
    rb"(?:K.|M.{2}|J.{4})Ntq\x04Q\."  # numel, None) as a persistent id;
    rb"\x80\x02\]q\x00X(.{4})(\d+)q\x01a\."  # [key]
)
_FAST_TYPES: dict[bytes, tuple[torch.dtype, int]] = {
    name.encode("ascii"): _DTYPES[dtype_name] for name, dtype_name in _STORAGE_DTYPE_NAMES.items()
}
_FAST_PATTERN: re.Pattern[bytes] | None = None


def _fast_pattern() -> re.Pattern[bytes]:
    """This torch's header followed by :data:`_STORAGE_RECORD` (compiled once)."""
    global _FAST_PATTERN
    if _FAST_PATTERN is None:
        _FAST_PATTERN = re.compile(re.escape(_known_header()) + _STORAGE_RECORD, re.DOTALL)
    return _FAST_PATTERN


def _copy_storage(b: bytes, pos: int, dtype: torch.dtype, element_size: int) -> Any:
    """The TypedStorage whose int64 element count and raw little-endian bytes start at
    ``b[pos]`` (the tail of a legacy single-storage stream)."""
    if len(b) - pos < 8:
        raise pickle.UnpicklingError("tensor storage bytes are truncated (no element count)")
    (numel,) = struct.unpack_from("<q", b, pos)
    start = pos + 8
    nbytes = numel * element_size
    if numel < 0 or start + nbytes > len(b):
        raise pickle.UnpicklingError(
            f"tensor storage bytes are truncated: {numel} elements announced, "
            f"{len(b) - start} bytes present"
        )
    # One copy into torch-allocated, resizable memory, as torch.load makes: the tensors share
    # no buffer with the pickle's bytes and behave like any other (resize_, share_memory_).
    if nbytes:
        untyped = torch.UntypedStorage.from_buffer(b, dtype=torch.uint8, count=nbytes, offset=start)
    else:
        untyped = torch.UntypedStorage(0)
    return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _parse_legacy_storage(b: bytes) -> Any:
    """Return a TypedStorage, or None when ``b`` is not the legacy single-storage layout
    (another ``torch.save`` format, or a storage view); raise when it is, but damaged."""
    # The five pickles follow each other. The first three (magic, version, system info) are
    # the same bytes in every stream this torch writes, and so, nearly always, is the layout
    # of the last two: recognise both without unpickling (see _STORAGE_RECORD).
    m = _fast_pattern().match(b)
    if m is not None:
        type_name, key_len, key, keys_len, keys = m.groups()
        spec = _FAST_TYPES.get(type_name)
        if (
            spec is not None
            and keys == key
            and keys_len == key_len
            and int.from_bytes(key_len, "little") == len(key)
        ):
            return _copy_storage(b, m.end(), *spec)
    # Anything else: one restricted unpickler reads the pickles in turn.
    header = _known_header()
    f = io.BytesIO(b)
    unpickler = _LegacyHeaderUnpickler(f)
    if b.startswith(header):
        f.seek(len(header))
        sys_info = {"little_endian": True}
    else:
        try:
            magic = unpickler.load()
            version = unpickler.load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
                MemoryError, OverflowError):
            return None
        if magic != _LEGACY_MAGIC_NUMBER or version != _LEGACY_PROTOCOL_VERSION:
            return None
        sys_info = None
    try:
        if sys_info is None:
            sys_info = unpickler.load()
        obj = unpickler.load()
        keys = unpickler.load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            MemoryError, OverflowError) as err:
        raise pickle.UnpicklingError(f"tensor storage bytes are corrupt ({err})") from err
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise pickle.UnpicklingError("tensor storage bytes: not a little-endian torch.save stream")
    pid = obj[1] if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__persistent__" else None
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise pickle.UnpicklingError("tensor storage bytes do not hold a single storage")
    storage_type, key = pid[1], pid[2]
    if not isinstance(storage_type, _StorageType) or keys != [key]:
        raise pickle.UnpicklingError("tensor storage bytes: inconsistent storage type or key")
    if len(pid) >= 6 and pid[5] is not None:  # storage views: rare, leave them to torch
        return None
    return _copy_storage(b, f.tell(), *_DTYPES[storage_type.dtype_name])


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as used by protocol-2 pickles for ``bytes``, limited to latin-1."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _build_allow_list() -> dict[tuple[str, str], Any]:
    import numpy as np
    import torch._utils
    import torch_geometric.data.data as pyg_data
    import torch_geometric.data.storage as pyg_storage

    allowed: dict[tuple[str, str], Any] = {
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "slice"): slice,
        ("collections", "OrderedDict"): OrderedDict,
        # Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): _latin1_encode,
        # protocol 0/1 object pickles; its arguments are classes that passed this allow-list.
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): load_storage_bytes,
        ("torch", "from_numpy"): torch.from_numpy,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for dtype_name in (
        "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
        "uint8", "bool", "complex64", "complex128",
    ):
        allowed[("torch", dtype_name)] = getattr(torch, dtype_name)
    # numpy moved its private reconstruction helpers from numpy.core to numpy._core in 2.0;
    # files written by either version name one of the two modules.
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # protocol 5: _frombuffer(buf, dtype, shape, order)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    if dtypes is not None:
        for name in dir(dtypes):
            if name.endswith("DType"):
                allowed[("numpy.dtypes", name)] = getattr(dtypes, name)
    for name in ("Data", "DataEdgeAttr", "DataTensorAttr"):
        if hasattr(pyg_data, name):
            allowed[("torch_geometric.data.data", name)] = getattr(pyg_data, name)
    for name in ("BaseStorage", "GlobalStorage", "NodeStorage", "EdgeStorage"):
        if hasattr(pyg_storage, name):
            allowed[("torch_geometric.data.storage", name)] = getattr(pyg_storage, name)
    return allowed


_ALLOWED: dict[tuple[str, str], Any] | None = None


def allowed_globals() -> dict[tuple[str, str], Any]:
    """The allow-list: ``(module, name) -> object`` returned to the unpickler (built once)."""
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _build_allow_list()
    return _ALLOWED


class SafeUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves globals only through :func:`allowed_globals`.

    Args:
        file: binary file object holding the pickle.
        source: where the bytes come from (e.g. ``"data.lmdb, key b'12'"``), used in errors.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, *, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        allowed = allowed_globals()
        obj = allowed.get((module, name))
        if obj is not None:
            return obj
        # Protocol < 3 pickles name Python 2 modules (__builtin__, copy_reg); the stock
        # find_class maps them back, which an override must do itself. (No allow-listed
        # name is itself a Python 2 name, so looking it up first changes nothing.)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        obj = allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"{self.source}: refusing to unpickle global {module}.{name}: it is not on the "
                "allow-list of flt_mol.data.safe_pickle (only torch_geometric Data, tensor and "
                "numpy array reconstruction and builtin containers are accepted)"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: refusing a persistent id in the pickle: {pid!r}")


def safe_loads(data: bytes | memoryview, *, source: str) -> Any:
    """``pickle.loads`` restricted to the allow-list; ``source`` names the file/key in errors."""
    return SafeUnpickler(io.BytesIO(data), source=source).load()
