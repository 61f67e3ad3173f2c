"""Padding, masks and the image layout of collate_atoms."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch_geometric.data import Data

from flt_mol.data.collate import AtomsBatch, Collater, PeriodicImages, collate_atoms
from flt_mol.data.pbc import periodic_images


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_item(n: int, *, seed: int, targets: bool = True, sid: int | None = None) -> Data:
    g = torch.Generator().manual_seed(seed)
    cell = torch.diag(torch.tensor([6.0, 6.5, 20.0])).view(1, 3, 3)
    pos = torch.rand(n, 3, generator=g) * torch.tensor([6.0, 6.5, 4.0])
    tags = torch.randint(0, 2, (n,), generator=g)
    tags[-1] = 2
    data = Data(
        pos=pos,
        cell=cell,
        atomic_numbers=torch.randint(1, 80, (n,), generator=g).float(),
        natoms=n,
        tags=tags,
        fixed=(torch.rand(n, generator=g) < 0.3).float(),
    )
    if targets:
        data.pos_relaxed = pos + 0.1 * torch.randn(n, 3, generator=g)
        data.y_relaxed = float(seed) - 0.5
    if sid is not None:
        data.sid = sid
    return data


def test_padding_and_masks_without_images():
    items = [make_item(3, seed=0, sid=7), make_item(6, seed=1, sid=8), make_item(4, seed=2)]
    batch = collate_atoms(items)
    assert isinstance(batch, AtomsBatch) and batch.num_graphs == 3
    assert batch.pos.shape == (3, 6, 3) and batch.pos.dtype == torch.float32
    assert batch.atomic_numbers.dtype == torch.long and batch.tags.dtype == torch.long
    assert batch.fixed.dtype == torch.bool and batch.cell.shape == (3, 3, 3)
    assert batch.natoms.tolist() == [3, 6, 4]
    assert batch.sid.tolist() == [7, 8, -1]
    assert not batch.is_image.any()
    for b, item in enumerate(items):
        n = item.natoms
        assert batch.padding_mask[b].tolist() == [False] * n + [True] * (6 - n)
        assert torch.equal(batch.real_mask[b], ~batch.padding_mask[b])
        assert torch.equal(batch.pos[b, :n], item.pos)
        assert torch.equal(batch.atomic_numbers[b, :n], item.atomic_numbers.long())
        assert torch.equal(batch.tags[b, :n], item.tags)
        assert torch.equal(batch.fixed[b, :n], item.fixed.bool())
        assert torch.equal(batch.displacement[b, :n], item.pos_relaxed - item.pos)
        assert batch.atomic_numbers[b, n:].eq(0).all() and batch.pos[b, n:].eq(0).all()
        assert batch.displacement[b, n:].eq(0).all()
        assert torch.equal(batch.cell[b], item.cell[0])
    assert batch.y_relaxed.dtype == torch.float32
    assert batch.y_relaxed.tolist() == [-0.5, 0.5, 1.5]


def test_images_follow_real_atoms_then_padding():
    items = [make_item(5, seed=3), make_item(9, seed=4), make_item(2, seed=5)]
    # 6.2 A > the 6 A cell: the adsorbate's own images would be in range, but are not copied.
    config = PeriodicImages(cutoff=6.2)
    batch = collate_atoms(items, images=config)
    L = batch.pos.shape[1]
    totals = []
    for b, item in enumerate(items):
        n = item.natoms
        ref = periodic_images(item.pos, item.cell, item.tags, config)
        m = len(ref)
        totals.append(n + m)
        assert batch.is_image[b].tolist() == [False] * n + [True] * m + [False] * (L - n - m)
        assert batch.padding_mask[b].tolist() == [False] * (n + m) + [True] * (L - n - m)
        assert int(batch.real_mask[b].sum()) == n == int(batch.natoms[b])
        img = slice(n, n + m)
        torch.testing.assert_close(batch.pos[b, img], ref.pos, rtol=0, atol=1e-6)
        assert torch.equal(batch.atomic_numbers[b, img], item.atomic_numbers.long()[ref.source])
        assert torch.equal(batch.tags[b, img], item.tags[ref.source])
        assert torch.equal(batch.fixed[b, img], item.fixed.bool()[ref.source])
        assert batch.displacement[b, n:].eq(0).all()
        assert torch.equal(batch.pos[b, :n], item.pos)
        assert not batch.tags[b, img].eq(2).any()
    assert L == max(totals) and sum(totals) > sum(i.natoms for i in items)


def test_missing_targets_give_none():
    items = [make_item(4, seed=0), make_item(3, seed=1, targets=False)]
    batch = collate_atoms(items, images=PeriodicImages())
    assert batch.y_relaxed is None and batch.displacement is None
    assert batch.sid.tolist() == [-1, -1]


def test_no_adsorbate_no_images_and_empty_list():
    item = make_item(4, seed=0)
    item.tags = torch.zeros(4, dtype=torch.long)
    batch = collate_atoms([item], images=PeriodicImages())
    assert batch.pos.shape == (1, 4, 3) and not batch.is_image.any()
    with pytest.raises(ValueError, match="empty"):
        collate_atoms([])


def test_max_images_caps_the_length():
    items = [make_item(6, seed=8)]
    full = collate_atoms(items, images=PeriodicImages(cutoff=8.0))
    capped = collate_atoms(items, images=PeriodicImages(cutoff=8.0, max_images=3))
    assert int(full.is_image.sum()) > 3 and int(capped.is_image.sum()) == 3
    assert capped.pos.shape[1] == 6 + 3


def test_collater_pickles_and_works_in_a_dataloader():
    collater = Collater(PeriodicImages(cutoff=5.0))
    clone = pickle.loads(pickle.dumps(collater))
    items = [make_item(n, seed=n) for n in (3, 4, 5, 6)]
    loader = torch.utils.data.DataLoader(items, batch_size=2, collate_fn=clone)
    batches = list(loader)
    assert len(batches) == 2 and all(isinstance(b, AtomsBatch) for b in batches)
    direct = collate_atoms(items[:2], images=PeriodicImages(cutoff=5.0))
    assert torch.equal(batches[0].pos, direct.pos)


def test_to_device_copies_every_tensor():
    batch = collate_atoms([make_item(3, seed=0)], images=PeriodicImages())
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.pos, batch.pos)
    assert moved.y_relaxed is not None
    assert "num_graphs=1" in repr(batch)


def reference_collate(items, images):
    """Per-structure loop: [atoms | periodic_images(...) | padding], field by field."""
    rows = []
    for item in items:
        pos, tags = item.pos.float(), item.tags.long()
        cell = item.cell.reshape(3, 3).float()
        img = periodic_images(pos, cell, tags, images) if images is not None else None
        src = torch.arange(pos.shape[0]) if img is None else torch.cat([torch.arange(pos.shape[0]), img.source])
        token_pos = pos if img is None else torch.cat([pos, img.pos])
        rows.append((src, token_pos, pos.shape[0]))
    L = max(len(src) for src, _, _ in rows)
    out = {k: [] for k in ("pos", "atomic_numbers", "tags", "fixed", "is_image", "padding_mask")}
    for item, (src, token_pos, n) in zip(items, rows):
        pad = L - len(src)
        out["pos"].append(torch.cat([token_pos, torch.zeros(pad, 3)]))
        for key, conv in (("atomic_numbers", torch.Tensor.long), ("tags", torch.Tensor.long), ("fixed", torch.Tensor.bool)):
            value = conv(item[key])[src]
            out[key].append(torch.cat([value, value.new_zeros(pad)]))
        out["is_image"].append(torch.arange(L).ge(n) & torch.arange(L).lt(len(src)))
        out["padding_mask"].append(torch.arange(L).ge(len(src)))
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("seed", range(6))
def test_random_batches_match_a_per_structure_loop(seed):
    """Mixed sizes, [3, 3] cells, float64 positions, a single item, image caps, every tag copied."""
    g = torch.Generator().manual_seed(seed)
    B = 1 if seed == 0 else int(torch.randint(2, 7, (1,), generator=g))
    items = []
    for b in range(B):
        item = make_item(int(torch.randint(1, 14, (1,), generator=g)), seed=100 * seed + b, sid=b)
        if b % 2:
            item.cell = item.cell[0]
            item.pos = item.pos.double()
        items.append(item)
    configs = [None, PeriodicImages(cutoff=5.0 + seed), PeriodicImages(cutoff=7.0, copy_tags=None),
               PeriodicImages(cutoff=9.0, centre_tags=(1, 2), max_images=3 + seed)]
    for config in configs:
        batch = collate_atoms(items, images=config)
        if config is not None and config.max_images is not None:
            assert int(batch.is_image.sum(dim=1).max()) <= config.max_images
            continue  # which images survive the cap is tested in test_max_images_caps_the_length
        ref = reference_collate(items, config)
        for key, value in ref.items():
            got = getattr(batch, key)
            assert got.dtype == value.dtype and got.shape == value.shape, key
            if key == "pos":
                torch.testing.assert_close(got, value, rtol=0, atol=1e-6)
            else:
                assert torch.equal(got, value), key
        assert batch.natoms.tolist() == [int(i.pos.shape[0]) for i in items]
        assert batch.sid.tolist() == list(range(B))
        for b, item in enumerate(items):
            n = item.pos.shape[0]
            assert torch.equal(batch.displacement[b, :n], (item.pos_relaxed.float() - item.pos.float()))
            assert batch.displacement[b, n:].eq(0).all()
            assert torch.equal(batch.cell[b], item.cell.reshape(3, 3).float())
