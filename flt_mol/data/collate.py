"""Pad OC20 structures (plus their periodic images) into a dense batch for transformers.

Token layout per structure ``b`` (length ``L`` = longest structure + its images in the batch):

    [ real atoms 0..n_b-1 | images (shift by shift, then by source atom) | padding ]

``padding_mask`` is True on padding, ``is_image`` on images, ``real_mask = ~padding & ~image``.
Images copy atomic number, tag and ``fixed`` from their source atom; their displacement is 0 and
they must be kept out of energy and node losses (use ``real_mask``). Which images are added is
set by :class:`flt_mol.data.pbc.PeriodicImages` (Graphormer-3D's default: slab atoms of the 8
in-plane neighbour cells closer than 8 A to an adsorbate atom).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch.nn.utils.rnn import pad_sequence
from torch_geometric.data import Data

from flt_mol.data.pbc import PeriodicImages, batched_periodic_images, copy_mask

__all__ = ["AtomsBatch", "PeriodicImages", "collate_atoms", "Collater"]


@dataclass
class AtomsBatch:
    """A padded batch of atomic structures.

    Shapes (B structures, L tokens):
        atomic_numbers [B, L] long (0 on padding); pos [B, L, 3] float32; tags [B, L] long;
        fixed [B, L] bool; padding_mask [B, L] bool (True = pad); is_image [B, L] bool;
        natoms [B] long (real atoms, images excluded); cell [B, 3, 3] float32;
        y_relaxed [B] float32 or None (None when any structure lacks it);
        displacement [B, L, 3] float32 or None (pos_relaxed - pos on real atoms, 0 elsewhere;
        None when any structure lacks pos_relaxed); sid [B] long (-1 where absent).
    """

    atomic_numbers: torch.Tensor
    pos: torch.Tensor
    tags: torch.Tensor
    fixed: torch.Tensor
    padding_mask: torch.Tensor
    is_image: torch.Tensor
    natoms: torch.Tensor
    cell: torch.Tensor
    y_relaxed: torch.Tensor | None
    displacement: torch.Tensor | None
    sid: torch.Tensor

    @property
    def real_mask(self) -> torch.Tensor:
        """[B, L] bool: real atoms (not padding, not images)."""
        return ~self.padding_mask & ~self.is_image

    @property
    def num_graphs(self) -> int:
        return self.natoms.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> AtomsBatch:
        """A copy with every tensor on ``device``."""
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v)
            for f in fields(self)
            for v in (getattr(self, f.name),)
        }
        return replace(self, **moved)

    def pin_memory(self) -> AtomsBatch:
        """Used by ``DataLoader(pin_memory=True)``."""
        pinned = {
            f.name: (v.pin_memory() if torch.is_tensor(v) else v)
            for f in fields(self)
            for v in (getattr(self, f.name),)
        }
        return replace(self, **pinned)

    def __repr__(self) -> str:
        B, L = self.padding_mask.shape
        images = int(self.is_image.sum())
        return (
            f"AtomsBatch(num_graphs={B}, tokens={L}, atoms={int(self.natoms.sum())}, "
            f"images={images}, targets={self.y_relaxed is not None})"
        )


def _pad(tensors: list[torch.Tensor]) -> torch.Tensor:
    return pad_sequence(tensors, batch_first=True)


def collate_atoms(items: Sequence[Data], *, images: PeriodicImages | None = None) -> AtomsBatch:
    """Pad OC20 ``Data`` items (see :class:`flt_mol.data.oc20.OC20LMDB`) into an :class:`AtomsBatch`.

    Args:
        items: structures with pos, cell, atomic_numbers, tags, fixed (and optionally
            y_relaxed, pos_relaxed, sid).
        images: periodic-image configuration; None = no images.
    """
    if len(items) == 0:
        raise ValueError("collate_atoms: empty list of structures")
    B = len(items)
    pos_list = [d.pos for d in items]
    n = torch.tensor([p.shape[0] for p in pos_list], dtype=torch.long)  # [B]
    pos = _pad(pos_list).float()  # [B, N, 3]
    N = pos.shape[1]
    numbers = _pad([d.atomic_numbers for d in items]).long()  # [B, N]
    tags = _pad([d.tags for d in items]).long()
    fixed = _pad([d.fixed for d in items]).bool()
    cell = torch.stack([d.cell.reshape(3, 3) for d in items]).float()  # [B, 3, 3]
    atom_mask = torch.arange(N)[None, :] < n[:, None]  # [B, N]

    keys = [d.keys() for d in items]
    has_relaxed = all("pos_relaxed" in k for k in keys)
    has_y = all("y_relaxed" in k for k in keys)
    y_relaxed = (
        torch.tensor([float(d.y_relaxed) for d in items], dtype=torch.float32) if has_y else None
    )
    sid = torch.tensor(
        [int(d.sid) if "sid" in k else -1 for d, k in zip(items, keys)], dtype=torch.long
    )

    if images is not None and len(images.shifts) > 0:
        centre_mask = atom_mask & torch.isin(
            tags, torch.tensor(images.centre_tags, dtype=torch.long)
        )
        image_pos, keep, _ = batched_periodic_images(
            pos=pos,
            cell=cell,
            centre_mask=centre_mask,
            atom_mask=atom_mask & copy_mask(tags, images),
            shifts=images.shift_tensor(),
            cutoff=images.cutoff,
            max_images=images.max_images,
        )
        keep = keep.reshape(B, -1)  # [B, K*N], ordered shift-major
        m = keep.sum(dim=1)  # [B]
    else:
        keep = None
        m = torch.zeros(B, dtype=torch.long)
    total = n + m
    L = int(total.max())

    out_pos = pos.new_zeros(B, L, 3)
    out_pos[:, :N] = pos
    out_numbers = numbers.new_zeros(B, L)
    out_numbers[:, :N] = numbers
    out_tags = tags.new_zeros(B, L)
    out_tags[:, :N] = tags
    out_fixed = fixed.new_zeros(B, L)
    out_fixed[:, :N] = fixed
    is_image = torch.zeros(B, L, dtype=torch.bool)

    if keep is not None and bool(m.any()):
        b_idx, flat_idx = keep.nonzero(as_tuple=True)
        rank = keep.long().cumsum(dim=1) - 1  # [B, K*N]: index among kept images
        dest = n[b_idx] + rank[b_idx, flat_idx]
        src = flat_idx % N
        out_pos[b_idx, dest] = image_pos.reshape(B, -1, 3)[b_idx, flat_idx]
        out_numbers[b_idx, dest] = numbers[b_idx, src]
        out_tags[b_idx, dest] = tags[b_idx, src]
        out_fixed[b_idx, dest] = fixed[b_idx, src]
        is_image[b_idx, dest] = True

    padding_mask = torch.arange(L)[None, :] >= total[:, None]

    displacement = None
    if has_relaxed:
        relaxed = _pad([d.pos_relaxed for d in items]).float()  # [B, N, 3]
        displacement = pos.new_zeros(B, L, 3)
        # Padding rows of both are zero, so the difference is zero there too.
        displacement[:, :N] = relaxed - pos

    return AtomsBatch(
        atomic_numbers=out_numbers,
        pos=out_pos,
        tags=out_tags,
        fixed=out_fixed,
        padding_mask=padding_mask,
        is_image=is_image,
        natoms=n,
        cell=cell,
        y_relaxed=y_relaxed,
        displacement=displacement,
        sid=sid,
    )


@dataclass(frozen=True)
class Collater:
    """Picklable ``collate_fn`` for ``DataLoader``: ``Collater(PeriodicImages())(items)``.

    Args:
        images: periodic-image configuration; None = no images.
    """

    images: PeriodicImages | None = None

    def __call__(self, items: Sequence[Data]) -> AtomsBatch:
        return collate_atoms(items, images=self.images)
