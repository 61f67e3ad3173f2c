"""OC20 LMDB reader/writer: round trips, shards, PyG 1.x pickles, validation, workers."""

from __future__ import annotations

import pickle

import lmdb
import numpy as np
import pytest
import torch
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms
from torch_geometric.data import Data

from flt_mol.data.oc20 import OC20FormatError, OC20LMDB, atoms_to_data, data_to_atoms, write_lmdb


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def make_atoms(i: int):
    """A small slab + adsorbate with tags, fixed bottom layer and a distinct geometry per i."""
    rng = np.random.default_rng(i)
    build = fcc111 if i % 2 == 0 else fcc100
    slab = build(["Cu", "Pt", "Ag"][i % 3], size=(2, 2, 2 + i % 2), vacuum=6.0)
    add_adsorbate(slab, ["O", "C", "N"][i % 3], 1.6, position=(0.3 * i, 0.2))
    slab.set_constraint(FixAtoms(mask=slab.get_tags() == slab.get_tags().max()))
    slab.positions += rng.normal(scale=0.05, size=slab.positions.shape)
    return slab


def make_data(i: int, *, targets: bool = True, sid: bool = True) -> Data:
    atoms = make_atoms(i)
    if not targets:
        return atoms_to_data(atoms, sid=100 + i if sid else None)
    relaxed = atoms.copy()
    relaxed.positions += np.random.default_rng(50 + i).normal(scale=0.1, size=relaxed.positions.shape)
    return atoms_to_data(
        atoms, relaxed=relaxed, y_relaxed=-0.5 * i, y_init=1.0 + i, sid=100 + i if sid else None
    )


def write_raw(path, values: list[bytes], *, length: int | None) -> None:
    """An LMDB written by hand: values under b"0".., and optionally a pickled length."""
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        for j, value in enumerate(values):
            txn.put(f"{j}".encode("ascii"), value)
        if length is not None:
            txn.put(b"length", pickle.dumps(length))
    env.close()


def test_round_trip_every_field_and_dtype(tmp_path):
    items = [make_data(i) for i in range(4)]
    path = tmp_path / "data.lmdb"
    assert write_lmdb(items, path) == 4
    ds = OC20LMDB(path)
    assert len(ds) == 4
    for i, ref in enumerate(items):
        got = ds[i]
        atoms = make_atoms(i)
        n = len(atoms)
        assert got.pos.dtype == torch.float32 and got.pos.shape == (n, 3)
        assert got.cell.dtype == torch.float32 and got.cell.shape == (1, 3, 3)
        assert got.atomic_numbers.dtype == torch.float32
        assert got.tags.dtype == torch.int64 and got.fixed.dtype == torch.float32
        assert got.pos_relaxed.dtype == torch.float32 and got.pos_relaxed.shape == (n, 3)
        assert isinstance(got.natoms, int) and got.natoms == n
        assert isinstance(got.sid, int) and got.sid == 100 + i
        assert isinstance(got.y_relaxed, float) and got.y_relaxed == -0.5 * i
        assert isinstance(got.y_init, float) and got.y_init == 1.0 + i
        assert sorted(got.keys()) == sorted(ref.keys())
        for key in ("pos", "cell", "atomic_numbers", "tags", "fixed", "pos_relaxed"):
            assert torch.equal(got[key], ref[key]), key
        # Against ASE directly (float32 rounding of the float64 positions only).
        np.testing.assert_allclose(got.pos.numpy(), atoms.positions, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got.atomic_numbers.numpy(), atoms.numbers)
        np.testing.assert_array_equal(got.tags.numpy(), atoms.get_tags())
        fixed_idx = atoms.constraints[0].index
        assert got.fixed[fixed_idx].eq(1).all() and got.fixed.sum() == len(fixed_idx)


def test_written_file_is_plain_oc20_layout(tmp_path):
    """fairchem's LmdbDataset: keys b"0".., pickled "length", values via pickle.loads."""
    path = tmp_path / "data.lmdb"
    write_lmdb([make_data(i) for i in range(3)], path)
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        assert pickle.loads(txn.get(b"length")) == 3
        keys = sorted(k for k, _ in txn.cursor())
        assert keys == [b"0", b"1", b"2", b"length"]
        data = pickle.loads(txn.get(b"2"))
    env.close()
    assert isinstance(data, Data) and torch.equal(data.pos, make_data(2).pos)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "temporary file left"


def test_shards_with_and_without_length(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_lmdb([make_data(i) for i in range(3)], folder / "a.lmdb")
    write_raw(folder / "b.lmdb", [pickle.dumps(make_data(i)) for i in range(3, 5)], length=None)
    write_raw(folder / "c.lmdb", [pickle.dumps(make_data(5))], length=1)
    (folder / "notes.txt").write_text("not a shard")
    ds = OC20LMDB(folder)
    assert ds.lengths == [3, 2, 1] and len(ds) == 6
    for i in range(6):
        assert ds[i].sid == 100 + i
    assert ds[-1].sid == 105 and ds[-6].sid == 100
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(IndexError):
        ds[-7]


def test_shard_without_length_ignores_other_keys_and_checks_contiguity(tmp_path):
    path = tmp_path / "meta.lmdb"
    write_raw(path, [pickle.dumps(make_data(i)) for i in range(3)], length=None)
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"metadata", pickle.dumps({"source": "test"}))
    env.close()
    assert len(OC20LMDB(path)) == 3
    gap = tmp_path / "gap.lmdb"
    write_raw(gap, [pickle.dumps(make_data(0))], length=None)
    env = lmdb.open(str(gap), subdir=False, map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"5", pickle.dumps(make_data(1)))
    env.close()
    with pytest.raises(OC20FormatError, match="gap.lmdb.*not contiguous"):
        OC20LMDB(gap)


def test_missing_key_names_file_and_key(tmp_path):
    path = tmp_path / "short.lmdb"
    write_raw(path, [pickle.dumps(make_data(0))], length=2)
    ds = OC20LMDB(path)
    with pytest.raises(KeyError, match=r"short\.lmdb.*b'1'"):
        ds[1]


def pyg1_pickle(data: Data) -> bytes:
    """Bytes laid out like a PyG 1.x Data pickle: the class torch_geometric.data.data.Data
    created by NEWOBJ and its fields (plus PyG 1.x's ``__num_nodes__`` slot) as the plain
    ``__dict__`` state, without ``_store``. Protocol 2, as older files used."""
    old = Data.__new__(Data)
    old.__dict__.update({k: data[k] for k in data.keys()})
    old.__dict__["__num_nodes__"] = None
    return pickle.dumps(old, protocol=2)


def test_pyg1_pickles_are_rebuilt(tmp_path):
    ref = make_data(1)
    raw = pyg1_pickle(ref)
    old = pickle.loads(raw)
    assert isinstance(old, Data) and "_store" not in old.__dict__  # what a plain load gives
    path = tmp_path / "old.lmdb"
    write_raw(path, [raw], length=1)
    got = OC20LMDB(path)[0]
    assert "_store" in got.__dict__
    assert sorted(got.keys()) == sorted(ref.keys())
    for key in ref.keys():
        value = got[key]
        assert torch.equal(value, ref[key]) if torch.is_tensor(value) else value == ref[key]


def test_test_split_without_targets_or_sid(tmp_path):
    path = tmp_path / "test.lmdb"
    write_lmdb([make_data(0, targets=False, sid=False), make_data(1, targets=False)], path)
    ds = OC20LMDB(path)
    first, second = ds[0], ds[1]
    for key in ("y_relaxed", "y_init", "pos_relaxed", "sid"):
        assert key not in first.keys()
    assert second.sid == 101 and "y_relaxed" not in second.keys()


def _mutate(field: str, value):
    def apply(data: Data) -> Data:
        if value is None:
            del data[field]
        else:
            data[field] = value(data) if callable(value) else value
        return data

    return apply


INVALID = {
    "missing pos": ("pos", _mutate("pos", None)),
    "missing tags": ("tags", _mutate("tags", None)),
    "pos not [N,3]": ("pos", _mutate("pos", lambda d: d.pos[:, :2])),
    "cell wrong size": ("cell", _mutate("cell", torch.zeros(1, 3, 2))),
    "tags wrong length": ("tags", _mutate("tags", lambda d: d.tags[:-1])),
    "fixed wrong length": ("fixed", _mutate("fixed", lambda d: d.fixed[:-1])),
    "nan position": ("pos", _mutate("pos", lambda d: d.pos.index_fill(0, torch.tensor([1]), float("nan")))),
    "inf cell": ("cell", _mutate("cell", lambda d: d.cell.index_fill(1, torch.tensor([0]), float("inf")))),
    "atomic number 0": ("atomic_numbers", _mutate("atomic_numbers", lambda d: d.atomic_numbers * 0)),
    "atomic number 119": (
        "atomic_numbers",
        _mutate("atomic_numbers", lambda d: d.atomic_numbers.index_fill(0, torch.tensor([0]), 119.0)),
    ),
    "atomic number 1.5": (
        "atomic_numbers",
        _mutate("atomic_numbers", lambda d: d.atomic_numbers.index_fill(0, torch.tensor([0]), 1.5)),
    ),
    "empty structure": ("0 atoms", _mutate("pos", torch.zeros(0, 3))),
    "natoms mismatch": ("natoms", _mutate("natoms", 3)),
    "pos_relaxed shape": ("pos_relaxed", _mutate("pos_relaxed", lambda d: d.pos_relaxed[:-1])),
    "nan target": ("y_relaxed", _mutate("y_relaxed", float("nan"))),
    "-inf relaxed position": (
        "pos_relaxed",
        _mutate("pos_relaxed", lambda d: d.pos_relaxed.index_fill(0, torch.tensor([2]), -float("inf"))),
    ),
    "+inf and -inf position": (  # their sum is NaN, not inf: still caught
        "pos",
        _mutate("pos", lambda d: d.pos.index_fill(0, torch.tensor([0]), float("inf")).index_fill(
            0, torch.tensor([1]), -float("inf"))),
    ),
    "string natoms": ("natoms", _mutate("natoms", "7")),
    "float sid": ("sid", _mutate("sid", 1.5)),
    # S2EF fields
    "force one atom short": ("force", _mutate("force", lambda d: torch.zeros(d.pos.shape[0] - 1, 3))),
    "force [N, 2]": ("force", _mutate("force", lambda d: torch.zeros(d.pos.shape[0], 2))),
    "nan force": ("force", _mutate("force", lambda d: torch.zeros(d.pos.shape[0], 3).index_fill(
        0, torch.tensor([1]), float("nan")))),
    "inf force": ("force", _mutate("force", lambda d: torch.full((d.pos.shape[0], 3), float("inf")))),
    "nan energy y": ("'y'", _mutate("y", float("nan"))),
    "vector energy y": ("'y'", _mutate("y", torch.zeros(2))),
    "float fid": ("fid", _mutate("fid", 2.5)),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_fields_name_file_key_and_field(tmp_path, case):
    field, mutate = INVALID[case]
    path = tmp_path / "bad.lmdb"
    write_raw(path, [pickle.dumps(make_data(0)), pickle.dumps(mutate(make_data(1)))], length=2)
    ds = OC20LMDB(path)
    assert ds[0].sid == 100
    with pytest.raises(OC20FormatError) as info:
        ds[1]
    message = str(info.value)
    assert "bad.lmdb" in message and "b'1'" in message and field in message
    # The writer refuses the same item, naming its index.
    with pytest.raises(OC20FormatError, match="item 0"):
        write_lmdb([mutate(make_data(1))], tmp_path / "out.lmdb")
    assert not (tmp_path / "out.lmdb").exists()


@pytest.mark.parametrize("damage", ["truncated", "corrupt", "garbage"])
def test_truncated_and_corrupt_entries(tmp_path, damage):
    raw = pickle.dumps(make_data(0), protocol=4)
    if damage == "truncated":
        bad = raw[: len(raw) // 2]
    elif damage == "corrupt":
        # Damage the bytes of a stored tensor storage header (its element count).
        start = raw.index(b"FloatStorage")
        bad = raw[:start] + bytes(b ^ 0xFF for b in raw[start : start + 400]) + raw[start + 400 :]
    else:
        bad = bytes(np.random.default_rng(0).integers(0, 256, size=200, dtype=np.uint8))
    path = tmp_path / "damaged.lmdb"
    write_raw(path, [raw, bad], length=2)
    ds = OC20LMDB(path)
    ds[0]
    with pytest.raises((OC20FormatError, pickle.UnpicklingError)) as info:
        ds[1]
    assert "damaged.lmdb" in str(info.value) and "b'1'" in str(info.value)


def test_huge_finite_values_are_not_mistaken_for_non_finite(tmp_path):
    """The finite check sums in float64: float32 values near the top of the range pass."""
    data = make_data(0)
    data.pos = data.pos.index_fill(0, torch.tensor([0, 1]), 3.0e38)
    data.pos_relaxed = data.pos_relaxed.index_fill(0, torch.tensor([0, 1]), -3.0e38)
    path = tmp_path / "big.lmdb"
    write_raw(path, [pickle.dumps(data)], length=1)
    got = OC20LMDB(path)[0]
    assert torch.equal(got.pos, data.pos) and torch.equal(got.pos_relaxed, data.pos_relaxed)


def test_validate_false_skips_value_checks(tmp_path):
    data = make_data(0)
    data.atomic_numbers = data.atomic_numbers * 0 + 200
    path = tmp_path / "x.lmdb"
    write_raw(path, [pickle.dumps(data)], length=1)
    assert OC20LMDB(path, validate=False)[0].atomic_numbers[0] == 200
    with pytest.raises(OC20FormatError):
        OC20LMDB(path)[0]


def test_writer_is_atomic_and_refuses_overwrite(tmp_path):
    path = tmp_path / "out.lmdb"

    def failing():
        yield make_data(0)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_lmdb(failing(), path)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary file

    write_lmdb([make_data(0)], path)
    with pytest.raises(FileExistsError):
        write_lmdb([make_data(1)], path)
    assert OC20LMDB(path)[0].sid == 100
    write_lmdb([make_data(1), make_data(2)], path, overwrite=True)
    assert len(OC20LMDB(path)) == 2 and OC20LMDB(path)[0].sid == 101
    with pytest.raises(TypeError, match="item 0"):
        write_lmdb([make_atoms(0)], tmp_path / "atoms.lmdb")


def test_writer_normalises_a_copy_not_the_callers_data(tmp_path):
    data = make_data(0)
    data.tags = data.tags.int()
    data.pos = data.pos.double()
    data.cell = data.cell[0]
    write_lmdb([data], tmp_path / "x.lmdb")
    assert data.tags.dtype == torch.int32 and data.pos.dtype == torch.float64
    assert data.cell.shape == (3, 3)
    got = OC20LMDB(tmp_path / "x.lmdb")[0]
    assert got.tags.dtype == torch.int64 and got.pos.dtype == torch.float32
    assert got.cell.shape == (1, 3, 3)
    torch.testing.assert_close(got.pos, data.pos.float(), rtol=0, atol=0)


def test_writer_grows_map_size(tmp_path):
    path = tmp_path / "grow.lmdb"
    items = [make_data(i % 4) for i in range(40)]
    assert write_lmdb(items, path, map_size=64 * 1024) == 40
    assert [OC20LMDB(path)[i].sid for i in range(40)] == [100 + i % 4 for i in range(40)]


def test_atoms_to_data_energies_from_calculators():
    atoms = make_atoms(2)
    relaxed = atoms.copy()
    atoms.calc = SinglePointCalculator(atoms, energy=3.5)
    relaxed.calc = SinglePointCalculator(relaxed, energy=-1.25)
    data = atoms_to_data(atoms, relaxed=relaxed)
    assert data.y_init == 3.5 and data.y_relaxed == -1.25
    assert atoms_to_data(atoms, relaxed=relaxed, y_relaxed=0.5, y_init=0.25).y_relaxed == 0.5
    plain = atoms_to_data(make_atoms(2))
    assert "y_init" not in plain.keys() and "sid" not in plain.keys()
    other = make_atoms(1)
    with pytest.raises(ValueError, match="relaxed"):
        atoms_to_data(atoms, relaxed=other)


def test_missing_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        OC20LMDB(tmp_path / "nope.lmdb")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.lmdb"):
        OC20LMDB(tmp_path / "empty")


def test_pickled_dataset_reopens_lazily(tmp_path):
    path = tmp_path / "data.lmdb"
    write_lmdb([make_data(i) for i in range(3)], path)
    ds = OC20LMDB(path)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone[2].sid == 102
    # Two datasets over one file in one process share the environment.
    assert OC20LMDB(path)[1].sid == ds[1].sid == 101


def test_dataloader_with_worker(tmp_path):
    path = tmp_path / "data.lmdb"
    write_lmdb([make_data(i) for i in range(5)], path)
    ds = OC20LMDB(path)
    ds[0]  # the parent holds an open environment when the worker forks
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=1, collate_fn=_sids
    )
    assert [s for batch in loader for s in batch] == [100, 101, 102, 103, 104]
    assert ds[4].sid == 104  # and re-opens it afterwards


def _sids(items):
    return [d.sid for d in items]


def test_oc20_tags_from_ase_layers():
    from flt_mol.data.oc20 import oc20_tags_from_ase_layers

    atoms = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(atoms, "O", 1.5, "fcc")
    tags = oc20_tags_from_ase_layers(atoms)
    ase_tags = atoms.get_tags()
    assert tags.tolist() == [2 if t == 0 else 1 if t == 1 else 0 for t in ase_tags]
    assert (tags == 2).sum() == 1 and (tags == 1).sum() == 4


# --------------------------------------------------------------------------------------------
# S2EF entries: y, force, fid


def make_s2ef(i: int) -> Data:
    atoms = make_atoms(i)
    force = np.random.default_rng(70 + i).normal(size=(len(atoms), 3))  # float64, as ASE returns
    return atoms_to_data(atoms, sid=100 + i, y=-3.25 * i, force=force, fid=7 * i)


def test_s2ef_round_trip(tmp_path):
    items = [make_s2ef(i) for i in range(3)]
    path = tmp_path / "s2ef.lmdb"
    assert write_lmdb(items, path) == 3
    ds = OC20LMDB(path)
    for i, ref in enumerate(items):
        got = ds[i]
        n = got.natoms
        assert got.force.dtype == torch.float32 and got.force.shape == (n, 3)
        assert torch.equal(got.force, ref.force)
        np.testing.assert_allclose(got.force.numpy(), np.random.default_rng(70 + i).normal(size=(n, 3)), atol=1e-6)
        assert isinstance(got.y, float) and got.y == -3.25 * i
        assert isinstance(got.fid, int) and got.fid == 7 * i
        assert sorted(got.keys()) == sorted(ref.keys())
        assert "y_relaxed" not in got.keys() and "pos_relaxed" not in got.keys()


def test_s2ef_entries_as_fairchem_writes_them(tmp_path):
    """OC20's S2EF preprocessing stores y/fid as tensors or numpy scalars and force in float64
    sometimes: read, normalised to float / int / float32 [N, 3]."""
    d = make_s2ef(1)
    d.y = torch.tensor([-1.5], dtype=torch.float64)
    d.fid = torch.tensor(4)
    d.sid = np.int64(12)
    d.force = d.force.double()
    path = tmp_path / "fc.lmdb"
    write_raw(path, [pickle.dumps(d)], length=1)
    got = OC20LMDB(path)[0]
    assert got.y == -1.5 and type(got.y) is float
    assert got.fid == 4 and type(got.fid) is int and got.sid == 12
    assert got.force.dtype == torch.float32 and got.force.shape == (got.natoms, 3)


def test_atoms_to_data_checks_force_shape():
    atoms = make_atoms(0)
    with pytest.raises(ValueError, match="force"):
        atoms_to_data(atoms, force=np.zeros((len(atoms), 2)))


def test_data_to_atoms_inverts_atoms_to_data(tmp_path):
    d = make_s2ef(2)
    write_lmdb([d], tmp_path / "x.lmdb")
    got = OC20LMDB(tmp_path / "x.lmdb")[0]
    atoms = data_to_atoms(got)
    np.testing.assert_allclose(atoms.positions, got.pos.numpy(), atol=0)
    np.testing.assert_array_equal(atoms.numbers, got.atomic_numbers.numpy())
    np.testing.assert_array_equal(atoms.get_tags(), got.tags.numpy())
    assert list(atoms.pbc) == list(got.pbc.reshape(3).tolist())
    fixed = np.flatnonzero(got.fixed.numpy())
    assert len(fixed) and list(atoms.constraints[0].index) == list(fixed)
    assert atoms.get_potential_energy() == got.y
    np.testing.assert_allclose(atoms.get_forces(apply_constraint=False), got.force.numpy(), atol=0)
    assert np.all(atoms.get_forces()[fixed] == 0)  # ASE applies FixAtoms to forces
    back = atoms_to_data(atoms, y=got.y, force=atoms.get_forces(apply_constraint=False), fid=got.fid, sid=got.sid)
    for key in ("pos", "cell", "atomic_numbers", "tags", "fixed", "force", "pbc"):
        assert torch.equal(back[key], got[key]), key
    # relaxed positions, no pbc field (slab convention), no calculator
    d = make_data(1)
    del d.pbc
    relaxed = data_to_atoms(d, positions="pos_relaxed")
    np.testing.assert_allclose(relaxed.positions, d.pos_relaxed.numpy(), atol=0)
    assert list(relaxed.pbc) == [True, True, False] and relaxed.calc is None
    with pytest.raises(KeyError, match="force"):
        data_to_atoms(d, positions="force_x")
