"""Random-rotation augmentation of IS2RE training batches."""

from __future__ import annotations

import torch

from flt_mol.data.collate import Collater, PeriodicImages
from flt_mol.train.tasks import random_rotations, rotate_batch
from tests.train.helpers import make_items


def test_rotations_are_proper_keyed_by_id_and_vary():
    keys = torch.tensor([1000, 1001, 1002, 7])
    rot = random_rotations(keys, seed=0, step=5)
    eye = torch.eye(3, dtype=rot.dtype).expand_as(rot)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(4, dtype=rot.dtype), atol=1e-12)
    # The same structure gets the same rotation alone or in another batch (DDP splits batches).
    assert torch.equal(random_rotations(torch.tensor([1002]), seed=0, step=5)[0], rot[2])
    # Different steps, seeds and structures give different rotations.
    assert not torch.allclose(random_rotations(keys, seed=0, step=6), rot)
    assert not torch.allclose(random_rotations(keys, seed=1, step=5), rot)
    assert not torch.allclose(rot[0], rot[1])


def test_rotations_are_uniform():
    """Haar measure on SO(3): E[R] = 0 and E[R_ij^2] = 1/3, within 5 standard errors."""
    n = 4000
    rot = random_rotations(torch.arange(n), seed=3, step=1)
    mean = rot.mean(0)
    assert mean.abs().max() < 5 * (1 / 3) ** 0.5 / n**0.5
    second = (rot**2).mean(0)
    assert (second - 1 / 3).abs().max() < 5 * 0.3 / n**0.5


def test_rotating_the_collated_batch_equals_collating_rotated_structures():
    items = make_items(3, seed=4)
    collate = Collater(images=PeriodicImages(cutoff=4.0))
    batch = collate(items)
    assert bool(batch.is_image.any())  # the test must cover periodic images
    rot = random_rotations(batch.sid, seed=0, step=1)
    turned = rotate_batch(batch, rot)
    rotated_items = []
    for d, r in zip(items, rot.float()):
        m = d.clone()
        m.pos, m.cell, m.pos_relaxed = d.pos @ r.T, d.cell @ r.T, d.pos_relaxed @ r.T
        rotated_items.append(m)
    ref = collate(rotated_items)
    assert torch.equal(ref.is_image, turned.is_image) and torch.equal(ref.padding_mask, turned.padding_mask)
    keep = ~ref.padding_mask
    assert torch.allclose(turned.pos[keep], ref.pos[keep], atol=1e-4)
    assert torch.allclose(turned.cell, ref.cell, atol=1e-5)
    assert torch.allclose(turned.displacement[keep], ref.displacement[keep], atol=1e-5)
    # Distances (what the energy may depend on) are unchanged.
    d0 = torch.cdist(batch.pos, batch.pos)
    d1 = torch.cdist(turned.pos, turned.pos)
    assert torch.allclose(d0, d1, atol=1e-4)
