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
        None when any structure lacks pos_relaxed); sid [B] long (-1 where absent);
        pbc [B, 3] bool, periodic flags per cell row (an item's ``pbc`` field, else OC20's slab
        convention ``(True, True, False)``);
        S2EF targets: y [B] float64 (the items' ``y``; None when any structure lacks it) and
        force [B, L, 3] float32 (the items' ``force`` on real atoms, 0 on images and padding;
        None when any structure lacks it).
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
    pbc: torch.Tensor | None = None
    y: torch.Tensor | None = None
    force: torch.Tensor | None = None

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
    # One plain dict per item (Data.to_dict: a shallow copy of the fields). Attribute access
    # on a PyG Data goes through three Python __getattr__ layers, and is needed ~8 times
    # per item.
    fields = [d.to_dict() for d in items]
    counts = [f["pos"].shape[0] for f in fields]
    N, T = max(counts), sum(counts)
    n = torch.tensor(counts, dtype=torch.long)  # [B]
    # Every per-atom field is concatenated once ([T, ...], item after item) and placed with
    # one index_put: far fewer tensor ops than padding item by item (the batch is small, so
    # per-op overhead, not arithmetic, sets the cost).
    pos_flat = torch.cat([f["pos"] for f in fields]).float()  # [T, 3]
    numbers_flat = torch.cat([f["atomic_numbers"] for f in fields]).long()  # [T]
    tags_flat = torch.cat([f["tags"] for f in fields]).long()  # [T]
    fixed_flat = torch.cat([f["fixed"] for f in fields]).bool()  # [T]
    cells = [f["cell"] for f in fields]
    cell = torch.cat([c if c.dim() == 3 else c.reshape(1, 3, 3) for c in cells]).float()
    cell = cell.reshape(B, 3, 3)
    b_of_atom = torch.repeat_interleave(n)  # [T]: structure of each atom
    starts = torch.cumsum(n, 0) - n  # [B]: first flat index of each structure
    atom_of = torch.arange(T) - starts[b_of_atom]  # [T]: index within its structure

    has_relaxed = all("pos_relaxed" in f for f in fields)
    has_y = all("y_relaxed" in f for f in fields)
    y_relaxed = (
        torch.tensor([float(f["y_relaxed"]) for f in fields], dtype=torch.float32)
        if has_y
        else None
    )
    sid = torch.tensor([int(f["sid"]) if "sid" in f else -1 for f in fields], dtype=torch.long)
    y = (torch.tensor([float(f["y"]) for f in fields], dtype=torch.float64)
         if all(f.get("y") is not None for f in fields) else None)
    has_force = all(f.get("force") is not None for f in fields)
    slab = torch.tensor([[True, True, False]])
    pbc = torch.cat([f["pbc"].reshape(1, 3).bool() if "pbc" in f else slab for f in fields])

    if images is not None and len(images.shifts) > 0:
        # The image search works on the padded [B, N] layout; padding rows are masked out.
        padded = b_of_atom * N + atom_of  # [T]: flat index into [B, N]
        pos = pos_flat.new_zeros(B * N, 3)
        pos[padded] = pos_flat
        centre_mask = torch.zeros(B * N, dtype=torch.bool)
        centre_mask[padded] = torch.isin(tags_flat, torch.tensor(images.centre_tags, dtype=torch.long))
        atom_mask = torch.zeros(B * N, dtype=torch.bool)
        atom_mask[padded] = copy_mask(tags_flat, images)
        image_pos, keep, _ = batched_periodic_images(
            pos=pos.view(B, N, 3),
            cell=cell,
            centre_mask=centre_mask.view(B, N),
            atom_mask=atom_mask.view(B, N),
            shifts=images.shift_tensor(),
            cutoff=images.cutoff,
            max_images=images.max_images,
        )
        # Kept images in (structure, shift, atom) order: nonzero lists them that way.
        b_img, k_img, i_img = keep.nonzero(as_tuple=True)  # [M] each
        m = torch.bincount(b_img, minlength=B)  # [B]
        rank = torch.arange(b_img.shape[0]) - (torch.cumsum(m, 0) - m)[b_img]  # [M]
        img_dest = n[b_img] + rank  # [M]: token index, after the structure's real atoms
        img_src = starts[b_img] + i_img  # [M]: flat index of the source atom
        img_pos = image_pos[b_img, k_img, i_img]  # [M, 3]
    else:
        b_img = img_dest = img_src = torch.zeros(0, dtype=torch.long)
        img_pos = pos_flat.new_zeros(0, 3)
        m = torch.zeros(B, dtype=torch.long)
    total = n + m
    L = int(total.max())

    # Tokens: the T real atoms, then the M images; one flat index into [B, L] for all.
    dest = torch.cat([b_of_atom * L + atom_of, b_img * L + img_dest])  # [T + M]
    src = torch.cat([torch.arange(T), img_src])  # [T + M]: flat atom each token copies

    out_pos = pos_flat.new_zeros(B * L, 3)
    out_pos[dest] = torch.cat([pos_flat, img_pos])
    out_numbers = numbers_flat.new_zeros(B * L)
    out_numbers[dest] = numbers_flat[src]
    out_tags = tags_flat.new_zeros(B * L)
    out_tags[dest] = tags_flat[src]
    out_fixed = fixed_flat.new_zeros(B * L)
    out_fixed[dest] = fixed_flat[src]
    is_image = torch.zeros(B * L, dtype=torch.bool)
    is_image[dest[T:]] = True
    padding_mask = torch.arange(L)[None, :] >= total[:, None]

    displacement = None
    if has_relaxed:
        relaxed_flat = torch.cat([f["pos_relaxed"] for f in fields]).float()  # [T, 3]
        displacement = pos_flat.new_zeros(B * L, 3)
        displacement[dest[:T]] = relaxed_flat - pos_flat
        displacement = displacement.view(B, L, 3)
    force = None
    if has_force:
        force = pos_flat.new_zeros(B * L, 3)
        force[dest[:T]] = torch.cat([torch.as_tensor(f["force"]).reshape(-1, 3) for f in fields]).float()
        force = force.view(B, L, 3)

    return AtomsBatch(
        atomic_numbers=out_numbers.view(B, L),
        pos=out_pos.view(B, L, 3),
        tags=out_tags.view(B, L),
        fixed=out_fixed.view(B, L),
        padding_mask=padding_mask,
        is_image=is_image.view(B, L),
        natoms=n,
        cell=cell,
        y_relaxed=y_relaxed,
        displacement=displacement,
        sid=sid,
        pbc=pbc,
        y=y,
        force=force,
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
