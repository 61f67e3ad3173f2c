"""Chunked inference of the reciprocal IS2RE model: energies of very large structures in O(chunk) memory.

Every sum over atoms in :class:`~flt_mol.models.is2re.IS2REModel` with ``periodic: reciprocal``
is linear in the atoms, so a forward pass without gradients never needs a per-atom random-feature
tensor of the whole structure. Two passes over chunks of atoms, per sum:

* context (``periodic_context_cs``): pass 1 accumulates ``sum_j cs_j`` (``[B, C, 2F]``), pass 2
  forms ``c_i`` chunk by chunk;
* linear attention (each layer, each refinement block): pass 1 accumulates
  ``S = sum_j phi(k^_j) v_j^T`` and ``z = sum_j phi(k^_j)`` (``[B, H, m, d]``, ``[B, H, m]``),
  pass 2 gives ``out_i = phi(q^_i) S / phi(q^_i) z`` and then the block's feed-forward, chunk by
  chunk. The FAVOR+ key stabiliser (a max over every key of a structure) is kept as a running
  max: the sums are rescaled by ``exp(M_old - M_new)`` when it grows, which leaves the ratio
  unchanged (the stabiliser cancels in the normalised attention);
* energy: a sum of per-atom terms.

RPE phases are recomputed per chunk from the per-structure frequencies
(:meth:`~flt_mol.attention.rpe.SpectralRPE.periodic_frequencies`) and the fractional coordinates,
so what stays alive is ``O(L D)`` (the hidden state and the fp64 coordinates) plus
``O(chunk (m + 2r) H)``: no per-pair tensor anywhere, and no ``[B, H, L, m]`` tensor either. The
result equals :meth:`IS2REModel.forward`'s energy up to float rounding (tested). Inference only:
no gradients, no dropout, no displacement head.

Einsum letters: b batch, h heads, c context channels, l atoms of a chunk, m features, d head width,
f random-feature columns.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from flt_mol.attention.feature_maps import FavorPlusFeatureMap
from flt_mol.attention.rpe import cos_sin, features_from_angles
from flt_mol.models.is2re import attention_origin_weights

__all__ = ["supports_chunked", "chunked_energy", "DEFAULT_CHUNK_ATOMS", "CHUNK_ABOVE"]

# Chunk length: measured on a 99,857-atom slab (one thread), 2048 atoms took 6.0 s and 534 MB
# peak, 8192 atoms 9.0 s / 670 MB, 32768 atoms 11.7 s / 998 MB: chunks whose temporaries stay in
# cache are faster as well as smaller.
DEFAULT_CHUNK_ATOMS = 2048
# Batches with more tokens than this are predicted chunk by chunk (smaller ones run the ordinary
# forward, whose result is the same up to float rounding).
CHUNK_ABOVE = 65536


def supports_chunked(model: Any) -> bool:
    """Whether :func:`chunked_energy` can run ``model`` (reciprocal periodicity, linear attention)."""
    c = getattr(model, "config", None)
    return (
        c is not None
        and getattr(c, "periodic", None) == "reciprocal"
        and c.attention in ("flt", "performer")
        and c.context == "features"
    )


def _chunks(length: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, length)) for s in range(0, length, size)]


@torch.no_grad()
def chunked_energy(model: Any, batch: Any, *, chunk_size: int = DEFAULT_CHUNK_ATOMS) -> torch.Tensor:
    """Normalised energies ``[B]`` of ``model`` (eval mode) on ``batch``, ``chunk_size`` atoms at a time.

    Equal to ``model(batch)["energy"]`` up to float rounding; see the module docstring.
    """
    if not supports_chunked(model):
        raise ValueError("chunked_energy needs an IS2REModel with periodic: reciprocal, attention flt or "
                         "performer and context: features")
    if model.training:
        raise ValueError("chunked_energy is inference only: call model.eval() first")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    z, pos, tags = batch.atomic_numbers, batch.pos, batch.tags.long()
    pad = batch.padding_mask
    B, L = pad.shape
    dtype = torch.promote_types(pos.dtype, torch.float32)
    keep = (~pad).to(dtype)  # [B, L]
    real = ~pad & ~batch.is_image
    lattice = model.lattice(batch).to(pos.device)
    chunks = _chunks(L, chunk_size)

    # -- context: c_i = cs_i . (w * sum_j cs_j) + k0 n - f(0) (periodic_context_cs, two passes) ---
    rpe = model.context_rpe
    u_ctx = lattice.fractional(pos, pad, sign=model.context_rpe.periodic_sign)  # [B, L, 3] fp64 (the context draw's own origin)
    draw = rpe.periodic_frequencies(model.context_noise, lattice)
    weight = rpe.periodic_weights(draw).to(dtype)  # [B, C, F]
    num_freq = weight.shape[-1]
    w = weight.clamp_min(0.0) / num_freq
    w2 = torch.cat([w, w], dim=-1)  # [B, C, 2F]
    colsum = torch.zeros(B, w.shape[1], 2 * num_freq, dtype=dtype, device=pos.device)
    for c in chunks:
        cs = cos_sin(rpe.periodic_phase(u_ctx[:, c], draw.q, dtype))  # [B, C, l, 2F]
        colsum += torch.matmul(keep[:, None, None, c], cs)[:, :, 0]
    periodic = (lattice.periodic_dims > 0)[:, None, None]
    est_self = w.sum(-1)[..., None]  # [B, C, 1]
    self_term = torch.where(periodic, rpe.amplitudes.sum(-1).to(dtype)[None, :, None], est_self)
    offset = (rpe.periodic_k0(lattice).to(dtype) * keep.sum(1)[:, None])[..., None] - self_term  # [B, C, 1]
    coef = w2 * colsum

    # -- embeddings (pass 2 of the context) --------------------------------------------------------
    d = model.config.embed_dim
    h = torch.empty(B, L, d, dtype=dtype, device=pos.device)
    for c in chunks:
        cs = cos_sin(rpe.periodic_phase(u_ctx[:, c], draw.q, dtype))
        context = ((torch.einsum("bclf,bcf->bcl", cs, coef) + offset) * keep[:, None, c]).transpose(1, 2)
        hc = model.atom_embedding(z[:, c]) + model.tag_embedding(tags[:, c]) + model.context_proj(model.context_norm(context))
        h[:, c] = hc * keep[:, c, None]
    del u_ctx

    # -- the layer stack, blocks times, two passes per layer --------------------------------------
    origin = attention_origin_weights(tags, real).to(pos.dtype)
    u_att = lattice.fractional(pos, pad, origin, sign=model.rpe.periodic_sign if model.rpe is not None else "structure")  # fp64
    per_layer = []
    for layer in model.layers:
        attn = layer.attention
        if attn.mode == "flt":
            fr = attn.rpe.periodic_frequencies(attn.rpe_noise, lattice)
            per_layer.append((fr, attn.rpe.periodic_weights(fr), attn.rpe._check_split(attn.rpe_split)))
        else:
            per_layer.append(None)
    for _ in range(model.config.blocks):
        for layer, rpe_draw in zip(model.layers, per_layer):
            _layer_chunked(layer, h, u_att, rpe_draw, pad, chunks, dtype)
    del u_att

    # -- energy ---------------------------------------------------------------------------------
    energy = torch.zeros(B, dtype=dtype, device=pos.device)
    readout = real & (tags > 0)
    for c in chunks:
        atom_energy = model.energy_head(model.final_norm(h[:, c])).squeeze(-1)  # [B, l]
        energy += (atom_energy * model.tag_factor[tags[:, c]] * readout[:, c].to(dtype)).sum(1)
    return energy


def _rpe_chunk(rpe_draw, attn, u: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    fr, weight, balanced = rpe_draw
    phase = attn.rpe.periodic_phase(u, fr.q, dtype)
    return features_from_angles(phase, weight, balanced=balanced)


def _layer_chunked(layer, h: torch.Tensor, u: torch.Tensor, rpe_draw, pad: torch.Tensor, chunks: list[slice],
                   dtype) -> None:
    """One pre-LN block (``TransformerBlock``) applied to ``h`` in place, chunk by chunk."""
    attn = layer.attention
    fmap = attn.feature_map
    favor = isinstance(fmap, FavorPlusFeatureMap)
    B, _, D = h.shape
    H, dh = attn.num_heads, attn.head_dim
    m = fmap.out_features
    kv = torch.zeros(B, H, m, dh, dtype=dtype, device=h.device)
    ks = torch.zeros(B, H, m, dtype=dtype, device=h.device)
    run_max = torch.full((B, H, 1, 1), -math.inf, dtype=dtype, device=h.device)
    # Pass 1: key / value statistics.
    for c in chunks:
        x = layer.norm1(h[:, c])
        k = attn._project_one(x, 1).to(dtype)  # [B, H, l, d]
        v = attn._project_one(x, 2).to(dtype)
        if rpe_draw is not None:
            _, n2 = _rpe_chunk(rpe_draw, attn, u[:, c], dtype)
            k = torch.cat([n2, k], dim=-1)
        keep = (~pad[:, c]).to(dtype)[:, None, :, None]  # [B, 1, l, 1]
        if favor:
            # favor_plus_features' key map with a running stabiliser (max over every key so far).
            wx = torch.matmul(k, fmap.projection.to(dtype).T) - 0.5 * k.square().sum(-1, keepdim=True)
            wx = wx.masked_fill_(keep == 0, -math.inf)
            new_max = torch.maximum(run_max, wx.amax(dim=(-2, -1), keepdim=True))
            # -inf while every key so far is padding: any finite constant works there.
            safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
            rescale = torch.exp(run_max - safe)  # 0 while nothing was accumulated
            kv *= rescale
            ks *= rescale[..., 0]
            phi_k = wx.sub_(safe).exp_()
            run_max = new_max
        else:
            phi_k = fmap(k, is_query=False, padding_mask=pad[:, c])
        kv += torch.einsum("bhlm,bhld->bhmd", phi_k, v)
        ks += phi_k.sum(dim=2)
    # Pass 2: outputs, residual and feed-forward, chunk by chunk.
    tiny = torch.finfo(dtype).tiny
    for c in chunks:
        hc = h[:, c]
        x = layer.norm1(hc)
        q = attn._project_one(x, 0).to(dtype)
        if rpe_draw is not None:
            n1, _ = _rpe_chunk(rpe_draw, attn, u[:, c], dtype)
            q = torch.cat([n1, q], dim=-1)
        phi_q = fmap(q, is_query=True)
        out = torch.matmul(phi_q, kv) / torch.matmul(phi_q, ks[..., None]).clamp_min(tiny)  # [B, H, l, d]
        out = attn.out(out.transpose(1, 2).reshape(B, -1, D))
        hc = hc + out
        hc = hc + layer.ffn(layer.norm2(hc))
        h[:, c] = hc
