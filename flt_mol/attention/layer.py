"""FLTAttention: multi-head attention with a learned Fourier RPE in linear time.

Per head, with ``d`` the head width (paper Alg. 1, DESIGN.md §2):

* ``mode="flt"``: ``Q^ = [n1, Q d^-1/4]``, ``K^ = [n2, K d^-1/4]`` with ``(n1, n2)`` the RPE random
  features (``n1 n2^T ~ N``), so ``exp(Q^ K^^T) = exp(N^ + Q K^T/sqrt d)``; then the kernel
  feature map ``phi`` and linear attention ``phi(Q^)(phi(K^)^T V) / phi(Q^)(phi(K^)^T 1)``.
* ``mode="performer"``: the same without the RPE (``phi(Q d^-1/4)``, ``phi(K d^-1/4)``).
* ``mode="exact"``: ``softmax(Q K^T/sqrt d + N) V`` with the exact mask ``N = f(r_i - r_j)``
  (plain softmax when ``rpe`` is None); O(L^2), the reference.

The three modes share every learnable parameter (projections, RPE), so they can be compared
with everything else equal. Random quantities (the kernel projection and the RPE base noise) are
buffers, redrawn only by an explicit :meth:`FLTAttention.redraw_features` call.

Einsum letters: b batch, h heads, l positions, d head width, m features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flt_mol.attention.exact import softmax_attention, softmax_attention_weights
from flt_mol.attention.feature_maps import KERNELS, accumulation_dtype, build_feature_map
from flt_mol.attention.linear import (
    causal_linear_attention,
    linear_attention,
    linear_attention_weights,
)
from flt_mol.attention.periodic import PeriodicLattice
from typing import NamedTuple

from flt_mol.attention.rpe import RPE_SPLITS, SpectralRPE

__all__ = ["FLTAttention", "MODES", "PreparedRPE", "center_positions"]


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Promote to at least fp32 (fp64 stays fp64): features and sums never run in half precision."""
    return x.to(accumulation_dtype(x.dtype))

MODES = ("flt", "performer", "exact")


class PreparedRPE(NamedTuple):
    """A layer's RPE features with their kernel projections, for repeated calls on one geometry.

    ``n1, n2 [B, H, L, 2r]`` (:meth:`FLTAttention.rpe_features`); ``query, key``: the FAVOR+
    ``prefix`` of ``n1`` and ``n2`` (``(n W_n^T, |n|^2)``, see
    :func:`~flt_mol.attention.feature_maps.favor_plus_prefix`), or None when the kernel map has no
    prefix form. ``phi([n1, q]) = phi(q; prefix=query)`` exactly: the RPE block of the
    projection is applied once per geometry, not once per call.
    """

    n1: torch.Tensor
    n2: torch.Tensor
    query: tuple[torch.Tensor, torch.Tensor] | None
    key: tuple[torch.Tensor, torch.Tensor] | None

# Inputs up to this many elements (B L D) take the fused Q/K/V projection in the linear modes
# (e.g. the EMT demo's 16 x ~45 tokens x 64); above it, one projection at a time (memory).
_FUSED_QKV_MAX_ELEMENTS = 1 << 20


def center_positions(
    pos: torch.Tensor,
    *,
    padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    integer: bool = False,
) -> torch.Tensor:
    """Shift positions to a translation-covariant origin before the RPE features.

    The RPE estimate ``n1 . n2`` depends only on differences, but FAVOR+ with a fixed projection
    sees ``n1`` and ``n2`` themselves, so the FLT output is translation invariant only in
    distribution unless positions are centred first. Bidirectional: subtract the mean over real
    tokens (permutation invariant); causal: subtract the first token's position (the only origin
    that every prefix can see). Also keeps the angles ``2 pi r.xi`` small in fp32. ``integer``:
    round the centre so integer (lattice) positions stay integers (then exact for integer shifts).

    Shapes: ``pos [B, L, l]``, ``padding_mask [B, L]`` -> ``[B, L, l]``.
    """
    if causal:
        return pos - pos[:, :1]
    if padding_mask is None:
        center = pos.mean(dim=1, keepdim=True)
    else:
        keep = (~padding_mask).to(pos.dtype)[..., None]
        center = (pos * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1.0)
    # floor(c + 1/2), not round(): round-half-to-even would break exactness for integer shifts.
    return pos - (torch.floor(center + 0.5) if integer else center)


class FLTAttention(nn.Module):
    r"""Multi-head FourierLearner-Transformer attention (Choromanski et al., FLT).

    Args:
        embed_dim: D.  num_heads: H (``D % H == 0``, head width ``d = D/H``).
        rpe: a :class:`~flt_mol.attention.rpe.SpectralRPE` with ``rpe.num_heads == H`` (may be
            shared by several layers); required for ``mode="flt"``, ignored by ``"performer"``,
            optional for ``"exact"``.
        mode: ``"flt" | "performer" | "exact"``.
        num_rpe_features: r, frequencies of the RPE features (``2r`` columns: cos and sin).
        num_kernel_features: m, features of the kernel map (unused by ``"elu+1"``).
        kernel: ``"favor+" | "relu" | "learnable_relu" | "elu+1"``.
        causal: attend to ``j <= i`` only (chunked prefix sums in the linear modes).
        dropout: attention dropout. Exact mode: on the softmax weights. Linear modes: each key is
            dropped per (batch, head) from the numerator with ``1/(1-p)`` rescaling (the
            normaliser keeps it), so the expected output matches the undropped one.
        chunk_size: chunk length of the causal linear attention.
        bias: bias of the projections.
        rpe_split: ``"auto" | "balanced" | "one_sided" | "signed_balanced"`` (see ``SpectralRPE.features``).

    Shapes:
        ``forward(x [B, L, D], pos [B, L, l] | None, padding_mask [B, L] | None) -> [B, L, D]``;
        ``padding_mask`` True = pad. ``pos`` is needed whenever the RPE is used.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        rpe: SpectralRPE | None = None,
        mode: str = "flt",
        num_rpe_features: int = 16,
        num_kernel_features: int = 64,
        kernel: str = "favor+",
        causal: bool = False,
        dropout: float = 0.0,
        chunk_size: int = 64,
        bias: bool = True,
        rpe_split: str = "auto",
    ):
        super().__init__()
        if not isinstance(embed_dim, int) or not isinstance(num_heads, int) or embed_dim < 1 or num_heads < 1:
            raise ValueError(f"embed_dim and num_heads must be positive ints, got {embed_dim!r}, {num_heads!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if rpe is not None and not isinstance(rpe, SpectralRPE):
            raise TypeError(f"rpe must be a SpectralRPE (e.g. GaussianBasisRPE), got {type(rpe).__name__}")
        if mode == "flt" and rpe is None:
            raise ValueError("mode='flt' needs an rpe (e.g. GaussianBasisRPE); use mode='performer' without RPE")
        if rpe is not None and rpe.num_heads != num_heads:
            raise ValueError(f"rpe.num_heads ({rpe.num_heads}) must equal num_heads ({num_heads})")
        for name, val in (("num_rpe_features", num_rpe_features), ("num_kernel_features", num_kernel_features), ("chunk_size", chunk_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if rpe_split not in RPE_SPLITS:
            raise ValueError(f"rpe_split must be one of {RPE_SPLITS}, got {rpe_split!r}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.mode = mode
        self.kernel = kernel
        self.causal = causal
        self.dropout = float(dropout)
        self.chunk_size = chunk_size
        self.num_rpe_features = num_rpe_features
        self.num_kernel_features = num_kernel_features
        self.rpe_split = rpe_split
        self.rpe = rpe
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        qkv_scale = torch.ones(3 * embed_dim)
        qkv_scale[: 2 * embed_dim] = self.head_dim**-0.25
        self.register_buffer("qkv_scale", qkv_scale, persistent=False)
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)
        if mode == "exact":
            self.feature_map = None
        else:
            in_dim = self.head_dim + (2 * num_rpe_features if mode == "flt" else 0)
            self.feature_map = build_feature_map(kernel, in_dim, num_kernel_features)
        if rpe is not None:
            self.register_buffer("rpe_noise", rpe.draw_noise(num_rpe_features))
        else:
            self.rpe_noise = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialise the projections (the RPE, possibly shared, keeps its own parameters)."""
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.xavier_uniform_(self.out.weight)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
            nn.init.zeros_(self.out.bias)
        if isinstance(self.feature_map, nn.Module) and hasattr(self.feature_map, "reset_parameters"):
            self.feature_map.reset_parameters()

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a new kernel projection and new RPE base noise (explicit, never in forward)."""
        if self.feature_map is not None:
            self.feature_map.redraw(generator)
        if self.rpe is not None:
            noise = self.rpe.draw_noise(self.num_rpe_features, generator, device=self.rpe_noise.device)
            self.rpe_noise.copy_(noise)

    # --------------------------------------------------------------------------------------------
    def _check_inputs(self, x, pos, padding_mask) -> None:
        if not torch.is_tensor(x) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be [B, L, {self.embed_dim}], got {shape}")
        B, L, _ = x.shape
        if padding_mask is not None:
            if not torch.is_tensor(padding_mask) or padding_mask.shape != (B, L):
                shape = tuple(padding_mask.shape) if torch.is_tensor(padding_mask) else type(padding_mask).__name__
                raise ValueError(f"padding_mask must be [B, L] = [{B}, {L}], got {shape}")
            if padding_mask.dtype != torch.bool:
                raise TypeError(f"padding_mask must be a bool tensor (True = pad), got {padding_mask.dtype}")
        if self._uses_rpe():
            if pos is None:
                raise ValueError(f"pos [B, L, {self.rpe.dim}] is required: mode={self.mode!r} uses the RPE")
            if not torch.is_tensor(pos) or pos.dim() != 3 or pos.shape[:2] != (B, L):
                shape = tuple(pos.shape) if torch.is_tensor(pos) else type(pos).__name__
                raise ValueError(f"pos must be [B, L, l] = [{B}, {L}, {self.rpe.dim}], got {shape}")
            if pos.shape[-1] != self.rpe.dim:
                raise ValueError(
                    f"pos has {pos.shape[-1]} coordinates but the rpe has dim={self.rpe.dim}"
                )

    def _uses_rpe(self) -> bool:
        return self.rpe is not None and self.mode in ("flt", "exact")

    def _exact_bias(self, pos: torch.Tensor | None, lattice: PeriodicLattice | None = None) -> torch.Tensor | None:
        """The exact mask ``[B or 1, H, L, L]`` of the exact mode (None without RPE); the lattice
        sum ``f_per`` for periodic structures.

        Positions shared by the whole batch (an ``expand``-ed ``[1, L, l]``, stride 0 on the
        batch, as the LM passes them) give one mask broadcast over the batch: the same values
        for B times less mask work.
        """
        if not self._uses_rpe():
            return None
        if lattice is not None:
            return self.rpe.exact_mask(pos, lattice=lattice)
        if pos.shape[0] > 1 and pos.stride(0) == 0:
            return self.rpe.exact_mask(pos[:1])
        return self.rpe.exact_mask(pos)

    def _scaled_qkv(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``rows`` of the ``qkv`` weight and bias with the ``d^-1/4`` of Alg. 1 folded in.

        Folding it into the weights (a ``[3D, D]`` multiply) replaces two passes over
        ``[B, H, L, d]``; the exact mode then uses scale 1.
        """
        scale = self.qkv_scale[rows].to(self.qkv.weight.dtype)
        bias = self.qkv.bias[rows] * scale if self.qkv.bias is not None else None
        return self.qkv.weight[rows] * scale[:, None], bias

    def _project_one(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """One of ``Q d^-1/4`` (0), ``K d^-1/4`` (1), ``V`` (2) as ``[B, H, L, d]``.

        The linear modes project one at a time so that only one ``[B, L, D]`` projection and
        its features are alive at once (same parameters and result as :meth:`_project`).
        """
        B, L, D = x.shape
        weight, bias = self._scaled_qkv(slice(index * D, (index + 1) * D))
        y = nn.functional.linear(x, weight, bias)
        return y.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Q d^-1/4, K d^-1/4, V)``, each ``[B, H, L, d]``, in one fused multiply."""
        B, L, _ = x.shape
        weight, bias = self._scaled_qkv(slice(None))
        qkv = nn.functional.linear(x, weight, bias)
        qkv = qkv.view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b h l d]
        return q, k, v

    def rpe_features(
        self, pos: torch.Tensor, padding_mask: torch.Tensor | None = None, *, lattice: PeriodicLattice | None = None,
        origin_weights: torch.Tensor | None = None, oriented: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's RPE features ``(n1, n2)``, each ``[B, H, L, 2r]`` fp32, from its fixed noise.

        They depend only on the positions (and cell), the RPE parameters and the noise: a model
        that applies the same layer several times to the same structure (iterative refinement)
        computes them once and passes them to :meth:`forward` as ``rpe_features``. ``oriented``:
        the periodic canonical coordinates, when the caller shares them between layers
        (:meth:`SpectralRPE.periodic_draw`).
        """
        if self.mode != "flt":
            raise ValueError(f"rpe_features are used by mode='flt' only (this layer is {self.mode!r})")
        with torch.autocast(device_type=pos.device.type, enabled=False):
            if lattice is not None:  # periodic: wrapped fractional phases, nothing to centre
                return self.rpe.features(pos, self.num_rpe_features, noise=self.rpe_noise, split=self.rpe_split,
                                         lattice=lattice, padding_mask=padding_mask, origin_weights=origin_weights,
                                         oriented=oriented)
            pos = center_positions(
                pos, padding_mask=padding_mask, causal=self.causal, integer=self.rpe.integer_positions
            )
            return self.rpe.features(pos, self.num_rpe_features, noise=self.rpe_noise, split=self.rpe_split)

    def prepare_rpe(self, rpe_features: tuple[torch.Tensor, torch.Tensor]) -> PreparedRPE:
        """``(n1, n2)`` -> :class:`PreparedRPE` (their kernel projections computed once), for
        :meth:`forward`'s ``rpe_features`` when the same geometry is attended to several times."""
        n1, n2 = rpe_features[0], rpe_features[1]
        if not getattr(self.feature_map, "supports_prefix", False):
            return PreparedRPE(n1, n2, None, None)
        with torch.autocast(device_type=n1.device.type, enabled=False):
            query = self.feature_map.prefix(n1)
            # The balanced split returns one tensor for both sides: project it once.
            return PreparedRPE(n1, n2, query, query if n2 is n1 else self.feature_map.prefix(n2))

    def _linear_inputs(
        self, x: torch.Tensor, pos: torch.Tensor | None, padding_mask: torch.Tensor | None, *,
        with_values: bool = True, lattice: PeriodicLattice | None = None,
        rpe_features: tuple[torch.Tensor, torch.Tensor] | None = None,
        origin_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(phi(Q^), phi(K^), V)`` for the linear modes; features ``[B, H, L, m]`` in fp32.

        ``Q^ = [n1, Q d^-1/4]`` (flt) or ``Q d^-1/4`` (performer), likewise ``K^``. Above
        ``_FUSED_QKV_MAX_ELEMENTS`` inputs, Q, K and V are projected, mapped and dropped one at a
        time, so the peak memory stays near one projection plus the features; small inputs take
        one fused projection (same parameters and result up to float rounding). Projections run under the caller's autocast; the RPE
        features and kernel maps with autocast off (fp32).
        """
        device_type = x.device.type
        n1 = n2 = None
        prefix_q = prefix_k = None
        if self.mode == "flt":
            features = rpe_features if rpe_features is not None else self.rpe_features(
                pos, padding_mask, lattice=lattice, origin_weights=origin_weights)
            if isinstance(features, PreparedRPE) and features.query is not None:
                prefix_q, prefix_k = features.query, features.key  # [n, .] without the concatenation
            else:
                n1, n2 = features[0], features[1]
        # Small inputs: one fused [3D, D] projection (fewer, larger ops; per-op overhead dominates
        # there). Large ones: one projection at a time, so only one [B, L, D] is alive at once.
        fused = x.numel() <= _FUSED_QKV_MAX_ELEMENTS
        if fused:
            q, k_fused, v_fused = self._project(x)
        else:
            q = self._project_one(x, 0)
        with torch.autocast(device_type=device_type, enabled=False):
            if prefix_q is not None:
                phi_q = self.feature_map(_acc(q), is_query=True, prefix=prefix_q)
            else:
                q_hat = torch.cat([n1, _acc(q)], dim=-1) if n1 is not None else _acc(q)
                phi_q = self.feature_map(q_hat, is_query=True)
                del q_hat
            del q, n1
        k = k_fused if fused else self._project_one(x, 1)
        with torch.autocast(device_type=device_type, enabled=False):
            if prefix_k is not None:
                phi_k = self.feature_map(_acc(k), is_query=False, padding_mask=padding_mask, prefix=prefix_k)
            else:
                if n2 is not None:
                    k_hat = torch.cat([n2.expand(x.shape[0], -1, -1, -1), _acc(k)], dim=-1)
                else:
                    k_hat = _acc(k)
                phi_k = self.feature_map(k_hat, is_query=False, padding_mask=padding_mask)
                del k_hat
            del k, n2
        v = (v_fused if fused else self._project_one(x, 2)) if with_values else None
        return phi_q, phi_k, v

    def _lattice(self, x, cell, pbc, lattice) -> PeriodicLattice | None:
        """The periodic geometry of the call (None: non-periodic), built once from ``cell``/``pbc``."""
        if lattice is None and cell is None:
            if pbc is not None:
                raise ValueError("pbc was given without cell: periodic attention needs the cell")
            return None
        if self.causal:
            raise ValueError("periodic structures (cell / lattice) need causal=False")
        if lattice is None:
            cell = cell if cell.dim() == 3 else cell[None].expand(x.shape[0], 3, 3)
            lattice = PeriodicLattice.from_cell(cell.to(x.device), pbc)
        if lattice.num_structures != x.shape[0]:
            raise ValueError(f"lattice has {lattice.num_structures} structures but x has {x.shape[0]}")
        return lattice

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        cell: torch.Tensor | None = None,
        pbc: torch.Tensor | None = None,
        lattice: PeriodicLattice | None = None,
        rpe_features: tuple[torch.Tensor, torch.Tensor] | None = None,
        origin_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over ``x``; periodic structures pass ``cell`` (``[B, 3, 3]``, rows = lattice
        vectors) and ``pbc`` (``[B, 3]`` or ``[3]`` bool, default a slab), or a prebuilt ``lattice``:
        the RPE is then the lattice sum ``f_per`` (DESIGN §7), exactly invariant to wrapping.
        ``rpe_features``: this layer's :meth:`rpe_features` for the same positions, precomputed;
        ``origin_weights [B, L]``: the periodic features' canonical origin (see
        :meth:`PeriodicLattice.fractional`), default all real atoms."""
        self._check_inputs(x, pos, padding_mask)
        lattice = self._lattice(x, cell, pbc, lattice) if self._uses_rpe() else None
        B, L, D = x.shape
        if self.mode == "exact":
            q, k, v = self._project(x)
            out_dtype = v.dtype
            # The logits, mask and softmax run in fp32 even under bf16/fp16 autocast.
            with torch.autocast(device_type=x.device.type, enabled=False):
                bias = self._exact_bias(pos, lattice)
                out = softmax_attention(
                    q, k, _acc(v), bias=bias, causal=self.causal, padding_mask=padding_mask,
                    dropout=self.dropout, training=self.training, scale=1.0,
                )
        else:
            # Projections run under the caller's autocast; the feature maps, RPE features and
            # sums run in fp32 (autocast off inside the feature code below).
            phi_q, phi_k, v = self._linear_inputs(x, pos, padding_mask, lattice=lattice, rpe_features=rpe_features,
                                                  origin_weights=origin_weights)
            out_dtype = v.dtype
            with torch.autocast(device_type=x.device.type, enabled=False):
                keep = None
                if self.training and self.dropout > 0.0:
                    keep = torch.bernoulli(
                        torch.full((B, self.num_heads, L), 1.0 - self.dropout, device=x.device)
                    ) / (1.0 - self.dropout)
                if self.causal:
                    out = causal_linear_attention(
                        phi_q, phi_k, _acc(v), padding_mask=padding_mask, value_keep=keep,
                        chunk_size=self.chunk_size,
                    )
                else:
                    # Every kernel feature map zeroes padded keys already (no second mask pass).
                    out = linear_attention(phi_q, phi_k, _acc(v), value_keep=keep)
        out = out.to(out_dtype).transpose(1, 2).reshape(B, L, D)
        return self.out(out)

    @torch.no_grad()
    def attention_weights(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        *,
        cell: torch.Tensor | None = None,
        pbc: torch.Tensor | None = None,
        lattice: PeriodicLattice | None = None,
    ) -> torch.Tensor:
        """Row-normalised attention matrix of the current mode, ``[B, H, L, L]`` (O(L^2)).

        In ``flt``/``performer`` mode this is the matrix implied by the random features
        (``phi(Q^)_i . phi(K^)_j`` normalised), i.e. what the linear attention actually applies.
        """
        self._check_inputs(x, pos, padding_mask)
        lattice = self._lattice(x, cell, pbc, lattice) if self._uses_rpe() else None
        if self.mode == "exact":
            q, k, _ = self._project(x)
            with torch.autocast(device_type=x.device.type, enabled=False):
                bias = self.rpe.exact_mask(pos, lattice=lattice) if self._uses_rpe() else None
                return softmax_attention_weights(
                    _acc(q), _acc(k), bias=bias, causal=self.causal, padding_mask=padding_mask, scale=1.0
                )
        phi_q, phi_k, _ = self._linear_inputs(x, pos, padding_mask, with_values=False, lattice=lattice)
        return linear_attention_weights(phi_q, phi_k, causal=self.causal, padding_mask=padding_mask)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, mode={self.mode!r}, "
            f"kernel={self.kernel!r}, num_rpe_features={self.num_rpe_features}, "
            f"num_kernel_features={self.num_kernel_features}, causal={self.causal}, dropout={self.dropout}"
        )
