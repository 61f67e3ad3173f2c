"""Periodic images around adsorbates (Graphormer-3D, Shi et al. 2022).

OC20 slabs are periodic in the a-b plane. Graphormer-3D adds, as extra tokens, the copies of
slab atoms in the 8 in-plane neighbour cells that lie within a cutoff (8 A) of any adsorbate
atom (adsorbate atoms themselves are not copied):

    image(i, s) = pos_i + s @ cell,   s in S = {-1, 0, 1}^2 x {0} minus (0, 0, 0)
    kept  iff   tag_i in copy_tags  and  min_{c : tag_c in centre_tags} |image(i, s) - pos_c| < cutoff

An image inherits the atomic number, tag and ``fixed`` flag of its source atom ``i``. Everything
here is vectorised over shifts, atoms and (for :func:`batched_periodic_images`) structures;
:func:`periodic_images_reference` is the plain loop used as test oracle.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

__all__ = [
    "IN_PLANE_SHIFTS",
    "PeriodicImages",
    "ImageSet",
    "periodic_images",
    "batched_periodic_images",
    "periodic_images_reference",
    "copy_mask",
]

# The 8 in-plane neighbour cells, in a fixed order (images are listed shift by shift).
IN_PLANE_SHIFTS: tuple[tuple[int, int, int], ...] = tuple(
    (a, b, 0) for a, b in itertools.product((-1, 0, 1), repeat=2) if (a, b) != (0, 0)
)


def _normalise_shifts(shifts: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for s in shifts:
        s = tuple(int(v) for v in s)
        if len(s) == 2:
            s = (s[0], s[1], 0)
        if len(s) != 3:
            raise ValueError(f"PeriodicImages.shifts: each shift needs 2 or 3 integers, got {s}")
        if s == (0, 0, 0):
            raise ValueError("PeriodicImages.shifts: (0, 0, 0) is the cell itself, not an image")
        out.append(s)
    if len(set(out)) != len(out):
        raise ValueError(f"PeriodicImages.shifts: duplicate shifts in {out}")
    return tuple(out)


@dataclass(frozen=True)
class PeriodicImages:
    """Which periodic images to add as tokens.

    Args:
        cutoff: keep an image closer than this (Angstrom, strict) to any centre atom.
        shifts: lattice shifts (integer multiples of the cell rows); 2-tuples mean (a, b, 0).
        centre_tags: tags of the centre atoms (OC20: 2 = adsorbate).
        copy_tags: tags of the atoms that get images (default: the slab, 0 and 1, as in
            Graphormer-3D, which does not copy the adsorbate); None = every atom.
        max_images: keep at most this many images per structure (the nearest to a centre);
            None = no limit.
    """

    cutoff: float = 8.0
    shifts: tuple[tuple[int, ...], ...] = IN_PLANE_SHIFTS
    centre_tags: tuple[int, ...] = (2,)
    copy_tags: tuple[int, ...] | None = (0, 1)
    max_images: int | None = None

    def __post_init__(self) -> None:
        if not self.cutoff > 0:
            raise ValueError(f"PeriodicImages.cutoff must be > 0, got {self.cutoff}")
        object.__setattr__(self, "shifts", _normalise_shifts(tuple(self.shifts)))
        object.__setattr__(self, "centre_tags", tuple(int(t) for t in self.centre_tags))
        if self.copy_tags is not None:
            object.__setattr__(self, "copy_tags", tuple(int(t) for t in self.copy_tags))
        if self.max_images is not None and self.max_images < 0:
            raise ValueError(f"PeriodicImages.max_images must be >= 0, got {self.max_images}")

    def shift_tensor(self) -> torch.Tensor:
        """Shifts as LongTensor [K, 3]."""
        return torch.tensor(self.shifts, dtype=torch.long).view(-1, 3)


@dataclass
class ImageSet:
    """Periodic images of one structure.

    Shapes: pos [M, 3] float, source [M] long (index of the original atom), shift [M, 3] long.
    """

    pos: torch.Tensor
    source: torch.Tensor
    shift: torch.Tensor

    def __len__(self) -> int:
        return self.source.shape[0]


def batched_periodic_images(
    *,
    pos: torch.Tensor,
    cell: torch.Tensor,
    centre_mask: torch.Tensor,
    atom_mask: torch.Tensor,
    shifts: torch.Tensor,
    cutoff: float,
    max_images: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidate images of a padded batch and which of them to keep.

    Args:
        pos: [B, N, 3] positions (padding rows arbitrary).
        cell: [B, 3, 3] lattice vectors as rows.
        centre_mask: [B, N] bool, True for centre atoms (e.g. adsorbate).
        atom_mask: [B, N] bool, True for the atoms that may be copied (real atoms, and only
            those with a copy tag).
        shifts: [K, 3] integer lattice shifts.
        cutoff: keep distance (strict: ``dist < cutoff``).
        max_images: per structure, keep only the nearest this many.

    Returns:
        image_pos [B, K, N, 3], keep [B, K, N] bool, dist [B, K, N] (distance to the nearest
        centre; inf where there is no centre or no atom).
    """
    B, N, _ = pos.shape
    K = shifts.shape[0]
    # offsets[b, k] = shifts[k] @ cell[b]; a broadcast matmul (einsum's parsing costs more
    # than the product at these sizes).
    offsets = torch.matmul(shifts.to(pos.dtype), cell.to(pos.dtype))  # [B,K,3]
    image_pos = pos[:, None, :, :] + offsets[:, :, None, :]  # [B,K,N,3]
    # Gather the (few) centres of each structure into [B, C, 3]: a stable sort puts each
    # structure's centre atoms first, so rows j < C_b are its centres.
    n_centres = centre_mask.sum(dim=1)  # [B]
    C = int(n_centres.max()) if B > 0 else 0
    if C == 0:
        dist = pos.new_full((B, K, N), float("inf"))
    else:
        order = torch.sort((~centre_mask).to(torch.uint8), dim=1, stable=True).indices[:, :C]
        centres = torch.gather(pos, 1, order[:, :, None].expand(B, C, 3))  # [B, C, 3]
        # Exact pairwise distances (no |a|^2+|b|^2-2ab cancellation near the cutoff).
        d = torch.cdist(
            image_pos.reshape(B, K * N, 3), centres, compute_mode="donot_use_mm_for_euclid_dist"
        )  # [B, K*N, C]
        valid = torch.arange(C, device=pos.device)[None, :] < n_centres[:, None]  # [B, C]
        dist = d.masked_fill(~valid[:, None, :], float("inf")).amin(dim=2).view(B, K, N)
    dist = dist.masked_fill(~atom_mask[:, None, :], float("inf"))
    keep = dist < cutoff
    if max_images is not None and K * N > max_images:
        flat = dist.masked_fill(~keep, float("inf")).reshape(B, K * N)
        order = torch.sort(flat, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(K * N, device=pos.device).expand(B, -1)
        )
        keep = keep & (rank < max_images).view(B, K, N)
    return image_pos, keep, dist


def copy_mask(tags: torch.Tensor, config: PeriodicImages) -> torch.Tensor:
    """[..., N] bool: atoms whose images may be added (``config.copy_tags``)."""
    if config.copy_tags is None:
        return torch.ones_like(tags, dtype=torch.bool)
    return torch.isin(tags.long(), torch.tensor(config.copy_tags, dtype=torch.long))


def periodic_images(
    pos: torch.Tensor,
    cell: torch.Tensor,
    tags: torch.Tensor,
    config: PeriodicImages | None = None,
) -> ImageSet:
    """Periodic images of one structure (vectorised).

    Args:
        pos: [N, 3] positions; cell: [3, 3] or [1, 3, 3]; tags: [N].
        config: which images (default :class:`PeriodicImages()`: 8 in-plane cells, 8 A around
            tag-2 atoms).

    Returns:
        :class:`ImageSet` listed shift by shift (in ``config.shifts`` order), then by atom index.
    """
    config = config if config is not None else PeriodicImages()
    shifts = config.shift_tensor()
    tags = tags.long()
    centre = torch.isin(tags, torch.tensor(config.centre_tags, dtype=torch.long))
    image_pos, keep, _ = batched_periodic_images(
        pos=pos[None],
        cell=cell.reshape(1, 3, 3),
        centre_mask=centre[None],
        atom_mask=copy_mask(tags, config)[None],
        shifts=shifts,
        cutoff=config.cutoff,
        max_images=config.max_images,
    )
    k_idx, i_idx = keep[0].nonzero(as_tuple=True)
    return ImageSet(pos=image_pos[0, k_idx, i_idx], source=i_idx, shift=shifts[k_idx])


def periodic_images_reference(
    pos: torch.Tensor,
    cell: torch.Tensor,
    tags: torch.Tensor,
    config: PeriodicImages | None = None,
) -> ImageSet:
    """Plain-loop enumeration of :func:`periodic_images` (test oracle; no ``max_images``)."""
    config = config if config is not None else PeriodicImages()
    cell = cell.reshape(3, 3).double()
    p = pos.double()
    centres = [c for c in range(p.shape[0]) if int(tags[c]) in config.centre_tags]
    out_pos, out_src, out_shift = [], [], []
    for s in config.shifts:
        offset = sum(s[j] * cell[j] for j in range(3))
        for i in range(p.shape[0]):
            if config.copy_tags is not None and int(tags[i]) not in config.copy_tags:
                continue
            image = p[i] + offset
            if any(float(torch.linalg.norm(image - p[c])) < config.cutoff for c in centres):
                out_pos.append(image)
                out_src.append(i)
                out_shift.append(s)
    return ImageSet(
        pos=torch.stack(out_pos).to(pos.dtype) if out_pos else pos.new_zeros(0, 3),
        source=torch.tensor(out_src, dtype=torch.long),
        shift=torch.tensor(out_shift, dtype=torch.long).view(-1, 3),
    )
