"""Periodic images: vectorised enumeration against the brute-force loop."""

from __future__ import annotations

import math

import pytest
import torch

from flt_mol.data.pbc import (
    IN_PLANE_SHIFTS,
    PeriodicImages,
    batched_periodic_images,
    copy_mask,
    periodic_images,
    periodic_images_reference,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_slab(n: int, *, generator: torch.Generator, n_ads: int = 2):
    """A skewed in-plane cell (gamma between 60 and 120 degrees), random atoms, some tag 2."""
    a, b = 4 + 4 * torch.rand(2, generator=generator, dtype=torch.float64)
    gamma = math.pi / 3 + math.pi / 3 * float(torch.rand(1, generator=generator))
    cell = torch.tensor(
        [[float(a), 0.0, 0.0], [float(b) * math.cos(gamma), float(b) * math.sin(gamma), 0.0],
         [0.3, -0.2, 20.0]],
        dtype=torch.float64,
    )
    frac = torch.rand(n, 3, generator=generator, dtype=torch.float64) * torch.tensor([1, 1, 0.4])
    pos = frac @ cell
    tags = torch.randint(0, 2, (n,), generator=generator)
    tags[-n_ads:] = 2
    return pos, cell, tags


def assert_same(got, ref):
    assert torch.equal(got.source, ref.source)
    assert torch.equal(got.shift, ref.shift)
    torch.testing.assert_close(got.pos, ref.pos, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cutoff", [2.0, 4.5, 8.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(cutoff, seed):
    g = torch.Generator().manual_seed(seed)
    pos, cell, tags = random_slab(14, generator=g)
    config = PeriodicImages(cutoff=cutoff)
    got = periodic_images(pos, cell, tags, config)
    ref = periodic_images_reference(pos, cell, tags, config)
    assert_same(got, ref)
    # Property of the definition, independent of the reference loop.
    offsets = got.shift.double() @ cell
    torch.testing.assert_close(got.pos, pos[got.source] + offsets, rtol=0, atol=1e-12)
    centres = pos[tags == 2]
    assert bool((torch.cdist(got.pos, centres).amin(dim=1) < cutoff).all())
    assert bool((tags[got.source] != 2).all())  # the adsorbate is not copied (Graphormer-3D)
    if cutoff == 8.0:
        assert len(got) > 0


def test_custom_shifts_and_centre_tags():
    g = torch.Generator().manual_seed(5)
    pos, cell, tags = random_slab(10, generator=g, n_ads=1)
    config = PeriodicImages(cutoff=6.0, shifts=((1, 0), (2, 0), (0, -1), (0, 0, 1)), centre_tags=(1, 2))
    assert config.shifts == ((1, 0, 0), (2, 0, 0), (0, -1, 0), (0, 0, 1))
    assert_same(periodic_images(pos, cell, tags, config), periodic_images_reference(pos, cell, tags, config))


@pytest.mark.parametrize("copy_tags", [None, (1,), (0, 1, 2)])
def test_copy_tags(copy_tags):
    g = torch.Generator().manual_seed(7)
    pos, cell, tags = random_slab(12, generator=g)
    config = PeriodicImages(cutoff=7.0, copy_tags=copy_tags)
    got = periodic_images(pos, cell, tags, config)
    assert_same(got, periodic_images_reference(pos, cell, tags, config))
    allowed = copy_tags if copy_tags is not None else (0, 1, 2)
    assert set(tags[got.source].tolist()) <= set(allowed)
    if copy_tags is None:
        assert 2 in tags[got.source].tolist()


def test_default_is_eight_in_plane_cells_at_8A():
    config = PeriodicImages()
    assert config.cutoff == 8.0 and config.centre_tags == (2,) and config.copy_tags == (0, 1)
    assert len(IN_PLANE_SHIFTS) == 8 and (0, 0, 0) not in IN_PLANE_SHIFTS
    assert {s[:2] for s in IN_PLANE_SHIFTS} == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)} - {(0, 0)}
    assert all(s[2] == 0 for s in IN_PLANE_SHIFTS)


def test_no_centre_atoms_gives_no_images():
    g = torch.Generator().manual_seed(3)
    pos, cell, tags = random_slab(8, generator=g)
    tags[:] = 1
    assert len(periodic_images(pos, cell, tags)) == 0
    assert len(periodic_images_reference(pos, cell, tags)) == 0


def test_max_images_keeps_the_nearest():
    g = torch.Generator().manual_seed(4)
    pos, cell, tags = random_slab(14, generator=g)
    full = periodic_images(pos, cell, tags, PeriodicImages(cutoff=8.0))
    assert len(full) > 10
    capped = periodic_images(pos, cell, tags, PeriodicImages(cutoff=8.0, max_images=10))
    assert len(capped) == 10
    centres = pos[tags == 2]
    d_full = torch.cdist(full.pos, centres).amin(dim=1)
    d_capped = torch.cdist(capped.pos, centres).amin(dim=1)
    torch.testing.assert_close(d_capped.sort().values, d_full.sort().values[:10], rtol=0, atol=1e-12)
    # Still listed in shift-major order, a subset of the full list.
    keys_full = [(tuple(s.tolist()), int(i)) for s, i in zip(full.shift, full.source)]
    keys_capped = [(tuple(s.tolist()), int(i)) for s, i in zip(capped.shift, capped.source)]
    assert keys_capped == [k for k in keys_full if k in set(keys_capped)]


def test_batched_equals_per_structure():
    g = torch.Generator().manual_seed(6)
    slabs = [random_slab(n, generator=g) for n in (5, 11, 8)]
    N = 11
    pos = torch.zeros(3, N, 3, dtype=torch.float64)
    tags = torch.zeros(3, N, dtype=torch.long)
    atom_mask = torch.zeros(3, N, dtype=torch.bool)
    for b, (p, _, t) in enumerate(slabs):
        pos[b, : len(p)] = p
        tags[b, : len(p)] = t
        atom_mask[b, : len(p)] = True
    cell = torch.stack([c for _, c, _ in slabs])
    config = PeriodicImages(cutoff=6.0)
    image_pos, keep, _ = batched_periodic_images(
        pos=pos, cell=cell, centre_mask=atom_mask & (tags == 2),
        atom_mask=atom_mask & copy_mask(tags, config),
        shifts=config.shift_tensor(), cutoff=config.cutoff,
    )
    for b, (p, c, t) in enumerate(slabs):
        ref = periodic_images_reference(p, c, t, config)
        k_idx, i_idx = keep[b].nonzero(as_tuple=True)
        assert len(ref) > 0 and torch.equal(i_idx, ref.source)
        torch.testing.assert_close(image_pos[b, k_idx, i_idx], ref.pos, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cutoff=0.0), "cutoff"),
        (dict(shifts=((0, 0),)), "cell itself"),
        (dict(shifts=((1, 0, 0, 0),)), "2 or 3"),
        (dict(shifts=((1, 0), (1, 0, 0))), "duplicate"),
        (dict(max_images=-1), "max_images"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PeriodicImages(**kwargs)
