"""Relative positional encodings learned in the Fourier domain (FLT, paper Thm 4.1).

A family holds the learnable spectrum ``g`` of an RPE mask ``f`` (``f(x) = int g(xi) e^{2 pi i x.xi}
dxi``), its closed-form ``f`` for the exact reference, and a sampling density ``p``. Real form of the
random features (DESIGN.md §2): draw ``xi_1..xi_r ~ p``, ``a_k = g(xi_k)/p(xi_k)``,
``t_ik = 2 pi r_i . xi_k``;

* one-sided (any sign of ``a``): ``n1_i = [a_k cos t_ik, a_k sin t_ik]_k / sqrt(r)``,
  ``n2_j = [cos t_jk, sin t_jk]_k / sqrt(r)``;
* balanced (``a >= 0``): ``sqrt(a_k)`` on both sides,
* signed balanced (any sign): ``sqrt(|a_k|)`` on both sides and ``sign(a_k)`` on the query side;
  ``|n1|^2 + |n2|^2 = 2 mean|a|`` against the one-sided ``mean(a^2) + 1`` (never larger, since
  ``2|a| <= a^2 + 1``), which is what FAVOR+'s variance grows with (DESIGN.md §2(c)),

so ``n1_i . n2_j = (1/r) sum_k a_k cos(2 pi (r_i - r_j).xi_k)`` with expectation ``Re f(r_i - r_j)``.

Frequencies are reparameterised, ``xi = T_theta(noise)`` with parameter-free ``noise`` from
``draw_noise``, so gradients reach every parameter of ``g`` and ``p``, and a caller can keep the
noise fixed between explicit redraws (FLTAttention keeps it in a buffer).

Variance (paper Thm 4.2): the max-norm error scales with ``c = max |g|/p``; ``c_bound()`` returns an
upper bound on it (``inf`` where the estimator has unbounded variance).

Shapes: ``H`` heads, ``T`` terms, ``l`` position dimension, ``F`` features (``2F`` columns after the
cos/sin split). Einsum letters: b batch, h heads, l positions, f features, i coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F_

from flt_mol.attention.periodic import (
    PeriodicLattice,
    gaussian_lattice_sum,
    periodic_mixture_log_density,
    snap_frequencies,
)

__all__ = [
    "SpectralRPE",
    "GaussianBasisRPE",
    "GaussianMixtureRPE",
    "LocalRPE",
    "KernelRPE",
    "rpe_features",
    "features_from_angles",
    "cos_sin",
    "PeriodicDraw",
    "irwin_hall_pdf",
]

_LOG_2PI = math.log(2.0 * math.pi)

#: How ``a = g/p`` is split between the query and key features (see ``SpectralRPE.features``).
RPE_SPLITS = ("auto", "balanced", "one_sided", "signed_balanced")


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Promote to at least fp32 (fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# Mask exponents are floored at -80 (exp(-80) = 1.8e-35): far pairs would otherwise produce
# subnormal floats, whose arithmetic is ~30x slower on x86 (measured: exact-mode mask at L=512).
_EXP_FLOOR = -80.0


def _exp_floored(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.clamp(x, min=_EXP_FLOOR))


def _inv_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


#: ``|a| + eps`` under the square root of the signed balanced split: ``n1 . n2`` stays exactly
#: ``a`` (unbiased) while the gradient of ``a / sqrt(|a| + eps)`` stays below ``eps^-1/2`` at a = 0.
_SIGNED_SPLIT_EPS = 1e-4


def _per_row(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-head parameters ``[H, ...]`` for ``rows = G H`` stacked heads (row ``g H + h`` is head ``h``)."""
    return t if rows == t.shape[0] else t.repeat(rows // t.shape[0], *([1] * (t.dim() - 1)))


def rpe_features(
    pos: torch.Tensor, xi: torch.Tensor, a: torch.Tensor, *, balanced: bool, signed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real random Fourier features of an RPE mask (the pure function behind ``features``).

    Args:
        pos: positions ``[B, L, l]``.
        xi: frequencies ``[H, F, l]``.
        a: importance weights ``g(xi)/p(xi)``, ``[H, F]``; must be ``>= 0`` when ``balanced``.
        balanced: put ``sqrt(a)`` on both sides (else ``a`` on the query side only).
        signed: with ``balanced``, allow any sign: ``a / sqrt(|a| + eps)`` on the query side,
            ``sqrt(|a| + eps)`` on the key side (their product is ``a``).

    Shapes: returns ``(n1, n2)``, each ``[B, H, L, 2F]`` in fp32.
    """
    dtype = torch.promote_types(torch.promote_types(pos.dtype, xi.dtype), torch.float32)
    ang = (2.0 * math.pi) * torch.einsum("bli,hfi->bhlf", pos.to(dtype), xi.to(dtype))
    return features_from_angles(ang, a[None], balanced=balanced, signed=signed)


class _CosSin(torch.autograd.Function):
    """``[cos t, sin t]`` along the last axis; the backward reuses the output (no trig in backward).

    Written in the ``setup_context`` form with ``vmap`` and ``jvp`` rules, so ``torch.func``
    transforms (``vmap``, ``jacrev``, ``jacfwd``, ``hessian``) apply to models that use it.
    """

    @staticmethod
    def forward(ang: torch.Tensor) -> torch.Tensor:
        num = ang.shape[-1]
        out = ang.new_empty(ang.shape[:-1] + (2 * num,))
        if ang.device.type == "cpu" and ang.dtype == torch.float32 and not torch.compiler.is_compiling():
            # NumPy's SIMD float32 cos / sin, measured ~3x faster than torch's CPU kernels here
            # (150 against 440 us for 344k values, one thread); written straight into the halves.
            a, o = ang.detach().numpy(), out.numpy()
            np.cos(a, out=o[..., :num])
            np.sin(a, out=o[..., num:])
        else:
            torch.cos(ang, out=out[..., :num])
            torch.sin(ang, out=out[..., num:])
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # d cos = -sin dt, d sin = cos dt. Written with differentiable ops on the saved output, so
        # double backward (force training) differentiates through this Function again.
        (out,) = ctx.saved_tensors
        num = out.shape[-1] // 2
        return grad[..., num:] * out[..., :num] - grad[..., :num] * out[..., num:]

    @staticmethod
    def jvp(ctx, tangent: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        num = out.shape[-1] // 2
        return torch.cat([-out[..., num:] * tangent, out[..., :num] * tangent], dim=-1)

    @staticmethod
    def vmap(info, in_dims, ang):
        (dim,) = in_dims
        if dim is None:
            return _CosSin.apply(ang), None
        return _CosSin.apply(ang.movedim(dim, 0)), 0  # elementwise: any leading axis is a batch


def cos_sin(ang: torch.Tensor) -> torch.Tensor:
    """``cat([cos(ang), sin(ang)], -1)`` in one output buffer, differentiable to any order.

    Same values as the two ops and the concatenation (to the last bit on non-CPU / non-fp32
    inputs; NumPy's float32 kernels on CPU, within 1 ulp). Its backward,
    ``dL/dt = cos t dL/dsin - sin t dL/dcos``, reads the saved output instead of evaluating
    ``sin`` and ``cos`` again.

    Shapes: ``[..., F]`` -> ``[..., 2F]`` in ``ang``'s dtype.
    """
    return _CosSin.apply(ang)


def features_from_angles(
    ang: torch.Tensor, a: torch.Tensor, *, balanced: bool, signed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n1 = [w cos, w sin] / sqrt(F)``, ``n2 = [cos, sin] / sqrt(F)`` (one-sided, ``w = a``),
    ``sqrt(a)`` on both sides (balanced) or ``a / sqrt(|a| + eps)`` and ``sqrt(|a| + eps)`` (balanced
    and signed), so ``n1_i . n2_j = (1/F) sum_f a_f cos(ang_if - ang_jf)``.

    Shapes: ``ang [B, H, L, F]``, ``a [B or 1, H, F]`` -> two ``[B, H, L, 2F]`` in ``ang``'s dtype.
    """
    num_features = ang.shape[-1]
    cs = cos_sin(ang)  # [B, H, L, 2F]
    scale = 1.0 / math.sqrt(num_features)
    a = a.to(ang.dtype)[:, :, None, :]

    def both(w: torch.Tensor) -> torch.Tensor:  # a per-feature weight on the cos and the sin half
        return torch.cat([w, w], dim=-1)

    if balanced and signed:
        root = torch.sqrt(a.abs() + _SIGNED_SPLIT_EPS)
        return cs * both(a / root * scale), cs * both(root * scale)
    if balanced:
        n1 = cs * both(torch.sqrt(a.clamp_min(0.0)) * scale)
        return n1, n1
    return cs * both(a * scale), cs * scale


@dataclass(frozen=True)
class PeriodicDraw:
    """One draw of reciprocal-lattice frequencies per structure (DESIGN §7), before weighting.

    Attributes (``B`` structures, ``H`` heads, ``F`` frequencies, ``L`` atoms):
        q: ``[B, H, F, 3]`` fp64, integer on the periodic coordinates (``k L^T = q``).
        k: ``[B, H, F, 3]`` fp64 frequencies in frame coordinates (detached: a sample).
        log_p: ``[B, H, F]`` fp64 log proposal probability / density (detached).
        zero: ``[B, H, F]`` bool, the ``k = 0`` samples of 3D-periodic structures (weight 0).
        phase: ``[B, H, L, F]`` angles ``2 pi q . u`` (wrapped fractional coordinates).
        lattice: the :class:`~flt_mol.attention.periodic.PeriodicLattice` it was drawn on.
        frame: ``[B, 3, 3]`` fp64, the frame the phases are measured in (the lattice's, with the
            in-plane sign the structure chose on slabs): ``k @ frame^T`` is ``k`` in input coordinates.
    """

    q: torch.Tensor
    k: torch.Tensor
    log_p: torch.Tensor
    zero: torch.Tensor
    phase: torch.Tensor
    lattice: PeriodicLattice
    frame: torch.Tensor


def irwin_hall_pdf(y: torch.Tensor, k: int) -> torch.Tensor:
    """Density of the sum of ``k`` iid U(0,1) (the ``k``-fold self-convolution of a unit box).

    ``IH_k(y) = 1/(k-1)! sum_{j=0}^{k} (-1)^j C(k,j) max(y-j, 0)^{k-1}`` on ``[0, k]``, 0 outside.
    """
    out = torch.zeros_like(y)
    for j in range(k + 1):
        out = out + ((-1) ** j) * math.comb(k, j) * torch.clamp(y - j, min=0.0) ** (k - 1)
    out = out / math.factorial(k - 1)
    inside = (y >= 0) & (y <= k)
    return torch.where(inside, out, torch.zeros_like(out)).clamp_min(0.0)


def _student_t_logpdf(x: torch.Tensor, nu: float) -> torch.Tensor:
    return (
        math.lgamma((nu + 1) / 2)
        - math.lgamma(nu / 2)
        - 0.5 * math.log(nu * math.pi)
        - (nu + 1) / 2 * torch.log1p(x * x / nu)
    )


class SpectralRPE(nn.Module):
    """Base class: an RPE mask ``f`` with learned spectrum ``g`` and sampling density ``p``.

    Subclasses implement ``mask``, ``noise_width``, ``draw_noise`` (parameter-free noise),
    ``sample(noise) -> (xi [H,F,l], a [H,F])`` (reparameterised) and ``c_bound``; and set
    ``nonnegative_spectrum`` when ``a >= 0`` is guaranteed (the balanced split is then the default).
    """

    nonnegative_spectrum: bool = False
    #: How periodic features fix the sign of a slab's plane basis (``PeriodicLattice.orient``):
    #: ``"structure"`` (exactly invariant to ``(a, b) -> (-a, -b)`` for one draw, discontinuous where
    #: the structure's odd probe crosses 0) or ``"basis"`` (smooth in the positions).
    periodic_sign: str = "structure"
    #: True when positions must be integers (lattice families); callers shift only by integers.
    integer_positions: bool = False

    def __init__(self, num_heads: int, dim: int):
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.num_heads = num_heads
        self.dim = dim

    # -- to implement -------------------------------------------------------------------------
    def mask(self, delta: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def noise_width(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def draw_noise(
        self,
        num_features: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def c_bound(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------------
    def _device(self, device) -> torch.device:
        if device is not None:
            return torch.device(device)
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def _check_delta(self, delta: torch.Tensor) -> None:
        if not torch.is_tensor(delta) or delta.dim() < 1 or delta.shape[-1] != self.dim:
            shape = tuple(delta.shape) if torch.is_tensor(delta) else type(delta).__name__
            raise ValueError(f"delta must be [..., {self.dim}] (dim of this RPE), got {shape}")

    def _check_noise(self, noise: torch.Tensor, num_features: int | None, *, groups: bool = False) -> None:
        """``groups``: also accept ``[G H, F, w]``, several noises stacked (row ``g H + h`` is head ``h``)."""
        w = self.noise_width()
        if (
            not torch.is_tensor(noise)
            or noise.dim() != 3
            or (noise.shape[0] % self.num_heads != 0 or noise.shape[0] == 0 if groups
                else noise.shape[0] != self.num_heads)
            or noise.shape[2] != w
            or (num_features is not None and noise.shape[1] != num_features)
        ):
            shape = tuple(noise.shape) if torch.is_tensor(noise) else type(noise).__name__
            f = num_features if num_features is not None else "F"
            raise ValueError(f"noise must be [{self.num_heads}, {f}, {w}], got {shape}")

    def check_positions(self, pos: torch.Tensor) -> None:
        """Raise ValueError unless ``pos`` is ``[B, L, dim]``."""
        if not torch.is_tensor(pos) or pos.dim() != 3 or pos.shape[-1] != self.dim:
            shape = tuple(pos.shape) if torch.is_tensor(pos) else type(pos).__name__
            raise ValueError(f"pos must be [B, L, {self.dim}] (dim of this RPE), got {shape}")

    def _check_split(self, split: str) -> tuple[bool, bool]:
        """Validate ``split``; return ``(balanced, signed)`` for :func:`features_from_angles`."""
        if split not in RPE_SPLITS:
            raise ValueError(f"split must be one of {RPE_SPLITS}, got {split!r}")
        if split == "balanced" and not self.nonnegative_spectrum:
            raise ValueError(
                f"split='balanced' needs a nonnegative spectrum; {type(self).__name__} is signed here"
            )
        if split == "signed_balanced":
            return True, True
        return split == "balanced" or (split == "auto" and self.nonnegative_spectrum), False

    def _noise_for(self, num_features, generator, noise, device) -> torch.Tensor:
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if noise is None:
            return self.draw_noise(num_features, generator, device=device)
        self._check_noise(noise, num_features)
        return noise

    @staticmethod
    def _lattice_of(pos, cell, pbc, lattice) -> PeriodicLattice | None:
        if lattice is not None:
            if not isinstance(lattice, PeriodicLattice):
                raise TypeError(f"lattice must be a PeriodicLattice, got {type(lattice).__name__}")
            if lattice.num_structures != pos.shape[0]:
                raise ValueError(f"lattice has {lattice.num_structures} structures but pos has {pos.shape[0]}")
            return lattice
        if cell is None:
            if pbc is not None:
                raise ValueError("pbc was given without cell: periodic features need the cell")
            return None
        cell = cell if cell.dim() == 3 else cell[None].expand(pos.shape[0], 3, 3)
        return PeriodicLattice.from_cell(cell.to(pos.device), pbc)

    def features(
        self,
        pos: torch.Tensor,
        num_features: int,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        split: str = "auto",
        cell: torch.Tensor | None = None,
        pbc: torch.Tensor | None = None,
        lattice: PeriodicLattice | None = None,
        padding_mask: torch.Tensor | None = None,
        origin_weights: torch.Tensor | None = None,
        oriented: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random features ``(n1, n2)`` with ``E[n1 @ n2^T] = mask(pos_i - pos_j)`` per head.

        Periodic structures (``cell`` / ``pbc`` or a prebuilt ``lattice`` given): frequencies on
        each structure's reciprocal lattice (DESIGN §7), ``E[n1 @ n2^T] = f_per(pos_i - pos_j)``
        minus the constant ``k = 0`` term of 3D-periodic structures (see :meth:`periodic_k0`),
        exactly invariant to wrapping atoms by lattice vectors, for every draw.

        Args:
            pos: ``[B, L, dim]`` positions.
            num_features: F, the number of frequencies (each gives a cos and a sin column).
            generator: RNG for fresh noise (ignored when ``noise`` is given).
            noise: fixed base noise from :meth:`draw_noise` (``[H, F, noise_width]``); fresh
                noise is drawn when None.
            split: ``"auto"`` (balanced when ``a >= 0`` is guaranteed, else one-sided),
                ``"balanced"``, ``"one_sided"`` or ``"signed_balanced"`` (any sign of ``a``).
            cell: ``[B, 3, 3]`` or ``[3, 3]`` lattice rows; ``pbc``: ``[B, 3]`` or ``[3]`` bool
                (default ``(True, True, False)``, a slab). ``lattice``: the same, prebuilt with
                :meth:`PeriodicLattice.from_cell` (reuse it across layers).
            padding_mask: ``[B, L]`` (True = pad); ``origin_weights`` ``[B, L]``: periodic
                features measure phases from the weighted canonical origin of
                :meth:`PeriodicLattice.fractional` (the mask does not depend on it).
            oriented: ``lattice.orient(pos, padding_mask, origin_weights, sign=self.periodic_sign)``
                when the caller already has it (several draws on the same positions share it).

        Shapes: returns two ``[B, H, L, 2F]`` fp32 tensors.
        """
        self.check_positions(pos)
        balanced, signed = self._check_split(split)
        noise = self._noise_for(num_features, generator, noise, pos.device)
        lattice = self._lattice_of(pos, cell, pbc, lattice)
        if lattice is not None:
            draw = self.periodic_draw(pos, noise, lattice, padding_mask=padding_mask, origin_weights=origin_weights,
                                      oriented=oriented)
            return features_from_angles(draw.phase, self.periodic_weights(draw), balanced=balanced, signed=signed)
        xi, a = self.sample(noise)
        return rpe_features(pos, xi, a, balanced=balanced, signed=signed)

    def estimate_mask(
        self, pos: torch.Tensor, num_features: int, generator=None, *, noise=None, split="auto", **periodic
    ) -> torch.Tensor:
        """Materialised estimate ``n1 @ n2^T``, ``[B, H, L, L]`` (for tests and benchmarks)."""
        n1, n2 = self.features(pos, num_features, generator, noise=noise, split=split, **periodic)
        return n1 @ n2.transpose(-1, -2)

    def row_sums(
        self,
        pos: torch.Tensor,
        num_features: int,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        cell: torch.Tensor | None = None,
        pbc: torch.Tensor | None = None,
        lattice: PeriodicLattice | None = None,
    ) -> torch.Tensor:
        """Linear-time estimate of ``S[b,i,h] = sum_{j real} f_h(pos_i - pos_j)`` (``f_per`` when periodic).

        ``S_i = n1_i . (sum_j n2_j)``: a per-token context (e.g. a Gaussian-basis density around
        each atom, one channel per "head") in O(L F) instead of O(L^2). Unbiased. Periodic: the
        exact ``k = 0`` term (``n_real * ghat(0) / V`` on 3D-periodic structures) is added.

        Shapes: ``pos [B, L, l]``, ``padding_mask [B, L]`` (True = pad) -> ``[B, L, H]``.
        """
        if padding_mask is not None and padding_mask.shape != pos.shape[:2]:
            raise ValueError(f"padding_mask must be [B, L] = {tuple(pos.shape[:2])}, got {tuple(padding_mask.shape)}")
        lattice = self._lattice_of(pos, cell, pbc, lattice)
        n1, n2 = self.features(pos, num_features, generator, noise=noise, lattice=lattice, padding_mask=padding_mask)
        keep = torch.ones(pos.shape[:2], dtype=n2.dtype, device=pos.device)
        if padding_mask is not None:
            keep = (~padding_mask.bool()).to(n2.dtype)
        total = (n2 * keep[:, None, :, None]).sum(dim=2, keepdim=True)  # [B, H, 1, 2F]
        out = (n1 * total).sum(-1).transpose(1, 2)
        if lattice is not None:
            out = out + (self.periodic_k0(lattice).to(out.dtype) * keep.sum(1)[:, None])[:, None, :]
        return out

    def exact_row_sums(self, pos: torch.Tensor, padding_mask: torch.Tensor | None = None, **periodic) -> torch.Tensor:
        """O(L^2) reference of :meth:`row_sums`, ``[B, L, H]``."""
        mask = self.exact_mask(pos, **periodic)  # [B, H, L, L]
        if padding_mask is not None:
            mask = mask * (~padding_mask.bool())[:, None, None, :].to(mask.dtype)
        return mask.sum(-1).transpose(1, 2)

    def exact_mask(
        self,
        pos: torch.Tensor,
        *,
        cell: torch.Tensor | None = None,
        pbc: torch.Tensor | None = None,
        lattice: PeriodicLattice | None = None,
        drop_k0: bool = False,
    ) -> torch.Tensor:
        """Exact ``N[b,h,i,j] = f(pos_i - pos_j)``, ``[B, H, L, L]`` (O(L^2) reference).

        Periodic (``cell``/``pbc`` or ``lattice``): the lattice sum ``f_per`` to convergence;
        ``drop_k0`` subtracts the ``k = 0`` constant of 3D-periodic structures, which is what the
        attention features estimate.
        """
        self.check_positions(pos)
        lattice = self._lattice_of(pos, cell, pbc, lattice)
        if lattice is not None:
            return self.exact_periodic_mask(pos, lattice, drop_k0=drop_k0)
        delta = pos[:, :, None, :] - pos[:, None, :, :]
        return self.mask(delta).permute(0, 3, 1, 2)

    # -- periodic structures (DESIGN §7) ---------------------------------------------------------
    def _periodic_unsupported(self):
        return NotImplementedError(
            f"{type(self).__name__} has no periodic (reciprocal-lattice) features; use GaussianBasisRPE(dim=3)"
        )

    def periodic_proposal(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xi [H, F, 3], sigma [H, T'])``: continuous frequencies from the noise (frame coordinates)
        and the widths of the isotropic Gaussians whose uniform mixture they are drawn from."""
        raise self._periodic_unsupported()

    def periodic_spectrum(self, k: torch.Tensor, moment: int | tuple[int, ...] = 0):
        """``ghat(k)`` (``moment=0``) or ``sum_t s_t^2 ghat_t(k)`` (``moment=2``), ``[B, H, F]`` fp64;
        a tuple of moments gives a tuple (one evaluation of the terms)."""
        raise self._periodic_unsupported()

    def exact_periodic_mask(self, pos, lattice, *, drop_k0=False) -> torch.Tensor:
        raise self._periodic_unsupported()

    def periodic_draw(
        self,
        pos: torch.Tensor,
        noise: torch.Tensor,
        lattice: PeriodicLattice,
        *,
        padding_mask: torch.Tensor | None = None,
        origin_weights: torch.Tensor | None = None,
        oriented: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> PeriodicDraw:
        """Snap the noise's frequencies onto each structure's reciprocal lattice (DESIGN §7).

        On slabs (2 periodic directions) frequency ``f + F//2`` is frequency ``f`` with the normal
        component negated (antithetic pairs): the draw is then exactly symmetric under the
        rotation by pi about the normal that relates ``(a, b)`` to ``(-a, -b)``, the one choice a
        reduced plane basis leaves open.

        ``oriented``: ``lattice.orient(pos, padding_mask, origin_weights, sign=self.periodic_sign)``,
        precomputed (every draw of a forward pass on the same positions can share it; sums over
        atoms do not depend on the origin, so a context draw may share the attention's).

        Shapes: ``pos [B, L, 3]``, ``noise [H, F, w]`` -> :class:`PeriodicDraw`.
        """
        lattice = lattice.to(pos.device)
        draw = self.periodic_frequencies(noise, lattice)
        if oriented is None:
            oriented = lattice.orient(pos, padding_mask, origin_weights, sign=self.periodic_sign)
        u, frame = oriented  # fp64
        phase = self.periodic_phase(u, draw.q, torch.promote_types(pos.dtype, torch.float32))
        return replace(draw, phase=phase, frame=frame)

    def periodic_features_many(
        self,
        pos: torch.Tensor,
        noises: list[torch.Tensor],
        lattice: PeriodicLattice,
        *,
        split: str = "auto",
        padding_mask: torch.Tensor | None = None,
        origin_weights: torch.Tensor | None = None,
        oriented: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[features(pos, noise=n, lattice=lattice, ...) for n in noises]`` in one pass.

        Several layers that share this RPE (each with its own fixed noise) draw on the same
        positions: stacking their noises as extra heads (row ``g H + h`` uses head ``h``'s
        parameters) runs the sampler, the weights and the feature maps once, on larger tensors.
        The values are those of one call per noise (tested).

        Shapes: ``noises``: each ``[H, F, w]`` (one ``F`` for all) -> a list of ``(n1, n2)``, each
        ``[B, H, L, 2F]``.
        """
        balanced, signed = self._check_split(split)
        for noise in noises:
            self._check_noise(noise, noises[0].shape[1])
        H = self.num_heads
        draw = self.periodic_draw(pos, torch.cat(list(noises), dim=0), lattice, padding_mask=padding_mask,
                                  origin_weights=origin_weights, oriented=oriented)
        n1, n2 = features_from_angles(draw.phase, self.periodic_weights(draw), balanced=balanced, signed=signed)
        out = []
        for g in range(len(noises)):
            m1 = n1[:, g * H:(g + 1) * H]
            out.append((m1, m1 if n2 is n1 else n2[:, g * H:(g + 1) * H]))  # balanced: one tensor, as features()
        return out

    def periodic_frequencies(self, noise: torch.Tensor, lattice: PeriodicLattice) -> PeriodicDraw:
        """The per-structure part of :meth:`periodic_draw`: frequencies, proposal and ``k = 0`` flags,
        with an empty ``phase`` (``[B, H, 0, F]``); :meth:`periodic_phase` gives the phases of any
        subset of atoms (chunked inference over very large structures)."""
        if self.dim != 3:
            raise ValueError(f"periodic features need dim=3 positions, this RPE has dim={self.dim}")
        xi, sigma = self.periodic_proposal(noise)
        xi, sigma = xi.detach().double(), sigma.detach().double()
        H, F, _ = xi.shape
        P = lattice.periodic_dims
        half = F // 2
        flipped = torch.cat([xi[:, :half], xi[:, :half] * xi.new_tensor([1.0, 1.0, -1.0]), xi[:, 2 * half:]], dim=1)
        xi_b = torch.where((P == 2)[:, None, None, None], flipped[None], xi[None])  # [B, H, F, 3]
        q, k = snap_frequencies(xi_b, lattice.basis, P)
        log_p = periodic_mixture_log_density(k, sigma, lattice.basis, P)
        zero = (P == 3)[:, None, None] & (q == 0).all(-1)
        phase = torch.zeros(q.shape[0], H, 0, F, dtype=torch.float32, device=q.device)
        return PeriodicDraw(q=q, k=k, log_p=log_p, zero=zero, phase=phase, lattice=lattice, frame=lattice.frame)

    @staticmethod
    def periodic_phase(u: torch.Tensor, q: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Phases ``2 pi (q . u mod 1)`` of fractional coordinates ``u [B, L, 3]`` (fp64) for the
        frequencies ``q [B, H, F, 3]``, ``[B, H, L, F]`` in ``dtype``.

        ``q . u`` in fp64, reduced mod 1 before the cast: fp32 phases then err by ~4e-7 rad
        whatever the size of ``q . u`` (DESIGN §7). The reduction keeps the sign (``frac``, in
        ``(-1, 1)``: a whole turn less than ``remainder(., 1)`` for negative ``q . u``, the same
        cos and sin; measured 6x cheaper than ``remainder`` in fp64).
        """
        turns = torch.einsum("bli,bhfi->bhlf", u, q).frac_()  # in place: einsum's backward needs its inputs only
        return turns.to(dtype).mul_(2.0 * math.pi) if dtype != turns.dtype else turns.mul_(2.0 * math.pi)

    def periodic_weights(self, draw: PeriodicDraw, moment: int | tuple[int, ...] = 0):
        """Importance weights ``a = ghat(k) / (V_P p(q))`` (``moment=2``: ``sum_t s_t^2 ghat_t``), 0 at ``k = 0``.

        Gradients reach the spectrum's parameters through ``ghat`` only: ``k`` and ``p`` are
        samples (detached), which keeps the width gradients unbiased although ``q`` jumps as the
        widths move. Shapes: ``[B, H, F]`` fp64; a tuple of moments gives a tuple of them.
        """
        spectra = self.periodic_spectrum(draw.k, moment)
        inv_norm = torch.exp(-(draw.log_p + torch.log(draw.lattice.covolume)[:, None, None]))
        # where(), not a zeroed factor: the features take sqrt(a), whose gradient at a = 0 is
        # infinite; where() sends the k = 0 samples no gradient at all.
        weights = tuple(torch.where(draw.zero, 0.0, g * inv_norm) for g in
                        (spectra if isinstance(moment, tuple) else (spectra,)))
        return weights if isinstance(moment, tuple) else weights[0]

    def periodic_k0(self, lattice: PeriodicLattice) -> torch.Tensor:
        """The ``k = 0`` term ``ghat(0) / V`` of 3D-periodic structures (0 for the others), ``[B, H]`` fp64.

        A constant per structure and head: it cancels in the attention softmax (the features
        leave it out) and is added exactly to sums over atoms.
        """
        zero = torch.zeros(lattice.num_structures, self.num_heads, 1, 3, dtype=torch.float64,
                           device=lattice.basis.device)
        g0 = self.periodic_spectrum(zero)[..., 0]  # [B, H]
        return torch.where((lattice.periodic_dims == 3)[:, None], g0 / lattice.covolume[:, None], torch.zeros_like(g0))


# ------------------------------------------------------------------------------------------------
class GaussianBasisRPE(SpectralRPE):
    r"""Gaussian-basis RPE (3D atoms; any dimension).

    ``f(x) = sum_t A_t exp(-|x|^2 / (2 s_t^2))``;  ``g(xi) = sum_t A_t N(xi; 0, sigma_t^2 I)`` with
    ``sigma_t = 1/(2 pi s_t)`` (DESIGN.md's ``w_t = A_t (2 pi s_t^2)^(l/2)``). Per head ``T``
    learnable widths ``s_t`` and amplitudes ``A_t`` (nonnegative by default, so the balanced split).

    Samplers for ``p``:
      * ``"mixture"`` (default): uniform mixture of the terms' own Gaussians ``N(0, sigma_t^2 I)``
        (component index and ``z`` from parameter-free noise, ``xi = sigma_t z``), so
        ``g/p = T sum_t A_t N_t / sum_s N_s <= T max |A_t|``;
      * ``"gaussian"``: ``N(0, sigma^2 I)`` with learnable per-head
        ``sigma = sigma_min (1 + softplus(rho))``, ``sigma_min = 1/(2 pi min_t s_t)``, so
        ``g/p <= sum_t |A_t| (sigma/sigma_t)^l`` stays bounded (reparameterised: ``xi = sigma z``).
        Bounded but large when the widths span a wide range: a single Gaussian wide enough for
        the narrowest term undersamples the near-zero frequencies of the broad ones (measured by
        ``flt-mol bench rpe``: T=8 widths in [0.5, 4] A in 3D give c = 177, E[a^2] = 27 against
        c = 1.4, E[a^2] = 0.97 for the mixture), hence not the default;
      * ``"standard"``: ``N(0, I)`` (bounded only while every ``s_t >= 1/(2 pi)``).

    Args:
        num_heads: H.  num_kernels: T.  dim: l.
        sampler: as above.  nonnegative: ``A_t = softplus(.)`` (else signed, one-sided split).
        init_scale_range: widths ``s_t`` are initialised log-spaced in this range (length units).
        init_peak: initial ``f(0) = sum_t A_t`` (keep O(1) or less, DESIGN.md §2(c)).
    """

    def __init__(
        self,
        num_heads: int,
        num_kernels: int,
        dim: int = 3,
        *,
        sampler: str = "mixture",
        nonnegative: bool = True,
        init_scale_range: tuple[float, float] = (0.5, 4.0),
        init_peak: float = 1.0,
        init_sigma_excess: float = 0.1,
    ):
        super().__init__(num_heads, dim)
        if not isinstance(num_kernels, int) or num_kernels < 1:
            raise ValueError(f"num_kernels must be a positive int, got {num_kernels!r}")
        if sampler not in ("gaussian", "standard", "mixture"):
            raise ValueError(f"sampler must be gaussian, standard or mixture, got {sampler!r}")
        lo, hi = init_scale_range
        if not (0 < lo <= hi):
            raise ValueError(f"init_scale_range must satisfy 0 < lo <= hi, got {init_scale_range}")
        if init_sigma_excess <= 0:
            raise ValueError(f"init_sigma_excess must be > 0, got {init_sigma_excess}")
        self.num_kernels = num_kernels
        self.sampler = sampler
        self.nonnegative = nonnegative
        self.nonnegative_spectrum = nonnegative
        self.init_scale_range = (float(lo), float(hi))
        self.init_peak = float(init_peak)
        self.init_sigma_excess = float(init_sigma_excess)
        self.log_scale = nn.Parameter(torch.empty(num_heads, num_kernels))
        self.amplitude_raw = nn.Parameter(torch.empty(num_heads, num_kernels))
        if sampler == "gaussian":
            self.sigma_raw = nn.Parameter(torch.empty(num_heads))
        else:
            self.register_parameter("sigma_raw", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        lo, hi = self.init_scale_range
        T = self.num_kernels
        with torch.no_grad():
            ls = torch.linspace(math.log(lo), math.log(hi), T) if T > 1 else torch.tensor([math.log(lo)])
            self.log_scale.copy_(ls.expand(self.num_heads, T))
            # Small random spread of amplitudes so heads differ; sum_t A_t ~ init_peak.
            base = self.init_peak / T
            amp = base * (0.5 + torch.rand(self.num_heads, T))
            if self.nonnegative:
                self.amplitude_raw.copy_(amp + torch.log(-torch.expm1(-amp)))
            else:
                sign = torch.where(torch.rand(self.num_heads, T) < 0.5, -1.0, 1.0)
                self.amplitude_raw.copy_(sign * amp)
            if self.sigma_raw is not None:
                self.sigma_raw.fill_(_inv_softplus(self.init_sigma_excess))

    # parameters in natural units
    @property
    def scales(self) -> torch.Tensor:
        """``s_t``, ``[H, T]``."""
        return self.log_scale.exp()

    @property
    def amplitudes(self) -> torch.Tensor:
        """``A_t`` (``f = sum_t A_t exp(-|x|^2/2s_t^2)``), ``[H, T]``."""
        return F_.softplus(self.amplitude_raw) if self.nonnegative else self.amplitude_raw

    @property
    def sigma(self) -> torch.Tensor:
        """Std of the sampling Gaussian, ``[H]`` (``"gaussian"``: learnable, >= 1/(2 pi min s))."""
        if self.sampler != "gaussian":
            # "standard": N(0, I); "mixture" has no single sigma (reported as 1 for reference).
            return torch.ones(self.num_heads, device=self.log_scale.device)
        sigma_min = 1.0 / (2.0 * math.pi * self.scales.min(dim=-1).values)
        return sigma_min * (1.0 + F_.softplus(self.sigma_raw))

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        """``f(delta) = sum_t A_t exp(-|delta|^2/(2 s_t^2))``; ``[..., l] -> [..., H]``."""
        self._check_delta(delta)
        d2 = (_acc(delta) ** 2).sum(-1)[..., None]  # [..., 1]
        inv = 0.5 / self.scales**2  # [H, T]
        amps = self.amplitudes
        # A loop over the T terms keeps memory at O(|delta| H), not O(|delta| H T).
        out = amps[:, 0] * _exp_floored(-d2 * inv[:, 0])
        for t in range(1, self.num_kernels):
            out = out + amps[:, t] * _exp_floored(-d2 * inv[:, t])
        return out

    def exact_mask(self, pos: torch.Tensor, **periodic) -> torch.Tensor:
        """Exact ``[B, H, L, L]`` mask, built head-major to avoid a transposed copy.

        ``periodic`` (``cell``, ``pbc``, ``lattice``, ``drop_k0``): see :meth:`SpectralRPE.exact_mask`.
        """
        if any(periodic.get(key) is not None for key in ("cell", "lattice")):
            return super().exact_mask(pos, **periodic)
        self.check_positions(pos)
        d2 = torch.cdist(_acc(pos), _acc(pos), compute_mode="donot_use_mm_for_euclid_dist")
        d2 = d2.square()[:, None]  # [B, 1, L, L]; exact differences, no |a|^2+|b|^2-2ab
        inv = (0.5 / self.scales**2)[None, :, :, None, None]  # [1, H, T, 1, 1]
        amps = self.amplitudes[None, :, :, None, None]
        if torch.is_grad_enabled() and (inv.requires_grad or amps.requires_grad or d2.requires_grad):
            out = amps[:, :, 0] * _exp_floored(-d2 * inv[:, :, 0])
            for t in range(1, self.num_kernels):
                out = out + amps[:, :, t] * _exp_floored(-d2 * inv[:, :, t])
            return out
        # No graph: accumulate in place, two [B, H, L, L] buffers whatever T is.
        out = torch.zeros(d2.shape[0], self.num_heads, *d2.shape[2:], dtype=d2.dtype, device=d2.device)
        tmp = torch.empty_like(out)
        for t in range(self.num_kernels):
            torch.mul(d2, -inv[:, :, t], out=tmp)
            tmp.clamp_(min=_EXP_FLOOR).exp_().mul_(amps[:, :, t])
            out.add_(tmp)
        return out

    def noise_width(self) -> int:
        return self.dim + (1 if self.sampler == "mixture" else 0)

    def draw_noise(self, num_features, generator=None, device=None) -> torch.Tensor:
        device = self._device(device)
        z = torch.randn(self.num_heads, num_features, self.dim, generator=generator, device=device)
        if self.sampler != "mixture":
            return z
        u = torch.rand(self.num_heads, num_features, 1, generator=generator, device=device)
        return torch.cat([z, u], dim=-1)

    def _log_term_densities(self, xi: torch.Tensor) -> torch.Tensor:
        """``log N(xi; 0, sigma_t^2 I)`` per term: ``xi [H,F,l] -> [H,F,T]``."""
        sigma_t = 1.0 / (2.0 * math.pi * self.scales)  # [H, T]
        r2 = (xi**2).sum(-1, keepdim=True)  # [H, F, 1]
        s2 = (sigma_t**2)[:, None, :]  # [H, 1, T]
        return -r2 / (2.0 * s2) - 0.5 * self.dim * (_LOG_2PI + torch.log(s2))

    def sample(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_noise(noise, None)
        noise = _acc(noise)
        z = noise[..., : self.dim]
        amps = self.amplitudes[:, None, :]  # [H, 1, T]
        if self.sampler == "mixture":
            T = self.num_kernels
            idx = (noise[..., self.dim] * T).long().clamp_(0, T - 1)  # [H, F]
            sigma_t = 1.0 / (2.0 * math.pi * self.scales)  # [H, T]
            xi = z * torch.gather(sigma_t, 1, idx)[..., None]
            w = torch.softmax(self._log_term_densities(xi), dim=-1)  # N_t / sum_s N_s
            a = T * (w * amps).sum(-1)
            return xi, a
        sigma = self.sigma[:, None, None]  # [H, 1, 1]
        xi = z * sigma
        log_p = -0.5 * (z**2).sum(-1) - 0.5 * self.dim * _LOG_2PI - self.dim * torch.log(sigma[..., 0])
        a = (amps * torch.exp(self._log_term_densities(xi) - log_p[..., None])).sum(-1)
        return xi, a

    # -- periodic structures (DESIGN §7) ---------------------------------------------------------
    def periodic_proposal(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous frequencies of the configured sampler and its component widths (see base class).

        ``mixture``: ``xi = z / (2 pi s_t)`` with the term ``t`` from the noise, widths
        ``1/(2 pi s_t)``; ``gaussian``: ``xi = sigma z``; ``standard``: ``xi = z``. Stacked noises
        ``[G H, F, w]`` (see :meth:`periodic_features_many`) give ``[G H, F, 3]`` and ``[G H, T']``.
        """
        self._check_noise(noise, None, groups=True)
        noise = _acc(noise)
        z = noise[..., : self.dim]
        sigma_t = _per_row(1.0 / (2.0 * math.pi * self.scales), noise.shape[0])  # [G H, T]
        if self.sampler == "mixture":
            T = self.num_kernels
            idx = (noise[..., self.dim] * T).long().clamp_(0, T - 1)  # [G H, F]
            return z * torch.gather(sigma_t, 1, idx)[..., None], sigma_t
        sigma = _per_row(self.sigma[:, None], noise.shape[0])  # [G H, 1]
        return z * sigma[..., None], sigma

    def periodic_spectrum(self, k: torch.Tensor, moment: int = 0) -> torch.Tensor:
        """``ghat(k) = sum_t A_t (2 pi s_t^2)^{3/2} exp(-2 pi^2 s_t^2 |k|^2)`` (the 3D transform of
        ``f``); ``moment=2`` weights term ``t`` by ``s_t^2`` (the displacement head's spectrum).

        Shapes: ``k [B, H, F, 3]`` -> ``[B, H, F]`` fp64 (differentiable in ``A_t``, ``s_t``); stacked
        draws ``k [B, G H, F, 3]`` (:meth:`periodic_features_many`) -> ``[B, G H, F]``.
        """
        moments = moment if isinstance(moment, tuple) else (moment,)
        if any(m not in (0, 2) for m in moments):
            raise ValueError(f"moment must be 0 or 2 (or a tuple of them), got {moment}")
        s2 = _per_row(self.scales.double() ** 2, k.shape[1])  # [H, T]
        k2 = (k.double() ** 2).sum(-1)[..., None]  # [B, H, F, 1]
        log_g = 1.5 * torch.log(2.0 * math.pi * s2)[:, None, :] - 2.0 * math.pi**2 * s2[:, None, :] * k2
        terms = torch.exp(log_g)  # [B, H, F, T], shared by every moment asked for
        amps = _per_row(self.amplitudes.double(), k.shape[1])  # [H, T]
        out = tuple(torch.matmul(terms, (amps * s2 if m == 2 else amps)[..., None])[..., 0] for m in moments)
        return out if isinstance(moment, tuple) else out[0]

    def exact_periodic_mask(self, pos: torch.Tensor, lattice: PeriodicLattice, *, drop_k0: bool = False) -> torch.Tensor:
        """Real-space lattice sum ``f_per(pos_i - pos_j)`` to convergence, ``[B, H, L, L]`` (O(L^2) reference)."""
        r = torch.einsum("blx,bxk->blk", pos.double(), lattice.frame.to(pos.device))
        delta = r[:, :, None, :] - r[:, None, :, :]
        out = gaussian_lattice_sum(delta, lattice.to(pos.device), self.amplitudes, self.scales)
        if drop_k0:
            out = out - self.periodic_k0(lattice.to(pos.device))[:, None, None, :]
        dtype = torch.promote_types(pos.dtype, torch.float32)
        return out.permute(0, 3, 1, 2).to(dtype)

    @torch.no_grad()
    def c_bound(self) -> float:
        amps = self.amplitudes.abs()
        if self.sampler == "mixture":
            return float(self.num_kernels * amps.max())
        sigma_t = 1.0 / (2.0 * math.pi * self.scales)
        sigma = self.sigma[:, None]
        if bool((sigma < sigma_t).any()):
            return float("inf")
        return float((amps * (sigma / sigma_t) ** self.dim).sum(-1).max())

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_kernels={self.num_kernels}, dim={self.dim}, "
            f"sampler={self.sampler!r}, nonnegative={self.nonnegative}"
        )


# ------------------------------------------------------------------------------------------------
class GaussianMixtureRPE(SpectralRPE):
    r"""Gaussian-mixture spectrum (means, widths, signed weights).

    ``g(xi) = sum_t B_t N(xi; mu_t, s_t^2 I)`` (DESIGN.md's ``w_t = B_t (2 pi s_t^2)^(-l/2)``);
    ``Re f(x) = sum_t B_t exp(-2 pi^2 s_t^2 |x|^2) cos(2 pi mu_t . x)``.

    Samplers: ``"mixture"`` (default; uniform mixture of the components, ``xi = mu_t + s_t z``,
    ``c <= T max |B_t|``) or ``"standard"`` (``N(0, I)``, finite ``c`` only while every
    ``s_t < 1``). Frequencies are in cycles per unit of position (``|mu| <= 1/2`` for tokens).

    Args:
        num_heads: H.  num_modes: T.  dim: l.
        nonnegative: ``B_t = softplus(.)`` and the balanced split (default: signed).
        init_mean_range: means initialised uniformly in ``[-r, r]^l``.
        init_std: initial ``s_t``.  init_peak: rough scale of ``|f(0)|``.
    """

    def __init__(
        self,
        num_heads: int,
        num_modes: int,
        dim: int,
        *,
        sampler: str = "mixture",
        nonnegative: bool = False,
        init_mean_range: float = 0.5,
        init_std: float = 0.05,
        init_peak: float = 1.0,
    ):
        super().__init__(num_heads, dim)
        if not isinstance(num_modes, int) or num_modes < 1:
            raise ValueError(f"num_modes must be a positive int, got {num_modes!r}")
        if sampler not in ("mixture", "standard"):
            raise ValueError(f"sampler must be mixture or standard, got {sampler!r}")
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {init_std}")
        self.num_modes = num_modes
        self.sampler = sampler
        self.nonnegative = nonnegative
        self.nonnegative_spectrum = nonnegative
        self.init_mean_range = float(init_mean_range)
        self.init_std = float(init_std)
        self.init_peak = float(init_peak)
        self.means = nn.Parameter(torch.empty(num_heads, num_modes, dim))
        self.log_std = nn.Parameter(torch.empty(num_heads, num_modes))
        self.amplitude_raw = nn.Parameter(torch.empty(num_heads, num_modes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.means.uniform_(-self.init_mean_range, self.init_mean_range)
            self.log_std.fill_(math.log(self.init_std))
            amp = self.init_peak / math.sqrt(self.num_modes) * torch.randn(self.num_heads, self.num_modes)
            if self.nonnegative:
                amp = amp.abs().clamp_min(1e-3)
                self.amplitude_raw.copy_(amp + torch.log(-torch.expm1(-amp)))
            else:
                self.amplitude_raw.copy_(amp)

    @property
    def stds(self) -> torch.Tensor:
        return self.log_std.exp()

    @property
    def amplitudes(self) -> torch.Tensor:
        return F_.softplus(self.amplitude_raw) if self.nonnegative else self.amplitude_raw

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        """``Re f(delta)``; ``[..., l] -> [..., H]``."""
        self._check_delta(delta)
        delta = _acc(delta)
        d2 = (delta**2).sum(-1)[..., None, None]  # [..., 1, 1]
        phase = torch.einsum("...i,hti->...ht", delta, self.means)  # [..., H, T]
        env = _exp_floored(-2.0 * math.pi**2 * self.stds**2 * d2)
        return (self.amplitudes * env * torch.cos(2.0 * math.pi * phase)).sum(-1)

    def noise_width(self) -> int:
        return self.dim + (1 if self.sampler == "mixture" else 0)

    def draw_noise(self, num_features, generator=None, device=None) -> torch.Tensor:
        device = self._device(device)
        z = torch.randn(self.num_heads, num_features, self.dim, generator=generator, device=device)
        if self.sampler != "mixture":
            return z
        u = torch.rand(self.num_heads, num_features, 1, generator=generator, device=device)
        return torch.cat([z, u], dim=-1)

    def _log_comp(self, xi: torch.Tensor) -> torch.Tensor:
        """``log N(xi; mu_t, s_t^2)``: ``[H,F,l] -> [H,F,T]``."""
        diff = xi[:, :, None, :] - self.means[:, None, :, :]  # [H, F, T, l]
        s2 = (self.stds**2)[:, None, :]
        return -(diff**2).sum(-1) / (2.0 * s2) - 0.5 * self.dim * (_LOG_2PI + torch.log(s2))

    def sample(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_noise(noise, None)
        noise = _acc(noise)
        z = noise[..., : self.dim]
        amps = self.amplitudes[:, None, :]
        if self.sampler == "mixture":
            T = self.num_modes
            idx = (noise[..., self.dim] * T).long().clamp_(0, T - 1)  # [H, F]
            mu = torch.gather(self.means, 1, idx[..., None].expand(-1, -1, self.dim))
            s = torch.gather(self.stds, 1, idx)[..., None]
            xi = mu + s * z
            w = torch.softmax(self._log_comp(xi), dim=-1)
            return xi, T * (w * amps).sum(-1)
        xi = z
        log_p = -0.5 * (z**2).sum(-1) - 0.5 * self.dim * _LOG_2PI
        return xi, (amps * torch.exp(self._log_comp(xi) - log_p[..., None])).sum(-1)

    @torch.no_grad()
    def c_bound(self) -> float:
        amps = self.amplitudes.abs()
        if self.sampler == "mixture":
            return float(self.num_modes * amps.max())
        s = self.stds
        if bool((s >= 1.0).any()):
            return float("inf")
        # sup_xi N(xi; mu, s^2)/N(xi; 0, 1) = s^-l exp(|mu|^2 / (2 (1 - s^2))).
        mu2 = (self.means**2).sum(-1)
        per = amps * s ** (-self.dim) * torch.exp(mu2 / (2.0 * (1.0 - s**2)))
        return float(per.sum(-1).max())

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_modes={self.num_modes}, dim={self.dim}, "
            f"sampler={self.sampler!r}, nonnegative={self.nonnegative}"
        )


# ------------------------------------------------------------------------------------------------
class LocalRPE(SpectralRPE):
    r"""Local RPE: sums of boxes (lattice) or of the continuous ``sinc^k`` masks; product over dims.

    ``lattice=True`` (integer positions: text tokens, image patches):
    ``f(n) = sum_t C_t prod_j h(|n_j|; v_tj)`` with the box ``h(n; v) = clamp(v + 1 - n, 0, 1)``
    (exactly ``1[|n| <= v]`` at integer ``v``; linear in ``v`` in between so ``v`` gets gradients).
    On integers only the aliased spectrum on ``[-1/2, 1/2)^l`` matters,
    ``G(xi) = sum_t C_t prod_j (h(0) + 2 sum_{n>=1} h(n) cos(2 pi n xi_j))``, sampled with the
    uniform ``p`` (density 1), ``c <= max_h sum_t |C_t| prod_j (2 v_tj + 1)``. Positions must be
    integers (``features`` refuses others: the box spectrum has no finite-variance ``p`` on
    continuous positions, DESIGN.md §2(b)).

    ``lattice=False`` (continuous positions): each term is the ``k``-fold self-convolution of the
    box of half-width ``v`` (``k = order >= 2``), normalised to peak ``C_t``:
    ``f_t(x) = C_t prod_j IH_k((x_j + k v)/(2v)) / IH_k(k/2)``,
    ``g_t(xi) = C_t prod_j 2v sinc(2 v xi_j)^k / IH_k(k/2)`` (``sinc(u) = sin(pi u)/(pi u)``,
    ``IH_k`` the Irwin-Hall density); ``p`` = uniform mixture over terms of product Student-t with
    ``nu = k - 1`` (tails ``|xi|^-k``) and scale ``1/(2 v_tj)``, so ``c`` is finite.

    Args:
        num_heads: H.  num_terms: T.  dim: l.  lattice, order: as above.
        init_half_width_range: half-widths ``v`` initialised linearly in this range.
        init_peak: initial scale of ``|C_t|`` sums.
    """

    def __init__(
        self,
        num_heads: int,
        num_terms: int,
        dim: int,
        lattice: bool = True,
        order: int = 2,
        *,
        init_half_width_range: tuple[float, float] = (1.0, 8.0),
        init_peak: float = 1.0,
    ):
        super().__init__(num_heads, dim)
        if not isinstance(num_terms, int) or num_terms < 1:
            raise ValueError(f"num_terms must be a positive int, got {num_terms!r}")
        if not isinstance(order, int) or (not lattice and order < 2):
            raise ValueError(
                f"order must be an int >= 2 for the continuous local RPE (lattice=False), got {order!r}"
            )
        lo, hi = init_half_width_range
        if not (0 < lo <= hi):
            raise ValueError(f"init_half_width_range must satisfy 0 < lo <= hi, got {init_half_width_range}")
        self.num_terms = num_terms
        self.lattice = bool(lattice)
        self.integer_positions = self.lattice
        self.order = int(order)
        self.init_half_width_range = (float(lo), float(hi))
        self.init_peak = float(init_peak)
        self.half_width_raw = nn.Parameter(torch.empty(num_heads, num_terms, dim))
        self.amplitudes = nn.Parameter(torch.empty(num_heads, num_terms))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        lo, hi = self.init_half_width_range
        T = self.num_terms
        with torch.no_grad():
            v = torch.linspace(lo, hi, T) if T > 1 else torch.tensor([lo])
            raw = v + torch.log(-torch.expm1(-v))
            self.half_width_raw.copy_(raw[None, :, None].expand(self.num_heads, T, self.dim))
            self.amplitudes.copy_(self.init_peak / math.sqrt(T) * torch.randn(self.num_heads, T))

    @property
    def half_widths(self) -> torch.Tensor:
        """``v_tj``, ``[H, T, l]`` (positive)."""
        return F_.softplus(self.half_width_raw) + 1e-3

    # --- lattice helpers
    @staticmethod
    def _box(n: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.clamp(v + 1.0 - n, 0.0, 1.0)

    def _ih_peak(self) -> float:
        k = self.order
        return float(irwin_hall_pdf(torch.tensor([k / 2.0], dtype=torch.float64), k))

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        """``f(delta)``; ``[..., l] -> [..., H]`` (lattice: meant for integer ``delta``)."""
        self._check_delta(delta)
        x = _acc(delta).abs()[..., None, None, :]  # [..., 1, 1, l]
        v = self.half_widths  # [H, T, l]
        if self.lattice:
            per_dim = self._box(x, v)
        else:
            k = self.order
            per_dim = irwin_hall_pdf((x + k * v) / (2.0 * v), k) / self._ih_peak()
        return (self.amplitudes * per_dim.prod(-1)).sum(-1)

    def noise_width(self) -> int:
        return self.dim if self.lattice else 2 * self.dim + 1

    def draw_noise(self, num_features, generator=None, device=None) -> torch.Tensor:
        device = self._device(device)
        H, l = self.num_heads, self.dim
        if self.lattice:
            return torch.rand(H, num_features, l, generator=generator, device=device) - 0.5
        nu = self.order - 1
        z = torch.randn(H, num_features, l, generator=generator, device=device)
        chi2 = (torch.randn(H, num_features, l, nu, generator=generator, device=device) ** 2).sum(-1)
        u = torch.rand(H, num_features, 1, generator=generator, device=device)
        return torch.cat([z, chi2, u], dim=-1)

    def sample(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_noise(noise, None)
        noise = _acc(noise)
        v = self.half_widths  # [H, T, l]
        C = self.amplitudes  # [H, T]
        if self.lattice:
            xi = noise  # [H, F, l], uniform on [-1/2, 1/2)
            n_max = int(math.ceil(float(v.detach().max()))) + 1
            n = torch.arange(1, n_max + 1, device=xi.device, dtype=xi.dtype)  # [N]
            h0 = self._box(torch.zeros((), device=xi.device), v)  # [H, T, l]
            hn = self._box(n, v[..., None])  # [H, T, l, N]
            cosn = torch.cos(2.0 * math.pi * xi[..., None] * n)  # [H, F, l, N]
            G = h0[:, None] + 2.0 * torch.einsum("htin,hfin->hfti", hn, cosn)  # [H, F, T, l]
            a = (C[:, None, :] * G.prod(-1)).sum(-1)
            return xi, a
        k, nu, l = self.order, self.order - 1, self.dim
        z, chi2, u = noise[..., :l], noise[..., l : 2 * l], noise[..., 2 * l]
        tau = z / torch.sqrt(chi2 / nu)  # Student-t(nu), [H, F, l]
        T = self.num_terms
        idx = (u * T).long().clamp_(0, T - 1)  # [H, F]
        v_sel = torch.gather(v, 1, idx[..., None].expand(-1, -1, l))  # [H, F, l]
        xi = tau / (2.0 * v_sel)
        uu = 2.0 * v[:, None, :, :] * xi[:, :, None, :]  # [H, F, T, l]
        log_t = _student_t_logpdf(uu, nu)
        log_p_t = (torch.log(2.0 * v)[:, None] + log_t).sum(-1)  # [H, F, T]
        w = torch.softmax(log_p_t, dim=-1)
        ratio = (torch.sinc(uu) ** k * torch.exp(-log_t) / self._ih_peak()).prod(-1)  # [H, F, T]
        a = T * (C[:, None, :] * w * ratio).sum(-1)
        return xi, a

    def check_positions(self, pos: torch.Tensor) -> None:
        super().check_positions(pos)
        if self.lattice and not bool(torch.all(pos == torch.round(pos))):
            raise ValueError(
                "LocalRPE(lattice=True) needs integer positions (the box spectrum has unbounded "
                "variance on continuous positions); use lattice=False for continuous pos"
            )

    @torch.no_grad()
    def c_bound(self) -> float:
        v = self.half_widths
        C = self.amplitudes.abs()
        if self.lattice:
            n_max = int(math.ceil(float(v.max()))) + 1
            n = torch.arange(1, n_max + 1, dtype=v.dtype, device=v.device)
            G0 = self._box(torch.zeros((), device=v.device), v) + 2.0 * self._box(n, v[..., None]).sum(-1)
            return float((C * G0.prod(-1)).sum(-1).max())
        k, nu = self.order, self.order - 1
        U = 1e3
        u = torch.linspace(0.0, U, 200001, dtype=torch.float64)
        ratio = torch.sinc(u).abs() ** k * torch.exp(-_student_t_logpdf(u, nu))
        tail = (math.pi * U) ** (-k) * math.exp(-float(_student_t_logpdf(torch.tensor(U, dtype=torch.float64), nu)))
        M = max(float(ratio.max()), tail) / self._ih_peak()
        return float(self.num_terms * C.max() * M**self.dim)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, num_terms={self.num_terms}, dim={self.dim}, "
            f"lattice={self.lattice}, order={self.order}"
        )


# ------------------------------------------------------------------------------------------------
class KernelRPE(SpectralRPE):
    r"""Shift-invariant kernel RPE ``f(x) = C K(x/ell)`` sampled from its own spectral density.

    By Bochner, ``g = C p_K``; sampling from ``p_K`` makes every weight ``a_k = C`` (``c = C``, the
    smallest possible). Kernels:
      * ``"gaussian"``: ``K = exp(-|x|^2/(2 ell^2))``, ``p_K = N(0, (2 pi ell)^-2 I)``;
      * ``"laplace"``: ``K = exp(-|x|/ell)`` (exponential, isotropic), ``p_K`` the multivariate
        Cauchy of scale ``1/(2 pi ell)`` (``xi = z/(2 pi ell |z0|)``).
    Per-head learnable length-scale ``ell`` and scale ``C > 0`` (balanced split).
    """

    def __init__(
        self,
        num_heads: int,
        kernel: str = "gaussian",
        dim: int = 1,
        *,
        init_length_scale: float = 1.0,
        init_scale: float = 1.0,
    ):
        super().__init__(num_heads, dim)
        if kernel not in ("gaussian", "laplace"):
            raise ValueError(f"kernel must be gaussian or laplace, got {kernel!r}")
        if init_length_scale <= 0 or init_scale <= 0:
            raise ValueError(
                f"init_length_scale and init_scale must be > 0, got {init_length_scale}, {init_scale}"
            )
        self.kernel = kernel
        self.nonnegative_spectrum = True
        self.init_length_scale = float(init_length_scale)
        self.init_scale = float(init_scale)
        self.log_length_scale = nn.Parameter(torch.empty(num_heads))
        self.log_scale = nn.Parameter(torch.empty(num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_length_scale.fill_(math.log(self.init_length_scale))
            self.log_scale.fill_(math.log(self.init_scale))

    @property
    def length_scale(self) -> torch.Tensor:
        return self.log_length_scale.exp()

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def mask(self, delta: torch.Tensor) -> torch.Tensor:
        self._check_delta(delta)
        d2 = (_acc(delta) ** 2).sum(-1, keepdim=True)  # [..., 1]
        ell = self.length_scale
        if self.kernel == "gaussian":
            return self.scale * _exp_floored(-d2 / (2.0 * ell**2))
        return self.scale * _exp_floored(-torch.sqrt(d2) / ell)

    def noise_width(self) -> int:
        return self.dim + (1 if self.kernel == "laplace" else 0)

    def draw_noise(self, num_features, generator=None, device=None) -> torch.Tensor:
        device = self._device(device)
        return torch.randn(
            self.num_heads, num_features, self.noise_width(), generator=generator, device=device
        )

    def sample(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_noise(noise, None)
        noise = _acc(noise)
        z = noise[..., : self.dim]
        ell = self.length_scale[:, None, None]
        xi = z / (2.0 * math.pi * ell)
        if self.kernel == "laplace":
            xi = xi / noise[..., self.dim :].abs().clamp_min(1e-12)
        a = self.scale[:, None].expand(-1, noise.shape[1])
        return xi, a

    @torch.no_grad()
    def c_bound(self) -> float:
        return float(self.scale.max())

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kernel={self.kernel!r}, dim={self.dim}"
