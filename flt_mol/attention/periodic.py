"""Exactly periodic RPE: random Fourier features on each structure's reciprocal lattice (DESIGN §7).

For a structure with lattice vectors ``a_1..a_P`` (``P = 3`` bulk, ``P = 2`` slab periodic in the
a-b plane, ``P = 0`` molecule) the periodic mask is the lattice sum of ``f``,
``f_per(r) = sum_n f(r + n A)``. Poisson summation turns it into a sum over the reciprocal lattice
(continuous along the directions that are not periodic)::

    f_per(r) = (1/V_P) sum_m  int ghat(k_m + kappa) cos(2 pi (k_m + kappa) . r) dkappa

with ``V_P`` the covolume (volume for P = 3, area for P = 2, 1 for P = 0). Drawing ``q ~ p`` and
weighting by ``a = ghat(k_q) / (V_P p(q))`` gives random features whose inner product has
expectation ``f_per``; because ``k_m . n A = m . n`` is an integer, every single draw is exactly
invariant to wrapping atoms by lattice vectors. Phases are computed from wrapped fractional
coordinates, ``2 pi q . u``, which keeps them accurate in fp32.

Everything here works in the **reduced frame** of each structure: the cell is reduced (Gauss in
2D, greedy Minkowski in 3D) with fixed sign conventions, and positions are rotated into the
orthonormal frame ``(e1 = a/|a|, e3 = normal, e2 = e3 x e1)``. In that frame the lattice rows form
a lower-triangular ``basis`` ``L`` (rows: ``P`` lattice vectors, then the unit axes of the
non-periodic directions), so ``r = u L`` and ``k L^T = q``. Equivalent cells and rotated copies
therefore give identical draws (for lattices whose reduced basis is unique; at ties, e.g. the
hexagonal and square lattices, the choice among symmetric bases follows the input basis).

The "snap" sampler: a continuous frequency ``xi`` (from the fixed noise) is rounded coordinate by
coordinate to the reciprocal-lattice vector whose box ``prod_j [k_j - 1/(2 L_jj), k_j + 1/(2 L_jj))``
contains it; the boxes tile space, so ``p(q)`` is the box mass of the proposal (closed form with
``log_ndtr``). Non-periodic coordinates stay continuous with their Gaussian density.

Shapes: ``B`` structures, ``L`` atoms, ``H`` heads (or channels), ``F`` frequencies, ``T`` terms.
Einsum letters: b batch, h heads, l atoms, f frequencies, i/j coordinates.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

__all__ = [
    "PeriodicLattice",
    "LatticeCache",
    "cell_frame",
    "reduce_cell_2d",
    "reduce_cell_3d",
    "periodic_dims_from_pbc",
    "snap_frequencies",
    "log_box_mass",
    "periodic_mixture_log_density",
    "lattice_images",
    "gaussian_lattice_sum",
    "gaussian_fourier_sum",
]

_TIE = 1e-5  # relative tolerance of the reduction's comparisons: above fp32 rounding of stored cells (~1e-7)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(-1)


def _round_tie_to_zero(x: torch.Tensor) -> torch.Tensor:
    """``round(x)``, but halves within ``_TIE`` round towards zero.

    Size reduction divides ``a.b / a.a``, which is exactly 1/2 for hexagonal cells (60 degrees):
    rounding noise (e.g. of a rotated copy of the cell) would otherwise pick ``b`` or ``b - a``
    at random, two equally reduced bases with different frames.
    """
    frac = x.abs() - torch.floor(x.abs())
    tie = (frac - 0.5).abs() <= _TIE * torch.clamp(x.abs(), min=1.0)
    return torch.where(tie, torch.trunc(x), torch.round(x))


def reduce_cell_2d(a: torch.Tensor, b: torch.Tensor, normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Lagrange reduction of the plane lattice ``(a, b)``, oriented right-handed about ``normal``.

    Returns ``(a', b')`` spanning the same lattice with ``|a'| <= |b'|``, ``|a'.b'| <= |a'|^2 / 2``
    and ``(a' x b') . normal > 0``, and ``a'.b' > -|a'|^2/2`` at the rounding tie. The result is
    unique up to ``(a', b') -> (-a', -b')`` (a rotation by pi about the normal, which every plane
    lattice has; the periodic features are made exactly symmetric under it) and, on lattices with
    several shortest vectors (square, hexagonal), up to which of them comes first.

    Shapes: ``a, b, normal [B, 3]`` fp64 -> two ``[B, 3]``.
    """
    a, b = a.clone(), b.clone()
    for _ in range(100):
        mu = _round_tie_to_zero(_dot(a, b) / _dot(a, a))
        b = b - mu[:, None] * a
        swap = _dot(b, b) < _dot(a, a) * (1.0 - _TIE)
        if not bool(swap.any()) and bool((mu == 0).all()):
            break
        a, b = torch.where(swap[:, None], b, a), torch.where(swap[:, None], a, b)
    flip = _dot(torch.linalg.cross(a, b), normal) < 0
    b = torch.where(flip[:, None], -b, b)
    # At the rounding tie a.b = -|a|^2/2 (hexagonal lattices among others) b and b + a are equally
    # short: take the acute one, so that (a, b) and (a, b + a) reduce to the same basis.
    obtuse_tie = _dot(a, b) < -0.5 * _dot(a, a) * (1.0 - _TIE)
    b = torch.where(obtuse_tie[:, None], b + a, b)
    return a, b


def reduce_cell_3d(cell: torch.Tensor) -> torch.Tensor:
    """Greedy (Minkowski) reduction of a 3D lattice with Niggli-style sign conventions.

    The rows of the result span the same lattice, are sorted by length, no vector can be
    shortened by adding integer combinations of the others (pairs and ``c +- a +- b``), the three
    scalar products ``a.b, b.c, a.c`` are all positive or all non-positive, and the basis is
    right-handed. For lattices without ties the result is unique: equivalent cells give the same
    rows.

    Shapes: ``cell [B, 3, 3]`` fp64 (rows = lattice vectors) -> ``[B, 3, 3]``.
    """
    v = cell.clone()
    B = v.shape[0]
    ar = torch.arange(B, device=v.device)
    signs = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=v.dtype, device=v.device)
    for _ in range(200):
        changed = torch.zeros(B, dtype=torch.bool, device=v.device)
        order = torch.argsort(_dot(v, v), dim=1)
        v = v[ar[:, None], order]
        for i, j in ((1, 0), (2, 0), (2, 1)):  # size-reduce j against i's predecessors
            mu = _round_tie_to_zero(_dot(v[:, i], v[:, j]) / _dot(v[:, j], v[:, j]))
            new = v[:, i] - mu[:, None] * v[:, j]
            better = _dot(new, new) < _dot(v[:, i], v[:, i]) * (1.0 - _TIE)
            v[:, i] = torch.where(better[:, None], new, v[:, i])
            changed |= better
        # c + s1 a + s2 b for the four sign pairs: the last greedy step in three dimensions.
        cand = v[:, None, 2] + signs[None, :, 0:1] * v[:, None, 0] + signs[None, :, 1:2] * v[:, None, 1]
        n2 = _dot(cand, cand)  # [B, 4]
        best, idx = n2.min(dim=1)
        better = best < _dot(v[:, 2], v[:, 2]) * (1.0 - _TIE)
        v[:, 2] = torch.where(better[:, None], cand[ar, idx], v[:, 2])
        changed |= better
        if not bool(changed.any()):
            break
    v = v[ar[:, None], torch.argsort(_dot(v, v), dim=1)]
    ab, bc, ac = _dot(v[:, 0], v[:, 1]), _dot(v[:, 1], v[:, 2]), _dot(v[:, 0], v[:, 2])

    def sgn(x):
        return torch.where(x >= 0, 1.0, -1.0).to(v.dtype)

    positive = (sgn(ab) * sgn(bc) * sgn(ac)) > 0
    # all-acute (product > 0) or all-obtuse: flip b and c relative to a.
    eb = torch.where(positive, sgn(ab), -sgn(ab))
    ec = torch.where(positive, sgn(ac), -sgn(ac))
    v = torch.stack([v[:, 0], v[:, 1] * eb[:, None], v[:, 2] * ec[:, None]], dim=1)
    left = torch.linalg.det(v) < 0
    return torch.where(left[:, None, None], -v, v)


def periodic_dims_from_pbc(pbc: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P [B] long, order [B, 3] long)``: the number of periodic directions and the cell-row order
    that lists the periodic rows first. Supports 0, 2 or 3 periodic directions per structure.

    ``pbc``: ``[3]`` or ``[B, 3]`` bool (True = periodic along that cell row).
    """
    if not torch.is_tensor(pbc):
        pbc = torch.as_tensor(pbc)
    pbc = pbc.bool()
    if pbc.dim() == 1:
        pbc = pbc[None].expand(batch, 3)
    if pbc.shape != (batch, 3):
        raise ValueError(f"pbc must be [3] or [B, 3] = [{batch}, 3], got {tuple(pbc.shape)}")
    P = pbc.sum(-1).long()
    if bool((P == 1).any()):
        raise ValueError("pbc with exactly one periodic direction (a wire) is not supported; use 0, 2 or 3")
    # Stable argsort of ~pbc puts the periodic rows first, keeping their order.
    order = torch.argsort((~pbc).to(torch.int8), dim=1, stable=True)
    return P, order


@dataclass(frozen=True)
class PeriodicLattice:
    """Per-structure periodic geometry in the reduced frame (see the module docstring).

    Attributes:
        frame: ``[B, 3, 3]`` fp64 rotation, columns ``e1, e2, e3``; frame coordinates ``r @ frame``.
        basis: ``[B, 3, 3]`` fp64 lower-triangular; rows ``0..P-1`` the reduced lattice vectors in
            frame coordinates, the other rows the unit axes.
        periodic_dims: ``[B]`` long, ``P`` in {0, 2, 3}.
        covolume: ``[B]`` fp64, ``prod_{j < P} basis_jj`` (volume, area or 1).
    """

    frame: torch.Tensor
    basis: torch.Tensor
    periodic_dims: torch.Tensor
    covolume: torch.Tensor

    @property
    def num_structures(self) -> int:
        return self.frame.shape[0]

    @classmethod
    def from_cell(cls, cell: torch.Tensor, pbc: torch.Tensor | None = None) -> "PeriodicLattice":
        """Reduce each cell and build its frame.

        Args:
            cell: ``[B, 3, 3]`` (or ``[3, 3]``), rows = lattice vectors (any length unit).
            pbc: ``[B, 3]`` or ``[3]`` bool; default ``(True, True, False)``, OC20's slabs (periodic
                in the a-b plane, the third row spanning the vacuum). Structures with no periodic
                direction use the frame of their (input) cell when it is not degenerate, else the
                identity.
        """
        if not torch.is_tensor(cell) or cell.shape[-2:] != (3, 3) or cell.dim() not in (2, 3):
            shape = tuple(cell.shape) if torch.is_tensor(cell) else type(cell).__name__
            raise ValueError(f"cell must be [B, 3, 3] or [3, 3], got {shape}")
        cell = (cell[None] if cell.dim() == 2 else cell).double()
        B = cell.shape[0]
        if pbc is None:
            pbc = torch.tensor([True, True, False], device=cell.device)
        P, order = periodic_dims_from_pbc(pbc.to(cell.device) if torch.is_tensor(pbc) else pbc, B)
        P = P.to(cell.device)
        rows = torch.gather(cell, 1, order.to(cell.device)[..., None].expand(-1, -1, 3))
        a, b, c = rows[:, 0], rows[:, 1], rows[:, 2]
        # Degenerate periodic cells cannot be reduced: say which structure.
        vol = torch.linalg.det(rows).abs()
        area = torch.linalg.cross(a, b).norm(dim=-1)
        scale = rows.norm(dim=-1).max(dim=-1).values.clamp_min(1e-300)
        bad = ((P == 3) & (vol <= 1e-8 * scale**3)) | ((P == 2) & (area <= 1e-8 * scale**2))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"structure {i}: periodic cell is degenerate (cell rows {rows[i].tolist()})")

        # 3D: reduce all three rows. 2D: reduce (a, b) about the normal that points along c.
        # (Skipped when no row is 3D-periodic: the reduction is a loop of small ops, and its
        # result is used on 3D rows only.)
        eye3 = torch.eye(3, dtype=rows.dtype, device=rows.device).expand_as(rows)
        red3 = reduce_cell_3d(torch.where((P == 3)[:, None, None], rows, eye3)) if bool((P == 3).any()) else eye3
        cross_ab = torch.linalg.cross(a, b)
        normal = cross_ab / cross_ab.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        normal = torch.where((_dot(normal, c) < 0)[:, None], -normal, normal)
        ra, rb = reduce_cell_2d(a, b, normal)

        A = torch.where((P == 3)[:, None], red3[:, 0], ra)
        Bv = torch.where((P == 3)[:, None], red3[:, 1], rb)
        e1 = A / A.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        e3 = torch.linalg.cross(A, Bv)
        e3 = e3 / e3.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        e2 = torch.linalg.cross(e3, e1)
        frame = torch.stack([e1, e2, e3], dim=-1)  # columns
        # Molecules: the frame of the input cell where it has one (rotation invariance per draw).
        frame0 = cell_frame(cell)
        frame = torch.where((P == 0)[:, None, None], frame0, frame)

        eye = torch.eye(3, dtype=cell.dtype, device=cell.device).expand(B, 3, 3)
        basis3 = red3 @ frame
        basis2 = torch.stack([ra, rb, frame[..., 2]], dim=1) @ frame  # rows a, b, e3 in frame coordinates
        basis = torch.where((P == 3)[:, None, None], basis3, torch.where((P == 2)[:, None, None], basis2, eye))
        # Exactly lower-triangular (rounding leaves ~1e-16 above the diagonal).
        basis = torch.tril(basis)
        diag = torch.diagonal(basis, dim1=-2, dim2=-1)
        covolume = torch.where(P == 3, diag.prod(-1), torch.where(P == 2, diag[:, 0] * diag[:, 1], torch.ones_like(diag[:, 0])))
        return cls(frame=frame, basis=basis, periodic_dims=P, covolume=covolume)

    def to(self, device) -> "PeriodicLattice":
        return PeriodicLattice(*(t.to(device) for t in (self.frame, self.basis, self.periodic_dims, self.covolume)))

    def fractional(
        self,
        pos: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        origin_weights: torch.Tensor | None = None,
        *,
        sign: str = "structure",
    ) -> torch.Tensor:
        """Coordinates ``u`` with ``r_frame = u @ basis`` from a canonical origin, wrapped to ``[0, 1)``
        on the periodic directions (the first output of :meth:`orient`). Shapes: ``[B, L, 3]`` fp64."""
        return self.orient(pos, padding_mask, origin_weights, sign=sign)[0]

    def orient(
        self,
        pos: torch.Tensor,
        padding_mask: torch.Tensor | None = None,
        origin_weights: torch.Tensor | None = None,
        *,
        sign: str = "structure",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Canonical coordinates of a structure: ``(u [B, L, 3] fp64, frame [B, 3, 3] fp64)``.

        ``u`` is measured from a canonical origin, which makes it exactly invariant to translating
        the structure as well as to wrapping atoms: on a periodic direction the origin is the
        weighted circular mean of the fractional coordinates, ``arg sum_i w_i exp(2 pi i u_ij) / 2 pi``
        (invariant to wrapping, shifts with a translation); on the others the weighted mean. Phase
        differences (the mask) never depend on it; FAVOR+ features of ``[n1, q]`` do, so this is
        what makes the periodic FLT attention translation invariant for one feature draw. It is
        ill-conditioned only where the weighted first harmonic nearly vanishes (a clean n x n
        supercell with uniform weights): weight a few distinguished atoms (the adsorbate).

        On slabs the reduced plane basis is fixed only up to ``(a, b) -> (-a, -b)`` (a rotation by pi
        about the normal), which turns the in-plane ``u`` into ``-u``. The sign is chosen from the
        structure: an odd function of the centred coordinates (a fixed random combination of
        ``sum_i sin(2 pi m . u_i)`` over small ``m``) must be positive. Both bases then give the
        same features, not only the same mask; a structure symmetric under that rotation looks
        the same either way (atoms are told apart by position only). The choice is discontinuous
        where the probe crosses 0 (a jump of feature-noise size in the FLT output): ``sign="basis"``
        keeps the reduced basis as it is instead, for functions that must be smooth in the positions
        (a potential whose forces are its gradient); the mask and the sums over atoms are the same
        either way, only one FLT attention draw then depends on the sign of the plane basis. ``frame`` is the cell frame with ``e1, e2`` negated where the sign
        was flipped: frequencies ``k`` (frame coordinates) map to ``k @ frame^T`` in the input's.

        Shapes: ``pos [B, L, 3]``, ``padding_mask [B, L]`` (True = pad), ``origin_weights [B, L]``
        (default 1 on real atoms).
        """
        if pos.dim() != 3 or pos.shape[-1] != 3 or pos.shape[0] != self.num_structures:
            raise ValueError(f"pos must be [B, L, 3] with B = {self.num_structures}, got {tuple(pos.shape)}")
        r = torch.einsum("blx,bxk->blk", pos.double(), self.frame)
        # r = u L with L lower-triangular: solve u L = r, i.e. L^T u^T = r^T (upper-triangular).
        u = torch.linalg.solve_triangular(self.basis.transpose(1, 2), r.transpose(1, 2), upper=True).transpose(1, 2)
        periodic = torch.arange(3, device=pos.device)[None, :] < self.periodic_dims[:, None]  # [B, 3]
        keep = torch.ones(pos.shape[:2], dtype=u.dtype, device=u.device)
        if padding_mask is not None:
            keep = keep * (~padding_mask).to(u.dtype)
        w = keep * origin_weights.to(u.dtype) if origin_weights is not None else keep
        w = w[..., None]  # [B, L, 1]
        mean = (u * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1e-300)
        turn = 2.0 * math.pi * u
        circ = torch.atan2((w * torch.sin(turn)).sum(1, keepdim=True), (w * torch.cos(turn)).sum(1, keepdim=True))
        centred = u - torch.where(periodic[:, None, :], circ / (2.0 * math.pi), mean)
        u = torch.where(periodic[:, None, :], centred - torch.floor(centred), centred)
        harmonics, lengths, coef = _odd_probe(u.device)
        zs = 2.0 * math.pi * u[..., 2:3] / lengths  # [B, L, Z]: heights (slabs: centred, in A)
        heights = torch.cat([keep[..., None], keep[..., None] * torch.cos(zs), keep[..., None] * torch.sin(zs)], -1)
        odd = ((torch.sin(2.0 * math.pi * (u[..., :2] @ harmonics.T)) @ coef) * heights).sum((1, 2))  # [B]
        if sign not in ("structure", "basis"):
            raise ValueError(f"sign must be 'structure' or 'basis', got {sign!r}")
        flip = (self.periodic_dims == 2) & (odd < 0) & (sign == "structure")  # [B]
        u = torch.where(flip[:, None, None] & periodic[:, None, :], torch.remainder(-u, 1.0), u)
        sign = torch.ones(pos.shape[0], 3, dtype=u.dtype, device=u.device)
        sign[:, :2] = torch.where(flip, -1.0, 1.0)[:, None]
        return u, self.frame * sign[:, None, :]

    def images(self, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Lattice translations ``n @ basis`` with ``|n_j| <= ceil(cutoff |b*_j|)``, for every structure.

        Returns ``(shifts [B, N, 3] fp64 frame coordinates, valid [B, N] bool)``; structures with
        fewer periodic directions get zero shifts marked invalid beyond ``n = 0``.
        """
        return lattice_images(self.basis, self.periodic_dims, cutoff)


class LatticeCache:
    """:meth:`PeriodicLattice.from_cell` with the reduced rows remembered per distinct ``(cell, pbc)``.

    A training run meets each structure once per epoch and a relaxation or MD run meets the same
    cell at every step; the reduction (a loop of small operations, ~0.5 ms per batch) is then
    done once per distinct cell. Exact: ``from_cell`` treats every row on its own, so a batch
    assembled from remembered rows holds the values a fresh reduction gives (to fp64 rounding).
    Keys are the cell's fp64 bytes and the periodic flags, on the cell's device; at most
    ``max_entries`` rows are kept (least recently used first out). Cells that require gradients
    are always reduced afresh.

    Shapes: ``__call__(cell [B, 3, 3], pbc [B, 3] | [3] | None) -> PeriodicLattice``.
    """

    def __init__(self, max_entries: int = 65536):
        self.max_entries = max_entries
        self._rows: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, cell: torch.Tensor, pbc: torch.Tensor | None = None) -> PeriodicLattice:
        if cell.requires_grad or cell.dim() != 3 or cell.shape[-2:] != (3, 3):
            return PeriodicLattice.from_cell(cell, pbc)
        B = cell.shape[0]
        flags = torch.tensor([True, True, False]) if pbc is None else torch.as_tensor(pbc).bool().cpu()
        if flags.dim() == 1:
            flags = flags[None].expand(B, 3)
        if flags.shape != (B, 3):
            return PeriodicLattice.from_cell(cell, pbc)  # from_cell names the shape error
        cells = cell.detach().double().cpu().numpy()
        masks = flags.numpy()
        device = str(cell.device)
        keys = [(device, cells[i].tobytes(), masks[i].tobytes()) for i in range(B)]
        if any(key not in self._rows for key in keys):
            # The whole batch, so that from_cell's errors name the right structure.
            fresh = PeriodicLattice.from_cell(cell, pbc)
            for i, key in enumerate(keys):
                self._rows[key] = (fresh.frame[i], fresh.basis[i], fresh.periodic_dims[i], fresh.covolume[i])
            while len(self._rows) > self.max_entries:
                self._rows.popitem(last=False)
            return fresh
        rows = []
        for key in keys:
            self._rows.move_to_end(key)
            rows.append(self._rows[key])
        frame, basis, dims, covolume = (torch.stack(parts) for parts in zip(*rows))
        return PeriodicLattice(frame=frame, basis=basis, periodic_dims=dims, covolume=covolume)


_ODD_PROBE: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _odd_probe(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The odd function that fixes the sign of a slab's plane basis (see ``PeriodicLattice.orient``):
    ``sum_i sum_{m, z} c_mz h_z(height_i) sin(2 pi m . u_i)`` with in-plane harmonics ``m`` (half-plane
    of ``max |m_j| <= 3``), height features ``h = [1, cos(2 pi z / l), sin(2 pi z / l)]`` (so that
    layers stacked ABC, whose projection is centrosymmetric, still count) and fixed random
    coefficients. Returns ``(m [M, 2], l [Z'], c [M, 1 + 2 Z'])``."""
    if device not in _ODD_PROBE:
        ms = [(i, j) for i in range(0, 4) for j in range(-3, 4) if i > 0 or j > 0]
        lengths = torch.tensor([3.1, 5.3, 8.9], dtype=torch.float64)
        g = torch.Generator().manual_seed(20261203)
        coef = torch.randn(len(ms), 1 + 2 * len(lengths), generator=g, dtype=torch.float64)
        _ODD_PROBE[device] = (torch.tensor(ms, dtype=torch.float64, device=device), lengths.to(device), coef.to(device))
    return _ODD_PROBE[device]


def cell_frame(cell: torch.Tensor) -> torch.Tensor:
    """Right-handed orthonormal frame of each cell, as columns ``[e1, e2, e3]``.

    ``e1 = a/|a|``, ``e3 = (a x b)/|a x b|`` (the slab normal for OC20 cells, periodic in the
    a-b plane), ``e2 = e3 x e1``, with ``a``, ``b`` the first two lattice vectors (rows of the
    cell). Rotating a structure with its cell, ``r -> R r`` and ``cell -> cell R^T``, turns the
    frame into ``R F``, so the local coordinates ``r @ F`` do not change: every quantity computed
    from them (random features included) is exactly rotation invariant. Cells with a degenerate
    ``a`` or ``a x b`` (no cell, or a non-periodic placeholder) get the identity frame.

    Shapes: ``cell [B, 3, 3]`` -> ``[B, 3, 3]``.
    """
    a, b = cell[:, 0].double(), cell[:, 1].double()
    cross = torch.linalg.cross(a, b)
    na, nc = a.norm(dim=-1, keepdim=True), cross.norm(dim=-1, keepdim=True)
    ok = (na[:, 0] > 1e-6) & (nc[:, 0] > 1e-6 * na[:, 0].clamp_min(1e-6) ** 2)
    e1 = a / na.clamp_min(1e-12)
    e3 = cross / nc.clamp_min(1e-12)
    e2 = torch.linalg.cross(e3, e1)
    frame = torch.stack([e1, e2, e3], dim=-1)  # columns
    eye = torch.eye(3, dtype=frame.dtype, device=frame.device).expand_as(frame)
    return torch.where(ok[:, None, None], frame, eye).to(cell.dtype)


def lattice_images(basis: torch.Tensor, periodic_dims: torch.Tensor, cutoff: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every lattice translation that can bring a point within ``cutoff`` (see ``PeriodicLattice.images``)."""
    B = basis.shape[0]
    # |n_j| needed: the spacing of lattice planes j is 1/|b*_j| with b* the reciprocal rows.
    recip = torch.linalg.inv(basis).transpose(1, 2)  # rows b*_j
    spacing_inv = recip.norm(dim=-1)  # [B, 3]
    periodic = torch.arange(3, device=basis.device)[None, :] < periodic_dims[:, None]
    n_need = torch.where(periodic, torch.ceil(cutoff * spacing_inv), torch.zeros_like(spacing_inv)).long()
    n_max = n_need.max(dim=0).values.tolist() if B else [0, 0, 0]
    grids = [torch.arange(-n, n + 1, device=basis.device, dtype=basis.dtype) for n in n_max]
    n = torch.cartesian_prod(*grids).reshape(-1, 3)  # [N, 3]
    valid = (n.abs()[None] <= n_need[:, None, :].to(n.dtype)).all(-1)  # [B, N]
    shifts = torch.einsum("ni,bix->bnx", n, basis)
    return shifts, valid


def log_box_mass(centre: torch.Tensor, half_width: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``log P(centre - w <= X < centre + w)`` for ``X ~ N(0, sigma^2)``, stable in both tails (fp64).

    The normal law is symmetric, so the box is moved to ``|centre|`` and its mass written as a
    difference of upper tails, ``(erfc(lo / sqrt 2) - erfc(hi / sqrt 2)) / 2`` with
    ``lo, hi = (|centre| -+ w) / sigma``: fp64 holds both with full relative precision down to
    ``~1e-300``, so there is no cancellation beyond that of the mass itself. Boxes whose mass is
    below ``1e-290`` (about 36 standard deviations out) fall back to ``log_ndtr`` in log space. Measured on CPU: ``erfc`` is ~19x faster than ``log_ndtr`` in fp64,
    and these masses were the sampler's main cost. Both forms agree to fp64 rounding.

    Shapes broadcast; ``half_width, sigma > 0``.
    """
    return _log_box_mass_scaled(centre.abs() * _SQRT_HALF, half_width * _SQRT_HALF, 1.0 / sigma) - _LOG2


_SQRT_HALF = math.sqrt(0.5)
_LOG2 = math.log(2.0)


def _log_box_mass_scaled(u: torch.Tensor, v: torch.Tensor, inv_sigma: torch.Tensor) -> torch.Tensor:
    """``log(2 P(box))`` for the box ``|centre| = u sqrt 2``, half-width ``v sqrt 2`` (see :func:`log_box_mass`).

    ``u - v`` and ``u + v`` are formed before broadcasting against ``inv_sigma`` (the mixture's
    terms), so the large tensor sees two products, two ``erfc``, one difference and one log;
    masses below ``1e-290`` are recomputed in log space on those elements only.
    """
    diff = torch.special.erfc((u - v) * inv_sigma) - torch.special.erfc((u + v) * inv_sigma)
    far = diff < 1e-290
    out = torch.log(diff)
    if bool(far.any()):
        uu, vv, ss = torch.broadcast_tensors(u, v, inv_sigma)
        out = out.masked_scatter(far, _log_box_mass_tail_scaled(uu[far], vv[far], ss[far]))
    return out


def _log_box_mass_tail_scaled(u: torch.Tensor, v: torch.Tensor, inv_sigma: torch.Tensor) -> torch.Tensor:
    """``log(2 P(box))`` in log space, any depth of tail (the slow, always-valid form)."""
    x_lo, x_hi = (u - v) * inv_sigma, (u + v) * inv_sigma
    # Left of the mean: lo, hi = -x_hi sqrt 2, -x_lo sqrt 2 and P = Phi(hi) - Phi(lo).
    return _log_box_mass_tail(-x_hi / _SQRT_HALF, -x_lo / _SQRT_HALF) + _LOG2


def _log_box_mass_tail(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``log(Phi(hi) - Phi(lo))`` for ``lo < hi``, ``lo <= 0``, in log space (any depth of tail)."""
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    return log_hi + torch.log1p(-torch.exp((log_lo - log_hi).clamp_max(0.0)).clamp_max(1.0 - 1e-300))


def snap_frequencies(xi: torch.Tensor, basis: torch.Tensor, periodic_dims: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round continuous frequencies to reciprocal-lattice vectors, coordinate by coordinate.

    In the frame, ``k L^T = q`` with ``q_j`` an integer for ``j < P`` and ``q_j = xi_j`` (continuous)
    otherwise. Forward substitution: ``s_j = L_jj xi_j + sum_{i<j} L_ji k_i``, ``q_j = rint(s_j)``
    on periodic coordinates, ``k_j = (q_j - sum_{i<j} L_ji k_i) / L_jj``. The continuous ``xi``
    snaps to ``k`` iff it lies in ``prod_j [k_j - 1/(2 L_jj), k_j + 1/(2 L_jj))``.

    Shapes: ``xi [B, H, F, 3]`` (frame coordinates), ``basis [B, 3, 3]``, ``periodic_dims [B]``
    -> ``(q, k)``, each ``[B, H, F, 3]`` in ``xi``'s dtype.
    """
    Lb = basis.to(xi.dtype)[:, None, None]  # [B, 1, 1, 3, 3]
    periodic = (torch.arange(3, device=xi.device)[None, :] < periodic_dims[:, None])[:, None, None, :]  # [B,1,1,3]
    qs, ks = [], []
    for j in range(3):
        acc = sum((Lb[..., j, i] * ks[i] for i in range(j)), torch.zeros_like(xi[..., 0]))
        s = Lb[..., j, j] * xi[..., j] + acc
        q = torch.where(periodic[..., j], torch.round(s), s)
        ks.append((q - acc) / Lb[..., j, j])
        qs.append(q)
    return torch.stack(qs, -1), torch.stack(ks, -1)


def periodic_mixture_log_density(
    k: torch.Tensor, sigma: torch.Tensor, basis: torch.Tensor, periodic_dims: torch.Tensor
) -> torch.Tensor:
    """``log p(q)`` of the snap sampler under a uniform mixture of isotropic Gaussians ``N(0, sigma_t^2 I)``.

    ``p(q) = (1/T) sum_t prod_{j<P} boxmass_t(k_j) prod_{j>=P} N(k_j; 0, sigma_t^2)``: a probability
    on the periodic coordinates, a density on the others. Computed in fp64.

    Evaluated as written (products and a sum of fp64 numbers, one log at the end), which is exact
    to rounding wherever ``p >= 1e-280``: every term below fp64's range is then negligible against
    the sum. That covers every frequency the sampler itself draws (``q`` lies in the box of the
    term it was drawn from). Anything deeper in the tails is done entirely in log space
    (:func:`_periodic_mixture_log_density_log_space`), as is a call that needs gradients; both
    agree to fp64 rounding (tested).

    Shapes: ``k [B, H, F, 3]``, ``sigma [H, T]``, ``basis [B, 3, 3]``, ``periodic_dims [B]``
    -> ``[B, H, F]``.
    """
    if torch.is_grad_enabled() and (k.requires_grad or sigma.requires_grad):
        # Differentiable on request (the sampler's own use is on detached samples).
        return _periodic_mixture_log_density_log_space(k, sigma, basis, periodic_dims)
    k = k.double()
    nmin, nmax = _periodic_range(periodic_dims)
    u, v, inv_s = _box_inputs(k, sigma, basis)
    periodic = (torch.arange(3, device=k.device)[None, :] < periodic_dims[:, None])[:, None, None, None, :]
    # One coordinate at a time on contiguous [B, H, F, T] tensors; the 1/2 of each box mass and
    # the Gaussians' 1/sqrt(2 pi) are applied once, to the [B, H, F] sum.
    # In place on fresh [B, H, F, T] buffers (no autograd here: k and sigma are samples).
    per_term = None
    boxes = gausses = 0
    inv_s_half = inv_s * _SQRT_HALF
    for j in range(3):
        if j < nmax:
            uj, vj = u[..., j, None], v[:, j, None, None, None]  # [B, H, F, 1], [B, 1, 1, 1]
            box = ((uj - vj) * inv_s).erfc_().sub_(((uj + vj) * inv_s).erfc_())  # 2 P(box)
        if j >= nmin:
            gauss = (k[..., j, None] * inv_s_half).square_().neg_().exp_()  # sqrt(2 pi) s N(k_j; 0, s^2)
        if j < nmin:
            term, boxes = box, boxes + 1
        elif j >= nmax:
            term, gausses = gauss, gausses + 1
        else:  # mixed batch: this coordinate is snapped in some structures only
            term = torch.where(periodic[..., j], box, gauss.mul_(inv_s * math.sqrt(2.0 / math.pi)))
            boxes += 1
        per_term = term if per_term is None else per_term.mul_(term)
    if gausses:  # the Gaussians' 1/s, once
        per_term.mul_(inv_s**gausses)
    total = per_term.sum(-1)
    if not bool((total >= 1e-280).all()):  # deep tails (never for the sampler's own draws)
        return _periodic_mixture_log_density_log_space(k, sigma, basis, periodic_dims)
    # boxes carry 2 P, Gaussians sqrt(2 pi) N; the mixed coordinate was brought to the box's scale.
    return torch.log(total) - boxes * _LOG2 - gausses * 0.5 * math.log(2.0 * math.pi) - math.log(sigma.shape[-1])


def _periodic_range(periodic_dims: torch.Tensor) -> tuple[int, int]:
    """Coordinates ``[0, nmin)`` are snapped in every structure (box masses only), ``[nmax, 3)`` in
    none (Gaussian densities only); only those in between need both and a choice."""
    if not periodic_dims.numel():
        return 0, 0
    return int(periodic_dims.min()), int(periodic_dims.max())


def _box_inputs(k: torch.Tensor, sigma: torch.Tensor, basis: torch.Tensor):
    """``|k| / sqrt 2 [B, H, F, 3]``, box half-widths ``/ sqrt 2 [B, 3]``, ``1 / sigma [1, H, 1, T]`` (fp64)."""
    half = 0.5 / torch.diagonal(basis.double(), dim1=-2, dim2=-1)  # [B, 3]
    inv_s = (1.0 / sigma.double())[None, :, None, :]
    return k.abs() * _SQRT_HALF, half * _SQRT_HALF, inv_s


def _periodic_mixture_log_density_log_space(
    k: torch.Tensor, sigma: torch.Tensor, basis: torch.Tensor, periodic_dims: torch.Tensor
) -> torch.Tensor:
    """:func:`periodic_mixture_log_density` term by term in log space (any depth of tail)."""
    s = sigma.double()[None, :, None, :, None]  # [1, H, 1, T, 1]
    periodic = (torch.arange(3, device=k.device)[None, :] < periodic_dims[:, None])[:, None, None, None, :]
    nmin, nmax = _periodic_range(periodic_dims)
    u, v, inv_s = _box_inputs(k, sigma, basis)
    per_term = None
    for j in range(3):
        if j < nmax:
            uj, vj = u[..., j, None], v[:, j, None, None, None]  # [B, H, F, 1], [B, 1, 1, 1]
            box = _log_box_mass_scaled(uj, vj, inv_s) - _LOG2  # [B, H, F, T]
        if j >= nmin:
            gauss = _log_gauss(k[..., j, None], s[..., 0])
        term = box if j < nmin else gauss if j >= nmax else torch.where(periodic[..., j], box, gauss)
        per_term = term if per_term is None else per_term + term
    return torch.logsumexp(per_term, dim=-1) - math.log(sigma.shape[-1])


def _log_gauss(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``log N(x; 0, s^2)`` element-wise."""
    return -0.5 * (x / s) ** 2 - 0.5 * math.log(2.0 * math.pi) - torch.log(s)


# ------------------------------------------------------------------------------------------------
# Exact references (O(L^2), fp64): real-space lattice sums and the full Fourier series
# ------------------------------------------------------------------------------------------------


def gaussian_lattice_sum(
    delta: torch.Tensor,
    lattice: PeriodicLattice,
    amplitudes: torch.Tensor,
    scales: torch.Tensor,
    *,
    tol: float = 1e-17,
    vector: bool = False,
) -> torch.Tensor:
    """Real-space lattice sum ``f_per(delta) = sum_n f(delta + n L)`` of a Gaussian basis, to convergence.

    ``f_h(x) = sum_t A_ht exp(-|x|^2 / (2 s_ht^2))``. Images are taken out to the radius where
    the widest term falls below ``tol`` relative to its peak (plus the largest ``|delta|``).
    ``vector=True`` returns the displacement sum ``sum_n (delta + nL) f(delta + nL)`` instead.

    Shapes: ``delta [B, ..., 3]`` in frame coordinates, ``amplitudes, scales [H, T]``
    -> ``[B, ..., H]`` (``[B, ..., H, 3]`` with ``vector``).
    """
    delta = delta.double()
    amps, s = amplitudes.double(), scales.double()
    radius = float(s.detach().max()) * math.sqrt(2.0 * math.log(1.0 / tol)) + float(delta.detach().norm(dim=-1).max())
    shifts, valid = lattice.images(radius)  # [B, N, 3], [B, N]
    B = delta.shape[0]
    mid = delta.shape[1:-1]
    view = (B,) + (1,) * len(mid) + (3,)
    H = amps.shape[0]
    out = delta.new_zeros(delta.shape[:-1] + ((H, 3) if vector else (H,)))
    inv = 0.5 / s**2  # [H, T]
    for n in range(shifts.shape[1]):
        x = delta + shifts[:, n].reshape(view)
        d2 = (x * x).sum(-1)[..., None, None]  # [B, ..., 1, 1]
        f = (amps * torch.exp(-d2 * inv)).sum(-1)  # [B, ..., H]
        f = f * valid[:, n].reshape((B,) + (1,) * (len(mid) + 1)).to(f.dtype)
        out = out + (f[..., None] * x[..., None, :] if vector else f)
    return out


def gaussian_fourier_sum(
    delta: torch.Tensor,
    lattice: PeriodicLattice,
    amplitudes: torch.Tensor,
    scales: torch.Tensor,
    *,
    drop_k0: bool = False,
    tol: float = 1e-17,
) -> torch.Tensor:
    """The same ``f_per`` as :func:`gaussian_lattice_sum` by full enumeration of the Fourier series.

    3D: ``(1/V) sum_m ghat(k_m) cos(2 pi k_m . delta)``, ``ghat(k) = sum_t A_t (2 pi s_t^2)^{3/2}
    exp(-2 pi^2 s_t^2 |k|^2)``. 2D (slab): the integral over the normal component is closed form,
    ``(1/Area) sum_m sum_t A_t 2 pi s_t^2 exp(-2 pi^2 s_t^2 |k_m|^2) exp(-z^2 / 2 s_t^2) cos(2 pi k_m . delta)``.
    Non-periodic structures: ``f`` itself. ``drop_k0`` removes the ``m = 0`` term of 3D structures
    (what the attention features estimate).

    Shapes: ``delta [B, ..., 3]`` in frame coordinates, ``amplitudes, scales [H, T]`` -> ``[B, ..., H]``.
    """
    delta = delta.double()
    amps, s = amplitudes.double(), scales.double()
    B = delta.shape[0]
    mid = delta.shape[1:-1]
    P = lattice.periodic_dims
    # |k| up to where the narrowest term falls below tol; k . a_j = m_j, so |m_j| <= kmax |a_j|.
    kmax = math.sqrt(math.log(1.0 / tol) / (2.0 * math.pi**2)) / float(s.detach().min())
    recip = torch.linalg.inv(lattice.basis).transpose(1, 2)  # rows b*_j: k = m @ recip
    periodic = torch.arange(3, device=delta.device)[None, :] < P[:, None]
    lens = lattice.basis.norm(dim=-1)
    m_need = torch.where(periodic, torch.ceil(kmax * lens), torch.zeros_like(lens)).long()
    m_max = m_need.max(dim=0).values.tolist()
    grids = [torch.arange(-m, m + 1, dtype=delta.dtype, device=delta.device) for m in m_max]
    m_all = torch.cartesian_prod(*grids).reshape(-1, 3)
    H = amps.shape[0]
    flat = delta.reshape(B, -1, 3)  # [B, X, 3]
    z2 = flat[..., 2:3] ** 2  # [B, X, 1]
    out = flat.new_zeros(B, flat.shape[1], H)
    cov = lattice.covolume[:, None, None]
    for chunk in m_all.split(2048):
        ok = (chunk.abs()[None] <= m_need[:, None, :].to(chunk.dtype)).all(-1) & (P[:, None] > 0)  # [B, M]
        if drop_k0:
            ok = ok & ~((chunk == 0).all(-1)[None] & (P[:, None] == 3))
        k = torch.einsum("mi,bix->bmx", chunk, recip)  # [B, M, 3] (m_3 = 0 on slabs: k in-plane)
        k2 = (k * k).sum(-1)  # [B, M]
        cos = torch.cos(2.0 * math.pi * torch.einsum("bxi,bmi->bxm", flat, k))  # [B, X, M]
        cos = cos * ok[:, None, :].to(cos.dtype)
        for t in range(s.shape[1]):
            st = s[:, t]  # [H]
            g = torch.exp(-2.0 * math.pi**2 * st**2 * k2[..., None])  # [B, M, H]
            w3 = amps[:, t] * (2.0 * math.pi * st**2) ** 1.5 * g / cov  # [B, M, H]
            w2 = amps[:, t] * (2.0 * math.pi * st**2) * g / cov
            three = torch.einsum("bxm,bmh->bxh", cos, w3)
            two = torch.einsum("bxm,bmh->bxh", cos, w2) * torch.exp(-z2 / (2.0 * st**2))
            out = out + torch.where((P == 3)[:, None, None], three, two)
    out = out.reshape(delta.shape[:-1] + (H,))
    bshape = (B,) + (1,) * len(mid)
    # Non-periodic structures: f itself.
    d2 = (delta * delta).sum(-1)[..., None, None]
    f = (amps * torch.exp(-d2 * 0.5 / s**2)).sum(-1)
    return torch.where((P == 0).reshape(bshape + (1,)), f, out)
