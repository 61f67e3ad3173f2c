"""Kernel feature maps ``phi`` for linear attention.

``softmax(q.k)`` is replaced by ``phi(q).phi(k)``; the maps here are

* FAVOR+ (Choromanski et al. 2021): ``phi(x) = exp(W x - |x|^2/2 - stab) / sqrt(m)`` with the rows
  of ``W`` drawn as orthogonal Gaussian blocks; ``E[phi(q).phi(k)] = exp(q.k) * exp(-stab_q-stab_k)``
  (the stabilisers cancel in the normalised attention);
* ReLU random features ``relu(W x) / sqrt(m)`` (Performer-ReLU);
* learnable ReLU ``relu(W x)`` with ``W`` an ``nn.Linear`` (the FLT paper's ViT choice);
* ``elu(x) + 1`` (Katharopoulos et al. 2020), deterministic.

Einsum letters: b batch, h heads, l/i/j positions, d input width, m features.

Numerics (DESIGN.md §2): every map computes in fp32 whatever the input dtype; the FAVOR+ query
stabiliser is the max of the exponent per query row, the key stabiliser the max per (batch, head)
over real keys and features (never across the batch, so one example cannot underflow another);
key features of padded tokens are zeroed. Stabilisers are detached: they are constants that cancel.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "orthogonal_gaussian_matrix",
    "favor_plus_features",
    "favor_plus_prefix",
    "relu_features",
    "elu_features",
    "FavorPlusFeatureMap",
    "ReLUFeatureMap",
    "LearnableReLUFeatureMap",
    "EluFeatureMap",
    "build_feature_map",
    "KERNELS",
]

KERNELS = ("favor+", "relu", "learnable_relu", "elu+1")


def orthogonal_gaussian_matrix(
    num_features: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random projection with orthogonal Gaussian blocks (Performer's ORF).

    Rows come in blocks of ``dim`` mutually orthogonal directions (QR of a Gaussian matrix); each
    row is rescaled by an independent chi(dim)-distributed norm, so every row is marginally
    ``N(0, I_dim)`` (which keeps FAVOR+ unbiased) while rows inside a block are orthogonal (which
    lowers its variance).

    Shapes: returns ``[num_features, dim]``.
    """
    if num_features < 1 or dim < 1:
        raise ValueError(f"num_features and dim must be >= 1, got {num_features} and {dim}")
    blocks = []
    remaining = num_features
    while remaining > 0:
        g = torch.randn(dim, dim, generator=generator, device=device, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        # Fix the sign ambiguity of QR so the block is Haar-distributed.
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        blocks.append(q.T[: min(remaining, dim)])
        remaining -= dim
    w = torch.cat(blocks, dim=0)  # [m, d], unit rows
    norms = torch.randn(num_features, dim, generator=generator, device=device, dtype=torch.float64)
    w = w * norms.norm(dim=1, keepdim=True)  # chi(d) row norms
    return w.to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bfloat16/fp32 inputs, fp64 for fp64: the precision of every sum here."""
    return torch.promote_types(dtype, torch.float32)


def _check_key_mask(padding_mask: torch.Tensor, x: torch.Tensor) -> None:
    if padding_mask.dim() != 2 or padding_mask.shape[0] != x.shape[0] or padding_mask.shape[1] != x.shape[-2]:
        raise ValueError(
            f"padding_mask must be [B, L] = [{x.shape[0]}, {x.shape[-2]}], got {tuple(padding_mask.shape)}"
        )


def _key_keep(padding_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """``[B, L]`` pad mask -> ``[B, 1, L, 1]`` float keep mask broadcastable to ``x [B,H,L,m]``."""
    if padding_mask is None:
        return None
    _check_key_mask(padding_mask, x)
    return (~padding_mask.bool()).to(x.dtype)[:, None, :, None]


def favor_plus_features(
    x: torch.Tensor,
    *,
    projection: torch.Tensor,
    is_query: bool,
    padding_mask: torch.Tensor | None = None,
    stabilize: bool = True,
    prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """FAVOR+ positive random features.

    ``phi(x) = exp(W x - |x|^2/2 - stab) / sqrt(m)``; ``stab`` = max of the exponent per query row
    (queries) or per (batch, head) over real keys and all features (keys).
    ``E_W[phi(q) . phi(k)] = exp(q . k - stab_q - stab_k)``.

    Args:
        x: inputs, already scaled (pass ``q d^-1/4``), any float dtype; computed in fp32.
        projection: ``[m, d]`` with Gaussian rows (:func:`orthogonal_gaussian_matrix`).
        is_query: choose the stabiliser.
        padding_mask: ``[B, L]`` True = pad; only used for keys (their features are zeroed and
            they are left out of the key stabiliser).
        stabilize: subtract the stabiliser (False gives the raw, unbiased-for-``exp(q.k)`` map;
            for tests only, it overflows for large inputs).
        prefix: ``(W_p p, |p|^2)`` (:func:`favor_plus_prefix`) of a leading block ``p`` of the
            input: the features are then those of ``[p, x]`` with ``projection = [W_p, W_x]``,
            without forming the concatenation. A ``p`` shared by several calls (FLT's RPE
            features, fixed for a structure across refinement blocks) is projected once.

    Shapes: ``x [B, H, L, d]`` -> ``[B, H, L, m]`` (fp32); with ``prefix``, ``x [B, H, L, d - d_p]``
    and the prefix's tensors ``[B or 1, H, L, m]`` and ``[B or 1, H, L, 1]``.
    """
    if prefix is None and x.shape[-1] != projection.shape[-1]:
        raise ValueError(f"x has width {x.shape[-1]} but projection expects {projection.shape[-1]}")
    if prefix is not None and x.shape[-1] >= projection.shape[-1]:
        raise ValueError(f"x has width {x.shape[-1]}: with a prefix it must be narrower than the "
                         f"projection ({projection.shape[-1]})")
    x = x.to(accumulation_dtype(x.dtype))
    m = projection.shape[0]
    if prefix is None:
        wx = torch.matmul(x, projection.to(x.dtype).T)  # [b h l m], a fresh buffer
    else:
        wx = torch.matmul(x, projection[:, projection.shape[-1] - x.shape[-1]:].to(x.dtype).T).add_(prefix[0])

    def half_sq() -> torch.Tensor:  # |[p, x]|^2 / 2
        sq = (x * x).sum(dim=-1, keepdim=True)
        return 0.5 * (sq + prefix[1] if prefix is not None else sq)

    if not stabilize:
        out = torch.exp(wx - half_sq()) * (1.0 / math.sqrt(m))
        keep = None if is_query else _key_keep(padding_mask, x)
        return out * keep if keep is not None else out
    # The buffer from the matmul is updated in place (its backward does not need it): one
    # subtraction and one exp per element. 1/sqrt(m) is folded into the stabiliser.
    log_sqrt_m = 0.5 * math.log(m)
    if is_query:
        # The row stabiliser is max_m(Wx) - |x|^2/2, so Wx - |x|^2/2 - stab = Wx - max_m(Wx):
        # the query norm cancels exactly and is never computed.
        with torch.no_grad():
            stab = wx.amax(dim=-1, keepdim=True).add_(log_sqrt_m)
        return wx.sub_(stab).exp_()
    wx = wx.sub_(half_sq())
    if padding_mask is not None:
        _check_key_mask(padding_mask, x)
        wx = wx.masked_fill_(padding_mask.bool()[:, None, :, None], float("-inf"))
    with torch.no_grad():
        # A fully padded example would give stab = -inf; any finite constant is fine there.
        stab = wx.amax(dim=(-2, -1), keepdim=True).nan_to_num_(neginf=0.0).add_(log_sqrt_m)
    return wx.sub_(stab).exp_()


def favor_plus_prefix(p: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p W_p^T, |p|^2)`` of a leading input block ``p`` for :func:`favor_plus_features`'s ``prefix``.

    ``W_p`` is the first ``d_p`` columns of ``projection [m, d]``. Shapes: ``p [..., L, d_p]`` ->
    ``([..., L, m], [..., L, 1])`` in the accumulation dtype.
    """
    p = p.to(accumulation_dtype(p.dtype))
    w = projection[:, : p.shape[-1]].to(p.dtype)
    return torch.matmul(p, w.T), (p * p).sum(dim=-1, keepdim=True)


def relu_features(
    x: torch.Tensor,
    *,
    projection: torch.Tensor | None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ReLU features ``relu(W x) / sqrt(m)`` (``W`` None: ``relu(x)``), padded keys zeroed.

    Shapes: ``x [B, H, L, d]`` -> ``[B, H, L, m]`` (fp32).
    """
    x = x.to(accumulation_dtype(x.dtype))
    if projection is not None:
        x = torch.matmul(x, projection.to(x.dtype).T) * (1.0 / math.sqrt(projection.shape[0]))
    out = torch.relu(x)
    keep = _key_keep(padding_mask, out)
    return out * keep if keep is not None else out


def elu_features(x: torch.Tensor, *, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``elu(x) + 1`` (positive, deterministic); padded keys zeroed.

    Shapes: ``x [B, H, L, d]`` -> ``[B, H, L, d]`` (fp32).
    """
    out = torch.nn.functional.elu(x.to(accumulation_dtype(x.dtype))) + 1.0
    keep = _key_keep(padding_mask, out)
    return out * keep if keep is not None else out


class FavorPlusFeatureMap(nn.Module):
    """FAVOR+ map owning its ``[m, d]`` orthogonal projection buffer.

    Args:
        dim: input width d.
        num_features: m.

    Shapes: ``forward(x [B,H,L,d], is_query, padding_mask [B,L]) -> [B,H,L,m]``.
    """

    def __init__(self, dim: int, num_features: int):
        super().__init__()
        if dim < 1 or num_features < 1:
            raise ValueError(f"dim and num_features must be >= 1, got {dim} and {num_features}")
        self.dim = dim
        self.num_features = num_features
        self.register_buffer("projection", orthogonal_gaussian_matrix(num_features, dim))

    @property
    def out_features(self) -> int:
        return self.num_features

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a fresh projection (explicit; never called by ``forward``)."""
        w = orthogonal_gaussian_matrix(
            self.num_features, self.dim, generator=generator, device=self.projection.device
        )
        self.projection.copy_(w)

    # The features of [p, x] can be taken from a projected prefix p (favor_plus_prefix).
    supports_prefix = True

    def forward(
        self, x: torch.Tensor, *, is_query: bool, padding_mask: torch.Tensor | None = None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return favor_plus_features(
            x, projection=self.projection, is_query=is_query, padding_mask=padding_mask, prefix=prefix
        )

    def prefix(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`favor_plus_prefix` with this map's projection."""
        return favor_plus_prefix(p, self.projection)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_features={self.num_features}"


class ReLUFeatureMap(FavorPlusFeatureMap):
    """Random ReLU features ``relu(W x)/sqrt(m)`` with an orthogonal Gaussian ``W`` buffer."""

    supports_prefix = False

    def forward(
        self, x: torch.Tensor, *, is_query: bool, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return relu_features(
            x, projection=self.projection, padding_mask=None if is_query else padding_mask
        )


class LearnableReLUFeatureMap(nn.Module):
    """Learnable ReLU features ``phi(x) = relu(W x)``, ``W`` an ``nn.Linear(d, m, bias=False)``.

    Nothing random: ``redraw`` is a no-op kept for a uniform interface.
    """

    def __init__(self, dim: int, num_features: int):
        super().__init__()
        if dim < 1 or num_features < 1:
            raise ValueError(f"dim and num_features must be >= 1, got {dim} and {num_features}")
        self.dim = dim
        self.num_features = num_features
        self.linear = nn.Linear(dim, num_features, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(self.dim))

    @property
    def out_features(self) -> int:
        return self.num_features

    def redraw(self, generator: torch.Generator | None = None) -> None:
        return None

    def forward(
        self, x: torch.Tensor, *, is_query: bool, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x.to(accumulation_dtype(x.dtype))
        out = torch.relu(torch.matmul(x, self.linear.weight.to(x.dtype).T))
        keep = None if is_query else _key_keep(padding_mask, out)
        return out * keep if keep is not None else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_features={self.num_features}"


class EluFeatureMap(nn.Module):
    """``elu(x) + 1``; output width = input width; ``redraw`` is a no-op."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    @property
    def out_features(self) -> int:
        return self.dim

    def redraw(self, generator: torch.Generator | None = None) -> None:
        return None

    def forward(
        self, x: torch.Tensor, *, is_query: bool, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return elu_features(x, padding_mask=None if is_query else padding_mask)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def build_feature_map(kernel: str, dim: int, num_features: int) -> nn.Module:
    """Construct the feature-map module named ``kernel`` (one of :data:`KERNELS`)."""
    if kernel == "favor+":
        return FavorPlusFeatureMap(dim, num_features)
    if kernel == "relu":
        return ReLUFeatureMap(dim, num_features)
    if kernel == "learnable_relu":
        return LearnableReLUFeatureMap(dim, num_features)
    if kernel == "elu+1":
        return EluFeatureMap(dim)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
