"""Linear-attention baselines for the sequence benchmarks: cosFormer and the log-linear Performer.

Both modules share FLTAttention's projection layout (fused ``qkv`` and ``out``; heads split as
``[B, H, L, D/H]``) and its call signature
``forward(x[B,L,D], pos=None, padding_mask=None) -> [B,L,D]``, so the LM and the ViT can swap them
in through :class:`flt_mol.models.blocks.TransformerBlock`. Both act on the token *index* (the
Toeplitz / re-weighting structure needs a regular 1D grid); ``pos`` is accepted and ignored.

Every fast function has its exact O(L^2) reference beside it; the tests compare the two.

Einsum legend: b batch, h heads, i/j query/key positions, m features, e value dim.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flt_mol.attention.feature_maps import FavorPlusFeatureMap
from flt_mol.attention.linear import causal_linear_attention, linear_attention

__all__ = [
    "LOGLINEAR_ALGORITHMS",
    "CosFormerAttention",
    "LogLinearAttention",
    "cosformer_angles",
    "cosformer_attention",
    "cosformer_attention_exact",
    "linear_attention_features_exact",
    "loglinear_attention",
    "loglinear_attention_exact",
    "toeplitz_dense",
    "toeplitz_matvec",
    "toeplitz_softmax_attention_exact",
]


LOGLINEAR_ALGORITHMS = ("fft", "dense", "auto")

# --------------------------------------------------------------------------------------------
# Dense reference for linear attention with an elementwise-weighted kernel.
# --------------------------------------------------------------------------------------------


def linear_attention_features_exact(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    causal: bool = False,
    eps: float | None = None,
) -> torch.Tensor:
    """Materialise ``A = (qf kf^T) * weights`` and return ``A v / max(A 1, eps)`` (O(L^2)).

    ``weights [..., i, j]`` (broadcast against ``[b,h,i,j]``) multiplies the kernel elementwise;
    causal zeroes ``j > i``. The reference for cosFormer and the log-linear Performer.

    Shapes: ``qf [b,h,i,m]``, ``kf [b,h,j,m]``, ``v [b,h,j,e]`` -> ``[b,h,i,e]``.
    """
    dtype = torch.promote_types(qf.dtype, torch.float32)
    a = torch.einsum("bhim,bhjm->bhij", qf.to(dtype), kf.to(dtype))
    if weights is not None:
        a = a * weights.to(dtype)
    if causal:
        li, lj = a.shape[-2:]
        a = a.masked_fill(~torch.ones(li, lj, dtype=torch.bool, device=a.device).tril(), 0.0)
    guard = eps if eps is not None else torch.finfo(dtype).tiny
    return (a @ v.to(dtype)) / a.sum(-1, keepdim=True).clamp_min(guard)


# --------------------------------------------------------------------------------------------
# cosFormer (Qin et al. 2022, "cosFormer: Rethinking softmax in attention").
# --------------------------------------------------------------------------------------------


def cosformer_angles(
    length: int,
    *,
    num_valid: torch.Tensor,
    max_len: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Re-weighting angles ``theta_i = pi i / (2 M)``.

    ``M`` is ``max_len`` when given, else the number of real tokens of each sequence, so that a
    right-padded sequence is weighted exactly as the unpadded one and ``|i - j| < M`` keeps
    ``cos(theta_i - theta_j) > 0``.

    Shapes: ``num_valid [b]`` -> ``[b, L]``.
    """
    idx = torch.arange(length, device=num_valid.device, dtype=dtype)
    if max_len is not None:
        if length > max_len:
            raise ValueError(f"sequence length {length} exceeds cosFormer max_len {max_len}")
        m = torch.full_like(num_valid, max_len, dtype=dtype)
    else:
        m = num_valid.to(dtype).clamp_min(1.0)
    return (math.pi / 2) * idx.unsqueeze(0) / m.unsqueeze(1)


def cosformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    angles: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    chunk_size: int = 64,
) -> torch.Tensor:
    """cosFormer in linear time.

    ``A_ij = relu(q_i) . relu(k_j) cos(theta_i - theta_j)``; by
    ``cos(a - b) = cos a cos b + sin a sin b`` this is a linear kernel on the features
    ``[relu(x) cos theta, relu(x) sin theta]`` (2 d_head wide), so bidirectional and causal
    (chunked prefix sums) linear attention from :mod:`flt_mol.attention.linear` apply unchanged;
    ``out = A V / (A 1)`` (guarded: a query whose ReLU features are all zero outputs 0).

    Shapes: ``q, k, v [b,h,L,d]``, ``angles [b,L]``, ``key_padding_mask [b,L]`` (True = pad)
    -> ``[b,h,L,d]``.
    """
    cos, sin = angles.cos()[:, None, :, None], angles.sin()[:, None, :, None]
    qr, kr = torch.relu(q), torch.relu(k)
    qf = torch.cat([qr * cos, qr * sin], dim=-1)
    kf = torch.cat([kr * cos, kr * sin], dim=-1)
    if causal:
        return causal_linear_attention(qf, kf, v, padding_mask=key_padding_mask, chunk_size=chunk_size)
    return linear_attention(qf, kf, v, padding_mask=key_padding_mask)


def cosformer_attention_exact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    angles: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Quadratic reference: ``A_ij = relu(q_i).relu(k_j) cos(theta_i - theta_j)`` materialised."""
    kr = torch.relu(k)
    if key_padding_mask is not None:
        kr = kr.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    weights = torch.cos(angles[:, :, None] - angles[:, None, :])[:, None]  # [b,1,i,j]
    return linear_attention_features_exact(torch.relu(q), kr, v, weights=weights, causal=causal)


# --------------------------------------------------------------------------------------------
# Toeplitz products (log-linear Performer, Luo et al. 2021).
# --------------------------------------------------------------------------------------------


def toeplitz_dense(coeffs: torch.Tensor) -> torch.Tensor:
    """Dense Toeplitz matrix ``T_ij = t_{i-j}`` from ``coeffs [..., 2L-1]`` ordered ``t_{-(L-1)} .. t_{L-1}``.

    Shapes: ``[..., 2L-1] -> [..., L, L]``.
    """
    n = coeffs.shape[-1]
    if n % 2 != 1:
        raise ValueError(f"Toeplitz coefficients must have odd length 2L-1, got {n}")
    length = (n + 1) // 2
    idx = torch.arange(length, device=coeffs.device)
    offsets = idx[:, None] - idx[None, :] + (length - 1)  # (i - j) shifted to [0, 2L-2]
    return coeffs[..., offsets]


def toeplitz_matvec(coeffs: torch.Tensor, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y_i = sum_j t_{i-j} x_j`` in O(L log L) by embedding T in a 2L circulant and using the FFT.

    The circulant's first column is ``[t_0, t_1, .., t_{L-1}, 0, t_{-(L-1)}, .., t_{-1}]``; its
    product with ``[x, 0]`` equals ``T x`` on the first L rows. The sequence is the last axis
    (contiguous FFTs are ~2x faster than strided ones on CPU).

    The FFT's rounding error is relative to the largest entry of the whole output (not of each
    row), so rows much smaller than the largest lose relative accuracy: ``dtype`` (default: x's,
    at least float32) sets the precision the transform runs in.

    Shapes: ``coeffs [..., 2L-1]`` (broadcast against x's leading dims), ``x [..., L]`` -> ``[..., L]``
    (in ``dtype``).
    """
    length = x.shape[-1]
    if coeffs.shape[-1] != 2 * length - 1:
        raise ValueError(f"coeffs must have 2L-1 = {2 * length - 1} entries, got {coeffs.shape[-1]}")
    n = 2 * length
    dtype = dtype if dtype is not None else torch.promote_types(x.dtype, torch.float32)
    col = torch.cat(
        [coeffs[..., length - 1 :], coeffs.new_zeros(coeffs.shape[:-1] + (1,)), coeffs[..., : length - 1]],
        dim=-1,
    ).to(dtype)
    col_f = torch.fft.rfft(col, n=n, dim=-1)  # [..., n/2+1]
    x_f = torch.fft.rfft(x.to(dtype), n=n, dim=-1)  # [..., n/2+1]
    return torch.fft.irfft(col_f * x_f, n=n, dim=-1)[..., :length]


def loglinear_attention(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    *,
    rel_bias: torch.Tensor,
    causal: bool = False,
    fft_dtype: torch.dtype | None = None,
    feature_chunk: int = 8,
) -> torch.Tensor:
    """Kernelized attention with a Toeplitz RPE (Luo et al. 2021), O(L log L m e).

    ``A_ij = exp(b_{i-j}) phi(q_i).phi(k_j)``; ``out_i = phi(q_i) . [C (phi(K) (x) [V, 1])]_i``
    with the Toeplitz ``C_ij = exp(b_{i-j})`` (zero for ``j > i`` when causal) applied by real
    FFTs (length 2L) to the ``m (e + 1)`` channels ``phi(k_j)_m [v_j, 1]_e``: that channel count
    is the method's cost (FLT's causal sums carry ``m e`` numbers per token, without a transform).

    The features are processed ``feature_chunk`` at a time and each chunk is contracted with
    ``phi(q)`` before the next, so the transforms hold ``[b, h, chunk, e + 1, 2L]`` instead of
    the whole ``[b, h, m, e + 1, 2L]``; the spectrum of ``C`` is computed once per call.

    ``fft_dtype``: precision of the Toeplitz products (default: the features', at least float32).
    The FFT's rounding error is relative to the largest entry of a channel, not of each row, and
    can exceed the small denominators of early causal rows in float32 (made them <= 0 and training
    diverged here after ~170 steps); :class:`LogLinearAttention` therefore uses float64.

    Shapes: ``qf [b,h,L,m]``, ``kf [b,h,L,m]`` (zero on padded keys), ``v [b,h,L,e]``,
    ``rel_bias [h, 2L-1]`` ordered ``b_{-(L-1)} .. b_{L-1}`` -> ``[b,h,L,e]``.
    """
    if not isinstance(feature_chunk, int) or feature_chunk < 1:
        raise ValueError(f"feature_chunk must be a positive int, got {feature_chunk!r}")
    b, h, length, m = qf.shape
    e = v.shape[-1]
    if rel_bias.shape[-1] != 2 * length - 1:
        raise ValueError(f"rel_bias must have 2L-1 = {2 * length - 1} offsets, got {rel_bias.shape[-1]}")
    dtype = fft_dtype if fft_dtype is not None else torch.promote_types(qf.dtype, torch.float32)
    n = 2 * length
    coeffs = _toeplitz_exp(rel_bias, causal=causal)  # [h, 2L-1]
    # First column of the 2L circulant that embeds C (see toeplitz_matvec), transformed once.
    col = torch.cat(
        [coeffs[..., length - 1 :], coeffs.new_zeros(coeffs.shape[:-1] + (1,)), coeffs[..., : length - 1]], dim=-1
    ).to(dtype)
    col_f = torch.fft.rfft(col, n=n, dim=-1)[None, :, None, None, :]  # [1,h,1,1,n/2+1]
    # Sequence last: contiguous transforms.
    v1 = torch.cat([v.to(dtype), v.new_ones(b, h, length, 1, dtype=dtype)], dim=-1).transpose(-1, -2)  # [b,h,e+1,L]
    kt = kf.to(dtype).transpose(-1, -2)  # [b,h,m,L]
    q = qf.to(dtype)
    out = None
    for s in range(0, m, feature_chunk):
        x = kt[:, :, s : s + feature_chunk, None, :] * v1[:, :, None]  # [b,h,c,e+1,L]
        z = torch.fft.irfft(torch.fft.rfft(x, n=n, dim=-1) * col_f, n=n, dim=-1)[..., :length]
        part = torch.einsum("bhic,bhcei->bhie", q[..., s : s + feature_chunk], z)  # [b,h,L,e+1]
        out = part if out is None else out + part
    out = out[..., :e] / out[..., e:].clamp_min(torch.finfo(dtype).tiny)
    return out.to(torch.promote_types(qf.dtype, torch.float32))


def _toeplitz_exp(rel_bias: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """``exp(b)`` over offsets ``-(L-1) .. L-1``; causal zeroes the negative offsets (``j > i``)."""
    coeffs = torch.exp(rel_bias.to(torch.promote_types(rel_bias.dtype, torch.float32)))
    if causal:
        length = (rel_bias.shape[-1] + 1) // 2
        future = torch.arange(rel_bias.shape[-1], device=rel_bias.device) < length - 1
        coeffs = coeffs.masked_fill(future, 0.0)
    return coeffs


def loglinear_attention_exact(
    qf: torch.Tensor,
    kf: torch.Tensor,
    v: torch.Tensor,
    *,
    rel_bias: torch.Tensor,
    causal: bool = False,
) -> torch.Tensor:
    """Quadratic reference for :func:`loglinear_attention`: the dense Toeplitz mask times ``qf kf^T``."""
    weights = toeplitz_dense(_toeplitz_exp(rel_bias, causal=causal))[None]  # [1,h,i,j]
    return linear_attention_features_exact(qf, kf, v, weights=weights, causal=causal)


def toeplitz_softmax_attention_exact(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    rel_bias: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """What the log-linear Performer estimates: ``softmax(q k^T / sqrt d + b_{i-j}) v``.

    Shapes: ``q, k, v [b,h,L,d]``, ``rel_bias [h, 2L-1]`` -> ``[b,h,L,d]``.
    """
    d = q.shape[-1]
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d) + toeplitz_dense(rel_bias)[None]
    length = q.shape[2]
    if causal:
        future = ~torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(future, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# --------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------


class _ProjectedAttention(nn.Module):
    """FLTAttention's projection layout: fused ``qkv`` (``x [B,L,D] -> q, k, v [B,H,L,D/H]``)
    and ``out`` (``[B,H,L,D/H] -> [B,L,D]``), so checkpoints and parameter counts compare."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)

    def reset_parameters(self) -> None:
        for lin in (self.qkv, self.out):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, _ = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b h l d]
        return q, k, v

    def _merge(self, out: torch.Tensor, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        b, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(b, length, self.embed_dim).to(x.dtype)
        if padding_mask is not None:
            out = out.masked_fill(padding_mask[..., None], 0.0)
        return self.out(out)

    @staticmethod
    def _check(x: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, L, D], got shape {tuple(x.shape)}")
        if padding_mask is not None and (padding_mask.shape != x.shape[:2] or padding_mask.dtype != torch.bool):
            raise ValueError(
                f"padding_mask must be a bool tensor of shape {tuple(x.shape[:2])}, "
                f"got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )


class CosFormerAttention(_ProjectedAttention):
    """cosFormer attention (Qin et al. 2022).

    ``A_ij = relu(q_i).relu(k_j) cos(pi (i - j) / (2M))``, ``out = A V / (A 1)``, computed in
    O(L d^2) through the features ``[relu(x) cos theta, relu(x) sin theta]``.

    Args:
        embed_dim: model width D.
        num_heads: H (D divisible by H).
        causal: attend only to ``j <= i`` (chunked prefix sums).
        max_len: M of the re-weighting; None uses each sequence's number of real tokens.
        chunk_size: chunk length of the causal prefix sums.

    Shapes: ``x [B,L,D]``, ``pos`` ignored (the re-weighting uses the token index),
    ``padding_mask [B,L]`` (True = pad, right padding) -> ``[B,L,D]``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        max_len: int | None = None,
        chunk_size: int = 64,
    ):
        super().__init__(embed_dim, num_heads)
        self.causal = causal
        self.max_len = max_len
        self.chunk_size = chunk_size
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}, max_len={self.max_len}"

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check(x, padding_mask)
        b, length, _ = x.shape
        num_valid = (
            (~padding_mask).sum(dim=1)
            if padding_mask is not None
            else torch.full((b,), length, device=x.device, dtype=torch.long)
        )
        angles = cosformer_angles(
            length, num_valid=num_valid, max_len=self.max_len,
            dtype=torch.promote_types(x.dtype, torch.float32),
        )
        q, k, v = self._split(x)
        out = cosformer_attention(
            q, k, v, angles=angles, key_padding_mask=padding_mask, causal=self.causal,
            chunk_size=self.chunk_size,
        )
        return self._merge(out, x, padding_mask)


class LogLinearAttention(_ProjectedAttention):
    """Log-linear Performer: FAVOR+ with a learnable Toeplitz RPE (Luo et al. 2021).

    ``A_ij = exp(b_{i-j}) phi(q_i).phi(k_j) ~ exp(q_i.k_j/sqrt d + b_{i-j})`` with one bias
    vector ``b`` per head; the Toeplitz product runs through the FFT in O(L log L) per channel.

    Args:
        embed_dim: model width D.
        num_heads: H.
        causal: attend only to ``j <= i`` (``exp(b_{i-j}) = 0`` for ``j > i``).
        max_len: longest sequence; the bias holds ``2 max_len - 1`` offsets per head.
        num_features: FAVOR+ features m.
        fft_dtype: precision of the FFT Toeplitz products. float64 by default: in float32 the
            FFT rounding made early causal denominators <= 0 and training diverged (see
            :func:`loglinear_attention`); it doubles the FFT's time and memory.
        algorithm: how the same attention is evaluated. ``"fft"``: the method's O(L log L) FFT
            Toeplitz products (:func:`loglinear_attention`). ``"dense"``: the O(L^2) matrix
            ``exp(b_{i-j}) phi(q_i).phi(k_j)`` (:func:`loglinear_attention_exact`; all terms
            positive, so float32 is exact enough). ``"auto"``: dense up to ``dense_max_len``
            tokens, FFT beyond. The function, and so the trained model, is the same; only the
            cost differs (measured at L = 128, m = 32, e = 32, forward + backward per layer:
            FFT float64 1.1 s, dense 0.02 s).
        dense_max_len: the longest sequence ``"auto"`` evaluates densely.
        feature_chunk: features per FFT chunk (bounds the transforms' memory).

    Shapes: ``x [B,L,D]``, ``pos`` ignored (Toeplitz in the token index),
    ``padding_mask [B,L]`` (True = pad) -> ``[B,L,D]``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        causal: bool = False,
        max_len: int = 4096,
        num_features: int = 64,
        fft_dtype: torch.dtype = torch.float64,
        algorithm: str = "fft",
        dense_max_len: int = 256,
        feature_chunk: int = 8,
    ):
        super().__init__(embed_dim, num_heads)
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if algorithm not in LOGLINEAR_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {LOGLINEAR_ALGORITHMS}, got {algorithm!r}")
        if not isinstance(feature_chunk, int) or feature_chunk < 1:
            raise ValueError(f"feature_chunk must be a positive int, got {feature_chunk!r}")
        self.algorithm = algorithm
        self.dense_max_len = int(dense_max_len)
        self.feature_chunk = feature_chunk
        self.causal = causal
        self.max_len = max_len
        self.num_features = num_features
        self.fft_dtype = fft_dtype
        self.rel_bias = nn.Parameter(torch.zeros(num_heads, 2 * max_len - 1))
        self.feature_map = FavorPlusFeatureMap(self.head_dim, num_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # Zero bias = plain Performer at initialisation; training learns the Toeplitz mask.
        nn.init.zeros_(self.rel_bias)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Draw a new orthogonal FAVOR+ projection (never done implicitly by ``forward``)."""
        self.feature_map.redraw(generator)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, causal={self.causal}, "
            f"max_len={self.max_len}, num_features={self.num_features}, fft_dtype={self.fft_dtype}, "
            f"algorithm={self.algorithm!r}"
        )

    def bias_for_length(self, length: int) -> torch.Tensor:
        """``b_{-(L-1)} .. b_{L-1}`` per head: ``[H, 2L-1]``."""
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds LogLinearAttention max_len {self.max_len}")
        c = self.max_len - 1
        return self.rel_bias[:, c - (length - 1) : c + length]

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._check(x, padding_mask)
        q, k, v = self._split(x)
        scale = self.head_dim**-0.25  # phi(q).phi(k) estimates exp(q.k / sqrt(d))
        qf = self.feature_map(q * scale, is_query=True)
        kf = self.feature_map(k * scale, is_query=False, padding_mask=padding_mask)
        length = x.shape[1]
        bias = self.bias_for_length(length)
        if self.algorithm == "dense" or (self.algorithm == "auto" and length <= self.dense_max_len):
            out = loglinear_attention_exact(qf, kf, v, rel_bias=bias, causal=self.causal)
        else:
            out = loglinear_attention(
                qf, kf, v, rel_bias=bias, causal=self.causal, fft_dtype=self.fft_dtype,
                feature_chunk=self.feature_chunk,
            )
        return self._merge(out, x, padding_mask)
