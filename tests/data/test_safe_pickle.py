"""The allow-list unpickler: refuses code-running pickles before they run, keeps data intact."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import warnings
from collections import OrderedDict

import lmdb
import numpy as np
import pytest
import torch
from torch_geometric.data import Data

from flt_mol.data.oc20 import OC20LMDB
from flt_mol.data.safe_pickle import UnsafePickleError, load_storage_bytes, safe_loads


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class TouchFile:
    """The classic payload: unpickling calls os.system (or another callable) to touch a file."""

    def __init__(self, marker, how: str = "system"):
        self.marker = str(marker)
        self.how = how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "popen":
            return (subprocess.Popen, (["touch", self.marker],))
        if self.how == "eval":
            return (eval, (f"open({self.marker!r}, 'w').close()",))
        raise ValueError(self.how)


@pytest.mark.parametrize("how", ["system", "popen", "eval"])
def test_malicious_pickle_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "pwned"
    raw = pickle.dumps(TouchFile(marker, how))
    # Sanity: the payload is live (a plain pickle.loads would run it) -- checked on a copy.
    if how == "system":
        live = tmp_path / "live"
        pickle.loads(pickle.dumps(TouchFile(live, how)))
        assert live.exists()
    with pytest.raises(UnsafePickleError, match=r"somefile, key b'7'.*(system|Popen|eval)"):
        safe_loads(raw, source="somefile, key b'7'")
    assert not marker.exists()


def test_payload_hidden_in_a_data_field_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    data = Data(pos=torch.zeros(2, 3), comment=TouchFile(marker))
    path = tmp_path / "evil.lmdb"
    env = lmdb.open(str(path), subdir=False, map_size=1 << 22, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"0", pickle.dumps(data))
        txn.put(b"length", pickle.dumps(1))
    env.close()
    ds = OC20LMDB(path)
    with pytest.raises(UnsafePickleError) as info:
        ds[0]
    message = str(info.value)
    assert "evil.lmdb" in message and "b'0'" in message and "posix.system" in message
    assert not marker.exists()


def test_payload_inside_tensor_storage_bytes_is_refused(tmp_path):
    """torch's _load_from_bytes would run a full torch.load: it is replaced by a safe parser."""
    marker = tmp_path / "pwned"
    blob = io.BytesIO()
    torch.save(TouchFile(marker), blob, _use_new_zipfile_serialization=False)

    class StorageBytes:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (blob.getvalue(),))

    with pytest.raises(UnsafePickleError):
        safe_loads(pickle.dumps(StorageBytes()), source="x")
    with pytest.raises((UnsafePickleError, pickle.UnpicklingError)):
        load_storage_bytes(blob.getvalue())
    assert not marker.exists()


def test_persistent_ids_and_unknown_modules_refused():
    class Persistent(pickle.Pickler):
        def persistent_id(self, obj):
            return "ref" if obj == "x" else None

    buf = io.BytesIO()
    Persistent(buf).dump(["x"])
    with pytest.raises(UnsafePickleError, match="persistent"):
        safe_loads(buf.getvalue(), source="f")
    with pytest.raises(UnsafePickleError, match="builtins.getattr"):
        safe_loads(pickle.dumps(getattr), source="f")
    with pytest.raises(UnsafePickleError, match="encoding"):
        safe_loads(pickle.dumps((b"\x00", "abc"), protocol=2).replace(b"latin1", b"hex_co"), source="f")


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
     torch.int8, torch.uint8, torch.bool, torch.complex64],
)
def test_tensors_round_trip_exactly(dtype):
    base = torch.randn(5, 4) * 10
    t = base.to(dtype) if dtype is not torch.complex64 else torch.complex(base, -base)
    for value in (t, t[:, 1:3], t.t(), t[0, 0], t[:0]):
        for protocol in (2, 4, 5):
            got = safe_loads(pickle.dumps(value, protocol=protocol), source="f")
            assert got.dtype == value.dtype and got.shape == value.shape
            assert got.stride() == value.stride()
            assert torch.equal(got, value)


def test_shared_storage_and_requires_grad_survive():
    base = torch.arange(12.0)
    views = [base[:6].view(2, 3), base[6:]]
    got = safe_loads(pickle.dumps(views), source="f")
    assert torch.equal(got[0], views[0]) and torch.equal(got[1], views[1])
    plain = pickle.loads(pickle.dumps(views))
    shared = lambda ts: ts[0].untyped_storage().data_ptr() == ts[1].untyped_storage().data_ptr()  # noqa: E731
    assert shared(got) == shared(plain)  # the same storage sharing as a plain pickle.loads
    leaf = safe_loads(pickle.dumps(torch.ones(3, requires_grad=True)), source="f")
    assert leaf.requires_grad


def test_numpy_and_builtin_containers_round_trip():
    value = {
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
        "ints": np.array([1, 2], dtype=np.int64),
        "scalar": np.float64(1.5),
        "ordered": OrderedDict(a=1, b=[1, 2]),
        "set": {1, 2},
        "frozen": frozenset({3}),
        "bytes": b"\x00\xff",
        "tuple": (1.0, None, True, "s"),
        "complex": 1 + 2j,
    }
    for protocol in (2, 4, 5):
        got = safe_loads(pickle.dumps(value, protocol=protocol), source="f")
        assert got.keys() == value.keys()
        np.testing.assert_array_equal(got["array"], value["array"])
        assert got["array"].dtype == np.float32 and got["ints"].dtype == np.int64
        assert got["scalar"] == 1.5 and type(got["scalar"]) is np.float64
        for key in ("ordered", "set", "frozen", "bytes", "tuple", "complex"):
            assert got[key] == value[key]


def test_non_legacy_storage_bytes_go_through_torch_weights_only(tmp_path):
    """Storage bytes in torch's zip format take torch's own restricted loader."""
    marker = tmp_path / "pwned"
    good = io.BytesIO()
    torch.save(torch.arange(5.0).untyped_storage(), good)  # zip format
    storage = load_storage_bytes(good.getvalue())
    assert bytes(storage) == bytes(torch.arange(5.0).untyped_storage())
    evil = io.BytesIO()
    torch.save(TouchFile(marker), evil)
    with pytest.raises(pickle.UnpicklingError):
        load_storage_bytes(evil.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="corrupt"):
        load_storage_bytes(b"PK\x03\x04 not really a zip file")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_legacy_storage_bytes_with_other_headers(protocol):
    """Both the fast path (this torch's usual header) and the full parse read storages."""
    values = torch.randn(7, dtype=torch.float64)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation; it is what tensors pickle
        torch.save(values.storage(), buf, _use_new_zipfile_serialization=False,
                   pickle_protocol=protocol)
    storage = load_storage_bytes(buf.getvalue())
    assert storage.dtype == torch.float64
    assert torch.equal(torch.empty(0, dtype=torch.float64).set_(storage), values)
    raw = io.BytesIO()
    torch.save(values.untyped_storage(), raw, _use_new_zipfile_serialization=False)
    assert bytes(load_storage_bytes(raw.getvalue())) == bytes(values.untyped_storage())
    truncated = buf.getvalue()[:-3]
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        load_storage_bytes(truncated)


def _legacy_storage_stream(values: torch.Tensor, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        torch.save(values.storage(), buf, _use_new_zipfile_serialization=False, **save_kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.int64, torch.bool, torch.bfloat16, torch.complex64]
)
def test_storage_byte_match_agrees_with_the_full_parse(monkeypatch, dtype):
    """The byte-pattern fast path and the unpickling parse give the same storage."""
    from flt_mol.data import safe_pickle

    base = torch.randn(11) * 5
    values = base.to(dtype) if dtype is not torch.complex64 else torch.complex(base, base.flip(0))
    refs = (values, torch.empty(0, dtype=dtype))
    streams = [_legacy_storage_stream(ref) for ref in refs]
    assert all(safe_pickle._fast_pattern().match(s) is not None for s in streams)  # usual layout
    fast = [load_storage_bytes(s) for s in streams]
    monkeypatch.setattr(safe_pickle, "_FAST_PATTERN", safe_pickle.re.compile(b"(?!)"))  # never matches
    full = [load_storage_bytes(s) for s in streams]
    for a, b, ref in zip(fast, full, refs):
        assert a.dtype == b.dtype == dtype and a.size() == b.size() == ref.numel()
        assert bytes(a._untyped_storage) == bytes(b._untyped_storage) == bytes(ref.untyped_storage())
        # torch-owned, resizable memory, like torch.load's (not a view of the pickle's bytes)
        assert a._untyped_storage.resizable() and b._untyped_storage.resizable()


def test_storage_record_lookalikes_fall_through_and_are_refused():
    """Streams that resemble torch's record but name another global or disagree on the key
    are not taken by the byte match: the restricted unpickler judges (and refuses) them."""
    stream = _legacy_storage_stream(torch.arange(4.0))
    assert b"ctorch\nFloatStorage\n" in stream
    for evil in (b"cposix\nsystem\n", b"ctorch\nload\n", b"ctorch\nFloatStorageX\n"):
        with pytest.raises(UnsafePickleError, match="not a storage type"):
            load_storage_bytes(stream.replace(b"ctorch\nFloatStorage\n", evil))
    # The key list names another key (same length): inconsistent, refused by the full parse.
    key = stream.split(b"q\x01a.")[0][-14:]
    assert key.isdigit()
    other = bytes(reversed(key)) if bytes(reversed(key)) != key else key[:-1] + b"0"
    head, sep, tail = stream.rpartition(key + b"q\x01a.")
    with pytest.raises(pickle.UnpicklingError, match="inconsistent"):
        load_storage_bytes(head + other + b"q\x01a." + tail)


def test_allow_list_holds_no_python2_names():
    """find_class looks a name up before mapping Python 2 names: that is only equivalent to
    mapping first while no allow-listed name is itself a Python 2 name."""
    import _compat_pickle

    from flt_mol.data.safe_pickle import allowed_globals

    for module, name in allowed_globals():
        assert (module, name) not in _compat_pickle.NAME_MAPPING
        assert module not in _compat_pickle.IMPORT_MAPPING
