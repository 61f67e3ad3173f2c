"""The IS2RE energy model: a Graphormer-3D-style transformer with FLT attention.

Reference: Shi et al. 2022, "Benchmarking Graphormer on large-scale molecular modeling datasets"
(Graphormer-3D), with the pairwise Gaussian-basis bias replaced by FLT's random-feature RPE
(Choromanski et al., FourierLearner-Transformers) so that every part of the model is linear in
the number of atoms (structure plus periodic images).

For a structure with atoms i (real atoms, then periodic-image tokens, then padding), positions
first expressed in the orthonormal frame of its cell (``r <- r F``, :func:`cell_frame`; exact
rotation invariance whatever the random features)::

    h_i^0 = Emb_Z(z_i) + Emb_tag(t_i) + W_c c_i,      c_i[c] = sum_{j != i} f_c(r_i - r_j)
    h^{k+1} = Stack(h^k; r)   for k = 0 .. blocks-1     (the same L pre-LN layers each time)
    E       = sum_{i real, t_i > 0} gamma_{t_i} MLP(LN(h_i))
    d_i     = sum_c a_ic / max(c_i[c], 1) sum_j f_c(r_i - r_j) b_jc (r_j - r_i)   (displacement head)

``f_c`` are Gaussian-basis functions ``sum_t w_ct (2 pi s_ct^2)^(-3/2) exp(-|x|^2 / 2 s_ct^2)``;
the sums over j are evaluated with random Fourier features ``f_c(r_i - r_j) ~ n1_i . n2_j``
(``flt_mol.attention.GaussianBasisRPE``), so they cost O(L) instead of O(L^2). The attention in
every layer is :class:`flt_mol.attention.FLTAttention` with one per-head Gaussian-basis RPE shared
by all layers. ``attention: flt | performer | exact`` switches only the attention kernel.

Einsum legend: b batch, c context channels, i/j atoms, f random features (2r), x xyz.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flt_mol.attention.periodic import LatticeCache, cell_frame
from flt_mol.attention.rpe import cos_sin as trig_cos_sin
from flt_mol.models.blocks import TransformerBlock
from flt_mol.models.local import MAX_WIDTH_FRACTION, local_context

__all__ = [
    "cell_frame",
    "IS2REModel",
    "IS2REModelConfig",
    "gaussian_context",
    "gaussian_context_exact",
    "displacement_sum",
    "displacement_sum_exact",
    "periodic_context",
    "periodic_context_exact",
    "periodic_context_cs",
    "periodic_displacement",
    "periodic_displacement_exact",
    "attention_origin_weights",
    "energy_readout",
]

ATTENTION_MODES = ("flt", "performer", "exact")


@dataclass
class IS2REModelConfig:
    """Hyper-parameters of :class:`IS2REModel` (defaults: the paper's OC20 FLT-12L)."""

    attention: str = "flt"  # flt | performer | exact
    num_layers: int = 12
    embed_dim: int = 768
    ffn_dim: int = 2048
    num_heads: int = 48
    num_kernel_features: int = 64  # m, FAVOR+ features
    num_rpe_features: int = 16  # r, RPE random Fourier features
    num_kernels: int = 32  # T, Gaussian basis functions per head
    blocks: int = 4  # iterative refinement: the layer stack applied this many times
    dropout: float = 0.0
    attention_dropout: float = 0.1
    kernel: str = "favor+"
    rpe_sampler: str = "gaussian"  # attention RPE frequencies: gaussian (learnable variance) | mixture
    context_channels: int = 32  # Gaussian-basis channels of the per-atom context / displacement head
    # features (random features on the reciprocal lattice, O(L)) | exact (the full lattice sum,
    # O(L^2) reference) | local (exact sum over neighbours within context_cutoff with a smooth
    # envelope, flt_mol.models.local: no random-feature noise, O(L) at fixed density)
    context: str = "features"
    context_cutoff: float = 6.0  # Angstrom, context: local only (Gaussian widths kept <= cutoff / 3)
    context_features: int = 32  # random frequencies of the context / displacement features
    # The terms' own mixture bounds g/p by sum_t A_t (DESIGN §2(a)); measured on EMT-IS2RE
    # structures its context noise is ~6x lower than the learnable-variance Gaussian's.
    context_sampler: str = "mixture"
    num_elements: int = 100
    num_tags: int = 3
    displacement_head: bool = True
    # "cell": express positions in the orthonormal frame of each structure's cell before any
    # random feature sees them (see cell_frame), so predictions are exactly invariant to
    # rotating a structure together with its cell. "none": raw coordinates; the random-feature
    # attention and context are then rotation invariant only in expectation over feature draws.
    frame: str = "cell"
    # How the model sees periodicity (DESIGN §7). "images": periodic images near the adsorbate
    # are extra tokens (Graphormer-3D; a function of the unit-cell representation).
    # "reciprocal": one token per atom; the attention RPE, the context sums and the
    # displacement head are lattice sums estimated with random features on each structure's
    # reciprocal lattice, exactly invariant to wrapping and to the choice of cell. ``frame`` is
    # then the reduced cell's own frame.
    periodic: str = "images"
    # Atoms the energy head sums over: "tagged" (real atoms with tag > 0, IS2RE's adsorption
    # energy) or "all" (every real atom: the total energy of S2EF, whose forces act on every atom).
    readout: str = "tagged"

    def validate(self) -> None:
        from flt_mol.errors import ConfigError

        if self.attention not in ATTENTION_MODES:
            raise ConfigError(f"model.attention must be one of {ATTENTION_MODES}, got {self.attention!r}")
        for name in ("rpe_sampler", "context_sampler"):
            if getattr(self, name) not in ("gaussian", "mixture", "standard"):
                raise ConfigError(f"model.{name} must be gaussian, mixture or standard, got {getattr(self, name)!r}")
        if self.periodic not in ("images", "reciprocal"):
            raise ConfigError(f"model.periodic must be 'images' or 'reciprocal', got {self.periodic!r}")
        if self.readout not in ("tagged", "all"):
            raise ConfigError(f"model.readout must be 'tagged' or 'all', got {self.readout!r}")
        if self.frame not in ("cell", "none"):
            raise ConfigError(f"model.frame must be 'cell' or 'none', got {self.frame!r}")
        if self.context not in ("features", "exact", "local"):
            raise ConfigError(f"model.context must be 'features', 'exact' or 'local', got {self.context!r}")
        if not (isinstance(self.context_cutoff, (int, float)) and math.isfinite(self.context_cutoff)
                and self.context_cutoff > 0):
            raise ConfigError(f"model.context_cutoff must be a positive number of Angstrom, got {self.context_cutoff!r}")
        if self.context == "local" and self.periodic != "reciprocal":
            raise ConfigError("model.context: local needs model.periodic: reciprocal (image tokens would double-count neighbours)")
        if self.context == "local" and self.displacement_head:
            raise ConfigError("model.context: local has no displacement head: set model.displacement_head: false")
        if self.embed_dim % self.num_heads != 0:
            raise ConfigError(
                f"model.embed_dim ({self.embed_dim}) must be divisible by model.num_heads ({self.num_heads})"
            )
        for name in ("num_layers", "embed_dim", "ffn_dim", "num_heads", "num_kernel_features",
                     "num_rpe_features", "num_kernels", "blocks", "context_channels", "context_features"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------------------------
# Pure functions (linear form beside its O(L^2) reference)
# --------------------------------------------------------------------------------------------


def gaussian_context(n1: torch.Tensor, n2: torch.Tensor, *, padding_mask: torch.Tensor) -> torch.Tensor:
    """``c_i[c] = sum_{j != i, j not pad} n1_i[c] . n2_j[c]``, in O(L).

    Shapes: ``n1, n2 [B, C, L, F]``, ``padding_mask [B, L]`` (True = pad) -> ``[B, L, C]``
    (zero on padded rows).
    """
    keep = (~padding_mask).to(n1.dtype)  # [B, L]
    colsum = torch.matmul(keep[:, None, None, :], n2)  # sum over real j of n2_j, [B, C, 1, F]
    total = torch.matmul(n1, colsum.transpose(-1, -2))[..., 0]  # [B, C, L]
    self_term = (n1 * n2).sum(-1)  # the j = i term, which sum_j includes (zeroed below on pads)
    return ((total - self_term) * keep[:, None, :]).transpose(1, 2)


def gaussian_context_exact(mask_fn, pos: torch.Tensor, *, padding_mask: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`gaussian_context`: ``c_i[c] = sum_{j != i, j not pad} f_c(r_i - r_j)``.

    Shapes: ``pos [B, L, 3]``, ``mask_fn(delta[B, L, L, 3]) -> [B, L, L, C]`` -> ``[B, L, C]``.
    """
    delta = pos[:, :, None, :] - pos[:, None, :, :]
    f = mask_fn(delta)  # [B, L, L, C]
    length = pos.shape[1]
    pair = (~padding_mask)[:, :, None] & (~padding_mask)[:, None, :]
    pair = pair & ~torch.eye(length, dtype=torch.bool, device=pos.device)
    return (f * pair[..., None].to(f.dtype)).sum(dim=2)


def displacement_sum(n1: torch.Tensor, n2: torch.Tensor, *, pos: torch.Tensor, query: torch.Tensor,
                     key: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """``d_i = sum_c a_ic sum_j (n1_i[c] . n2_j[c]) b_jc (r_j - r_i)`` in O(L).

    Expanding ``r_j - r_i`` splits the sum into ``n1_i . (sum_j b_j n2_j r_j^T)`` minus
    ``r_i (n1_i . sum_j b_j n2_j)``; the j = i term is zero by construction. Equivariant under
    rotations of the positions whenever ``n1 . n2`` is invariant (exactly in expectation over
    the random features); exactly invariant to translations.

    Shapes: ``n1, n2 [B, C, L, F]``, ``pos [B, L, 3]``, ``query a, key b [B, L, C]``,
    ``padding_mask [B, L]`` -> ``[B, L, 3]``.
    """
    keep = (~padding_mask).to(n1.dtype)
    # Both sums in one product: sum_j n2_j^T (b_j [r_j, 1]) = [sum_j b_j n2_j r_j^T | sum_j b_j n2_j],
    # [B, C, F, 4], without a scaled copy of n2 (matrix products only: three-operand einsums
    # and element-wise products of [B, C, L, F] tensors cost more here).
    b = (key * keep[..., None]).transpose(1, 2)[..., None]  # [B, C, L, 1]; pads contribute 0
    pos1 = torch.cat([pos, torch.ones_like(pos[..., :1])], dim=-1).to(n2.dtype)  # [B, L, 4]
    sums = torch.matmul(n2.transpose(-1, -2), b * pos1[:, None])  # [B, C, F, 4]
    terms = torch.matmul(n1, sums)  # [B, C, L, 4]
    per_channel = terms[..., :3] - pos[:, None] * terms[..., 3:]  # [B, C, L, 3]
    out = (per_channel * query.transpose(1, 2)[..., None]).sum(dim=1)
    return out * keep[..., None]


def displacement_sum_exact(mask_fn, *, pos: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                           padding_mask: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`displacement_sum` with the exact ``f_c`` (O(L^2))."""
    delta = pos[:, :, None, :] - pos[:, None, :, :]  # r_i - r_j, [B, L, L, 3]
    f = mask_fn(delta)  # [B, L, L, C]
    keep = ~padding_mask
    pair = (keep[:, :, None] & keep[:, None, :]).to(f.dtype)
    w = torch.einsum("bijc,bic,bjc->bij", f * pair[..., None], query, key)
    return torch.einsum("bij,bijx->bix", w, -delta)


def periodic_context(n1: torch.Tensor, n2: torch.Tensor, *, k0: torch.Tensor, f0: torch.Tensor,
                     periodic: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """``c_i[c] = sum_{j real} f_c,per(r_i - r_j) - f_c(0)``: own periodic images included.

    ``n1 . n2`` estimates ``f_per`` without its ``k = 0`` term ``k0`` (3D-periodic structures),
    which is added exactly, once per real partner. On periodic structures the subtracted self term
    is the exact ``f(0)`` (the ``n = 0`` image only), so the images of atom ``i`` itself stay in
    and the context is the same in any supercell; on non-periodic ones it is ``n1_i . n2_i``
    (the estimate of ``f(0)``, lower variance), as in :func:`gaussian_context`.

    Shapes: ``n1, n2 [B, C, L, F]``, ``k0 [B, C]``, ``f0 [C]``, ``periodic [B]`` bool,
    ``padding_mask [B, L]`` -> ``[B, L, C]`` (zero on padded rows).
    """
    keep = (~padding_mask).to(n1.dtype)  # [B, L]
    total = torch.einsum("bcif,bcf->bci", n1, (n2 * keep[:, None, :, None]).sum(dim=2))
    counts = keep.sum(1)  # [B]
    est_self = (n1 * n2).sum(-1)  # [B, C, L]
    self_term = torch.where(periodic[:, None, None], f0.to(n1.dtype)[None, :, None], est_self)
    out = total + (k0.to(n1.dtype) * counts[:, None])[..., None] - self_term
    return (out * keep[:, None, :]).transpose(1, 2)


def periodic_displacement(phase: torch.Tensor, weight: torch.Tensor, k: torch.Tensor, *, query: torch.Tensor,
                          key: torch.Tensor, padding_mask: torch.Tensor,
                          cos_sin: torch.Tensor | None = None) -> torch.Tensor:
    """Periodic displacement head: ``d_i = sum_c a_ic sum_j b_jc sum_n (D + nA) f_c(D + nA)``, ``D = r_j - r_i``.

    For a Gaussian basis ``x f(x) = -s^2 grad f(x)``, so the lattice sum is the sine series
    ``(1/V) sum_k 2 pi (sum_t s_t^2 ghat_t(k)) k sin(2 pi k . D)``; with the features' frequencies
    and weights ``w = sum_t s_t^2 ghat_t(k) / (V p)`` (``periodic_weights(draw, moment=2)``) and
    ``sin(t_j - t_i) = sin t_j cos t_i - cos t_j sin t_i`` it costs O(L F) per channel. Wrapping an
    atom by a lattice vector changes nothing (the phases are wrapped).

    Shapes: ``phase [B, C, L, F]``, ``weight [B, C, F]``, ``k [B, C, F, 3]`` (the frequencies in the
    output's coordinates), ``query a, key b [B, L, C]``, ``padding_mask [B, L]`` -> ``[B, L, 3]``;
    ``cos_sin``: ``[cos phase, sin phase]`` (``[B, C, L, 2F]``) when the caller already has it.
    """
    keep = (~padding_mask).to(phase.dtype)
    num_freq = phase.shape[-1]
    # cs = [cos | sin]; with S_f, C_f the b-weighted sums of sin and cos, the per-atom vector is
    # cos @ (w S k) - sin @ (w C k) = cs @ [w S k ; -w C k]: two batched matrix products, no
    # [B, C, L, F] temporaries besides cs (which the context shares, see periodic_context_cs).
    cs = cos_sin if cos_sin is not None else trig_cos_sin(phase)
    b = (key * keep[..., None]).transpose(1, 2).to(phase.dtype)  # [B, C, L]
    sums = (cs * b[..., None]).sum(2)  # [C_f | S_f], [B, C, 2F] (a product and a sum: see periodic_context_cs)
    scale = (2.0 * math.pi / num_freq) * weight.to(phase.dtype)  # [B, C, F]
    coef = torch.cat([scale * sums[..., num_freq:], -scale * sums[..., :num_freq]], dim=-1)  # [B, C, 2F]
    kk = k.to(phase.dtype)
    vec = torch.matmul(cs, coef[..., None] * torch.cat([kk, kk], dim=-2))  # [B, C, L, 3]
    out = torch.einsum("bclx,blc->blx", vec, query.to(phase.dtype))
    return out * keep[..., None]


def periodic_context_cs(cs: torch.Tensor, weight: torch.Tensor, *, k0: torch.Tensor, f0: torch.Tensor,
                        periodic: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """:func:`periodic_context` for the balanced features of phases, without materialising them.

    With ``n1 = n2 = [cos, sin] * sqrt(a / F)`` (``features_from_angles(phase, a, balanced=True)``),
    ``n1_i . sum_j n2_j = cs_i . (a/F * sum_j cs_j)`` and ``n1_i . n1_i = sum_f a_f / F``
    (``cos^2 + sin^2 = 1``): two batched products on ``cs = [cos, sin]`` replace the scaled
    feature tensors and their element-wise products. Equal to :func:`periodic_context` on those
    features up to float rounding.

    Shapes: ``cs [B, C, L, 2F]``, ``weight a [B, C, F]``, the rest as :func:`periodic_context`
    -> ``[B, L, C]``.
    """
    keep = (~padding_mask).to(cs.dtype)  # [B, L]
    num_freq = weight.shape[-1]
    w = weight.to(cs.dtype).clamp_min(0.0) / num_freq  # [B, C, F], the squared feature scale
    # Products and sums, not batched matrix-vector products (3-4x slower on CPU here, measured).
    colsum = (cs * keep[:, None, :, None]).sum(2)  # sum_j cs_j over real atoms, [B, C, 2F]
    total = (cs * (torch.cat([w, w], dim=-1) * colsum)[:, :, None, :]).sum(-1)  # [B, C, L]
    counts = keep.sum(1)  # [B]
    est_self = w.sum(-1)[..., None]  # [B, C, 1]: n1_i . n1_i, the same for every atom
    self_term = torch.where(periodic[:, None, None], f0.to(cs.dtype)[None, :, None], est_self)
    out = total + (k0.to(cs.dtype) * counts[:, None])[..., None] - self_term
    return (out * keep[:, None, :]).transpose(1, 2)


def periodic_context_exact(rpe, pos: torch.Tensor, lattice, *, padding_mask: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`periodic_context` by real-space lattice sums (O(L^2 images)), ``[B, L, C]``."""
    keep = ~padding_mask
    mask = rpe.exact_mask(pos, lattice=lattice)  # [B, C, L, L], f_per
    pair = (keep[:, :, None] & keep[:, None, :]).to(mask.dtype)
    total = (mask * pair[:, None]).sum(-1)  # [B, C, L]
    out = total - rpe.amplitudes.sum(-1).to(mask.dtype)[None, :, None]
    return (out * keep[:, None, :].to(out.dtype)).transpose(1, 2)


def periodic_displacement_exact(rpe, pos: torch.Tensor, lattice, *, query: torch.Tensor, key: torch.Tensor,
                                padding_mask: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`periodic_displacement` by real-space lattice sums, ``[B, L, 3]`` (input coordinates)."""
    from flt_mol.attention.periodic import gaussian_lattice_sum

    frame = lattice.frame.to(pos.device)
    r = torch.einsum("blx,bxk->blk", pos.double(), frame)
    delta = r[:, None, :, :] - r[:, :, None, :]  # [B, i, j, 3] = r_j - r_i
    vec = gaussian_lattice_sum(delta, lattice.to(pos.device), rpe.amplitudes, rpe.scales, vector=True)  # [B,i,j,C,3]
    keep = ~padding_mask
    pair = (keep[:, :, None] & keep[:, None, :]).to(vec.dtype)
    w = torch.einsum("bijcx,bij,bic,bjc->bix", vec, pair, query.double(), key.double())
    return torch.einsum("blk,bxk->blx", w, frame).to(pos.dtype)


def attention_origin_weights(tags: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Weights of the canonical origin of the attention features' phases (translation invariance
    of one draw, :meth:`~flt_mol.attention.periodic.PeriodicLattice.orient`): the adsorbate
    (tag 2) where a structure has one, else every real atom.

    Shapes: ``tags, real [B, L]`` -> ``[B, L]`` bool.
    """
    ads = (tags == 2) & real
    return torch.where(ads.any(1, keepdim=True), ads, real)


def energy_readout(atom_energy: torch.Tensor, *, tags: torch.Tensor, tag_factor: torch.Tensor,
                   readout_mask: torch.Tensor) -> torch.Tensor:
    """``E_b = sum_{i in readout} gamma[t_i] e_i``.

    Shapes: ``atom_energy [B, L]``, ``tags [B, L]`` long, ``tag_factor [num_tags]``,
    ``readout_mask [B, L]`` bool (real atoms with tag > 0) -> ``[B]``.
    """
    return (atom_energy * tag_factor[tags] * readout_mask.to(atom_energy.dtype)).sum(dim=1)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class IS2REModel(nn.Module):
    """Initial structure -> normalised relaxed energy (and normalised displacements).

    Args:
        config: :class:`IS2REModelConfig`.

    Forward input: an :class:`flt_mol.data.collate.AtomsBatch` (or any object with
    ``atomic_numbers [B, L]`` long, ``pos [B, L, 3]``, ``tags [B, L]``, ``padding_mask [B, L]``
    (True = pad) and ``is_image [B, L]``).

    Forward output: ``{"energy": [B], "displacement": [B, L, 3] or None}``; energies are in the
    task's normalised units (the task adds references and undoes the normalisation), the energy
    sums over real atoms with tag > 0 (periodic images and padding excluded).
    """

    def __init__(self, config: IS2REModelConfig):
        super().__init__()
        from flt_mol.attention import FLTAttention, GaussianBasisRPE

        config.validate()
        self.config = config
        d = config.embed_dim
        self.atom_embedding = nn.Embedding(config.num_elements + 1, d, padding_idx=0)
        self.tag_embedding = nn.Embedding(config.num_tags, d)
        # One per-head RPE, shared by every layer and every refinement block (DESIGN §3); the
        # Performer baseline has none (its attention would ignore it).
        self.rpe = (
            GaussianBasisRPE(config.num_heads, config.num_kernels, dim=3, sampler=config.rpe_sampler)
            if config.attention != "performer"
            else None
        )
        # Per-atom context and displacement head: their own Gaussian-basis channels, evaluated
        # with random features like the attention's RPE.
        # The local context truncates at context_cutoff: its widths start inside rc / 3.
        widths = (0.5, 4.0)
        if config.context == "local":
            hi = min(4.0, config.context_cutoff * MAX_WIDTH_FRACTION)
            widths = (min(0.5, hi), hi)
        self.context_rpe = GaussianBasisRPE(config.context_channels, config.num_kernels, dim=3,
                                            sampler=config.context_sampler, init_scale_range=widths)
        self.context_proj = nn.Linear(config.context_channels, d)
        self.context_norm = nn.LayerNorm(config.context_channels)
        self.register_buffer(
            "context_noise", self.context_rpe.draw_noise(config.context_features), persistent=True
        )
        self.layers = nn.ModuleList(
            TransformerBlock(
                d,
                FLTAttention(
                    d, config.num_heads, rpe=self.rpe, mode=config.attention,
                    num_rpe_features=config.num_rpe_features,
                    num_kernel_features=config.num_kernel_features, kernel=config.kernel,
                    causal=False, dropout=config.attention_dropout,
                ),
                config.ffn_dim,
                dropout=config.dropout,
            )
            for _ in range(config.num_layers)
        )
        self.final_norm = nn.LayerNorm(d)
        # Reduced cells, remembered per distinct cell (not state: rebuilt on demand).
        self._lattices = LatticeCache()
        self.energy_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.tag_factor = nn.Parameter(torch.ones(config.num_tags))
        if config.displacement_head:
            self.disp_query = nn.Linear(d, config.context_channels)
            self.disp_key = nn.Linear(d, config.context_channels)
        else:
            self.disp_query = self.disp_key = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Unit-scale identities, comparable to the projected context: with tiny embeddings the
        # first LayerNorm sees mostly geometry and training sits on a plateau before it finds
        # the adsorbate identity.
        nn.init.normal_(self.atom_embedding.weight, std=1.0)
        with torch.no_grad():
            self.atom_embedding.weight[0].zero_()
        nn.init.normal_(self.tag_embedding.weight, std=1.0)
        nn.init.ones_(self.tag_factor)
        # Small final layer: the initial prediction is close to the (normalised) mean energy.
        nn.init.normal_(self.energy_head[-1].weight, std=0.01)
        nn.init.zeros_(self.energy_head[-1].bias)
        if self.disp_query is not None:
            # Zero displacement at initialisation: the auxiliary loss starts at the target's
            # variance instead of injecting large gradients into the shared trunk.
            nn.init.zeros_(self.disp_query.weight)
            nn.init.zeros_(self.disp_query.bias)

    def extra_repr(self) -> str:
        c = self.config
        return (f"attention={c.attention}, layers={c.num_layers}x{c.blocks} blocks, dim={c.embed_dim}, "
                f"heads={c.num_heads}, m={c.num_kernel_features}, r={c.num_rpe_features}, T={c.num_kernels}")

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Redraw every random feature of the model (attention kernels, RPE and context)."""
        self.context_noise.copy_(
            self.context_rpe.draw_noise(self.config.context_features, generator=generator).to(self.context_noise)
        )
        for layer in self.layers:
            layer.attention.redraw_features(generator=generator)

    def _context_features(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.context_rpe.features(pos, self.config.context_features, noise=self.context_noise)

    def lattice(self, batch: Any):
        """The batch's :class:`~flt_mol.attention.periodic.PeriodicLattice` (``periodic: reciprocal``),
        reduced once per distinct cell (:class:`~flt_mol.attention.periodic.LatticeCache`)."""
        return self._lattices(batch.cell, getattr(batch, "pbc", None))

    def forward(self, batch: Any) -> dict[str, torch.Tensor | None]:
        if self.config.periodic == "reciprocal":
            return self._forward_reciprocal(batch)
        z, pos, tags = batch.atomic_numbers, batch.pos, batch.tags.long()
        pad = batch.padding_mask
        frame = None
        if self.config.frame == "cell":
            frame = cell_frame(batch.cell).to(pos.dtype)  # [B, 3, 3]
            pos = torch.einsum("blx,bxk->blk", pos, frame)  # local coordinates r @ F
        real = ~pad & ~batch.is_image  # [B, L]
        exact = self.config.context == "exact"
        if exact:
            mask_fn = self.context_rpe.mask
            context = gaussian_context_exact(mask_fn, pos, padding_mask=pad)
            n1 = n2 = None
        else:
            n1, n2 = self._context_features(pos)  # [B, C, L, 2r] each
            context = gaussian_context(n1, n2, padding_mask=pad)  # [B, L, C]
        h = self._trunk(z, tags, context, pad, pos=pos)
        energy = self._energy(h, tags, real)
        displacement = None
        if self.disp_query is not None:
            q, k = self._displacement_qk(h, context)
            if exact:
                displacement = displacement_sum_exact(self.context_rpe.mask, pos=pos, query=q, key=k,
                                                      padding_mask=pad)
            else:
                displacement = displacement_sum(n1, n2, pos=pos, query=q, key=k, padding_mask=pad)
            if frame is not None:  # back to the input's coordinates: v = v_local @ F^T
                displacement = torch.einsum("blk,bxk->blx", displacement, frame)
        return {"energy": energy, "displacement": displacement}

    def _forward_reciprocal(self, batch: Any) -> dict[str, torch.Tensor | None]:
        """One token per atom; every geometric sum is a lattice sum (DESIGN §7)."""
        z, pos, tags = batch.atomic_numbers, batch.pos, batch.tags.long()
        pad = batch.padding_mask
        lattice = self.lattice(batch)
        periodic = lattice.periodic_dims > 0
        real = ~pad & ~batch.is_image
        exact = self.config.context == "exact"
        rpe = self.context_rpe
        origin = attention_origin_weights(tags, real).to(pos.dtype)
        # Canonical coordinates once, shared by every periodic draw of this pass (the context's
        # sums do not depend on the origin; the attention features do, through FAVOR+).
        shared = self.rpe is None or self.rpe.periodic_sign == rpe.periodic_sign
        oriented = None
        if self.config.context == "features" or (shared and self.config.attention == "flt"):
            oriented = lattice.orient(pos, pad, origin, sign=rpe.periodic_sign)
        if self.config.context == "local":
            rc = self.config.context_cutoff
            context = local_context(pos, lattice, amplitudes=rpe.amplitudes,
                                    scales=rpe.scales.clamp(max=rc * MAX_WIDTH_FRACTION),
                                    cutoff=rc, padding_mask=pad)
        elif exact:
            context = periodic_context_exact(rpe, pos, lattice, padding_mask=pad).to(pos.dtype)
        else:
            draw = rpe.periodic_draw(pos, self.context_noise, lattice, padding_mask=pad, oriented=oriented)
            # cos / sin once, shared by the context and the displacement head.
            cs = trig_cos_sin(draw.phase)  # [B, C, L, 2F]
            # The displacement head's weights (moment 2) share the context's spectrum terms.
            weights = rpe.periodic_weights(draw, moment=(0, 2) if self.disp_query is not None else (0,))
            context = periodic_context_cs(cs, weights[0], k0=rpe.periodic_k0(lattice),
                                          f0=rpe.amplitudes.sum(-1), periodic=periodic, padding_mask=pad)
        h = self._trunk(z, tags, context, pad, pos=pos, lattice=lattice, origin_weights=origin,
                        oriented=oriented if shared else None)
        energy = self._energy(h, tags, real)
        displacement = None
        if self.disp_query is not None:
            q, k = self._displacement_qk(h, context)
            if exact:
                displacement = periodic_displacement_exact(rpe, pos, lattice, query=q, key=k, padding_mask=pad)
            else:
                # Frequencies in the input's coordinates: k_lab = k_frame @ F^T.
                k_lab = torch.einsum("bcfk,bxk->bcfx", draw.k, draw.frame)
                displacement = periodic_displacement(draw.phase, weights[1], k_lab,
                                                     query=q, key=k, padding_mask=pad, cos_sin=cs).to(pos.dtype)
        return {"energy": energy, "displacement": displacement}

    def _trunk(self, z, tags, context, pad, *, pos, oriented=None, **geometry) -> torch.Tensor:
        """Embeddings + context, then ``blocks`` passes of the shared layer stack; ``[B, L, D]``.
        ``oriented``: the periodic canonical coordinates, shared by every layer's RPE draw."""
        h = self.atom_embedding(z) + self.tag_embedding(tags) + self.context_proj(self.context_norm(context))
        h = h * (~pad)[..., None].to(h.dtype)
        # Each layer's RPE features depend on the geometry only: computed once, reused by every
        # refinement block.
        per_layer = [
            dict(geometry, rpe_features=layer.attention.prepare_rpe(features))
            if features is not None else geometry
            for layer, features in zip(self.layers, self._layer_rpe_features(pos, pad, oriented, geometry))
        ]
        for _ in range(self.config.blocks):  # iterative refinement with shared weights
            for layer, extra in zip(self.layers, per_layer):
                h = layer(h, pos, pad, **extra)
        return self.final_norm(h)

    def _layer_rpe_features(self, pos, pad, oriented, geometry) -> list:
        """Every layer's RPE features ``(n1, n2)`` (None for layers without), for one geometry.

        The layers share one RPE module; on periodic structures their draws (one fixed noise
        per layer) run as one stacked draw (:meth:`SpectralRPE.periodic_features_many`), the same
        values as one draw per layer.
        """
        attentions = [layer.attention for layer in self.layers]
        flt = [a for a in attentions if a.mode == "flt"]
        lattice = geometry.get("lattice")
        stack = (
            lattice is not None and len(flt) > 1 and len(flt) == len(attentions)
            and all(a.rpe is self.rpe and a.rpe_split == flt[0].rpe_split
                    and a.num_rpe_features == flt[0].num_rpe_features for a in flt)
        )
        if not stack:
            extra = {"oriented": oriented} if oriented is not None else {}
            return [a.rpe_features(pos, pad, **geometry, **extra) if a.mode == "flt" else None for a in attentions]
        with torch.autocast(device_type=pos.device.type, enabled=False):
            return self.rpe.periodic_features_many(
                pos, [a.rpe_noise for a in flt], lattice, split=flt[0].rpe_split, padding_mask=pad,
                origin_weights=geometry.get("origin_weights"), oriented=oriented,
            )

    def _energy(self, h, tags, real) -> torch.Tensor:
        atom_energy = self.energy_head(h).squeeze(-1)  # [B, L]
        readout = real if self.config.readout == "all" else real & (tags > 0)
        return energy_readout(atom_energy, tags=tags, tag_factor=self.tag_factor, readout_mask=readout)

    def _displacement_qk(self, h, context) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = self.disp_query(h), self.disp_key(h)  # [B, L, C]
        # Per channel, divide by the Gaussian neighbour count c_i (>= 1): the head then
        # predicts a weighted mean of relative vectors (Angstrom scale) whatever the density.
        return q / context.clamp_min(1.0), k
