"""Decoder-only causal language model with the attention injected (paper Sec. 5.1, Table 1).

``tokens [B, L] -> embedding -> N x TransformerBlock(causal attention, pos = [0..L-1]) -> LN ->
logits [B, L, V]`` (output projection tied to the embedding). Token ``i`` has ``pos[i] = i``
(``pos [B, L, 1]``), so the RPE variants see relative offsets. A learned absolute position
embedding (``abs_pos``) is on by default only where no other positional signal exists
(Performer, Linear Transformer); the CPU recipes turn it on for every variant, so that FLT is the
Performer plus an RPE (measured: without it the local-RPE FLT reached perplexity 8.3 against the
Performer's 6.3, because its learned RPE stays far too weak to supply locality; README).

Attention variants (``LMConfig.attention``), every other part equal:

==============  =====================================================================
``flt``         FLTAttention(mode="flt", FAVOR+), RPE = ``rpe`` (Gaussian mixture or local/box)
``performer``   FLTAttention(mode="performer", FAVOR+) (Choromanski et al. 2021)
``linear``      FLTAttention(mode="performer", kernel="elu+1") (Katharopoulos et al. 2020)
``cosformer``   CosFormerAttention (Qin et al. 2022)
``loglinear``   LogLinearAttention: FAVOR+ with a Toeplitz RPE via FFT (Luo et al. 2021)
``exact``       FLTAttention(mode="exact"): softmax with the exact mask of the same ``rpe``
==============  =====================================================================

One RPE module per model (one mask per head), shared by all layers as in the paper.
Paper configuration: 6 layers, 8 heads, width 512, FFN 2048, m = 64, r = 32, sequence 512.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flt_mol.attention import FLTAttention, GaussianMixtureRPE, LocalRPE
from flt_mol.attention.rpe import RPE_SPLITS
from flt_mol.attention.baselines import LOGLINEAR_ALGORITHMS, CosFormerAttention, LogLinearAttention
from flt_mol.models.blocks import TransformerBlock

__all__ = ["LMConfig", "CausalLM", "ATTENTIONS", "RPES", "build_rpe_1d"]

ATTENTIONS = ("flt", "performer", "linear", "cosformer", "loglinear", "exact")
RPES = ("gaussian_mixture", "local", "none")


@dataclass
class LMConfig:
    """Model part of an LM recipe (``model:`` section). ``vocab_size`` is set from the data."""

    attention: str = "flt"  # flt | performer | linear | cosformer | loglinear | exact
    rpe: str = "local"  # gaussian_mixture | local | none (used by flt and exact)
    num_layers: int = 2
    num_heads: int = 4
    dim: int = 128
    ffn_dim: int = 512
    num_kernel_features: int = 64  # m
    num_rpe_features: int = 32  # r
    rpe_terms: int = 4  # T: mixture modes / box terms per head
    # How a = g/p splits between query and key RPE features (flt_mol.attention.rpe.RPE_SPLITS):
    # auto = balanced for the nonnegative Gaussian mixture, one-sided for the signed local RPE;
    # signed_balanced = sqrt|a| on both sides for any sign (smaller FAVOR+ input norms).
    rpe_split: str = "auto"
    rpe_init_peak: float = 0.3  # initial scale of |f| (DESIGN.md §2(c): keep O(1) or less)
    rpe_init_max_width: float = 8.0  # local RPE: box half-widths start linearly in [1, this]
    max_len: int = 512  # longest sequence (log-linear bias table, absolute positions)
    dropout: float = 0.1
    attention_dropout: float = 0.0
    abs_pos: bool | None = None  # null: on exactly for the variants without any positional signal
    # log-linear Performer: fft | dense | auto (dense up to 256 tokens; the same function, see
    # flt_mol.attention.baselines.LogLinearAttention)
    loglinear_algorithm: str = "auto"
    vocab_size: int = 0

    def validate(self) -> None:
        from flt_mol.errors import ConfigError

        if self.attention not in ATTENTIONS:
            raise ConfigError(f"model.attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.rpe not in RPES:
            raise ConfigError(f"model.rpe must be one of {RPES}, got {self.rpe!r}")
        if self.attention == "flt" and self.rpe == "none":
            raise ConfigError("model.attention=flt needs model.rpe=gaussian_mixture or local")
        if self.rpe_split not in RPE_SPLITS:
            raise ConfigError(f"model.rpe_split must be one of {RPE_SPLITS}, got {self.rpe_split!r}")
        if self.loglinear_algorithm not in LOGLINEAR_ALGORITHMS:
            raise ConfigError(
                f"model.loglinear_algorithm must be one of {LOGLINEAR_ALGORITHMS}, got {self.loglinear_algorithm!r}"
            )
        if self.dim % self.num_heads != 0:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
        if self.rpe_init_peak < 0 or self.rpe_init_max_width < 1.0:
            raise ConfigError("model.rpe_init_peak must be >= 0 and model.rpe_init_max_width >= 1")
        for name in ("num_layers", "num_heads", "dim", "ffn_dim", "num_kernel_features", "num_rpe_features",
                     "rpe_terms", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError("model.dropout and model.attention_dropout must be in [0, 1)")

    def uses_rpe(self) -> bool:
        return self.attention in ("flt", "exact") and self.rpe != "none"

    def uses_abs_pos(self) -> bool:
        if self.abs_pos is not None:
            return self.abs_pos
        # cosFormer's re-weighting and the log-linear Toeplitz bias carry relative position.
        return self.attention in ("performer", "linear") or (self.attention == "exact" and self.rpe == "none")


def build_rpe_1d(
    kind: str, num_heads: int, num_terms: int, *, init_peak: float = 0.3, max_width: float = 8.0
) -> nn.Module:
    """The per-head RPE on 1D token indices: Gaussian mixture (paper Eq. 4.3) or local boxes
    ``f(n) = sum_t w_t 1[|n| <= v_t]`` on the integer lattice (paper Eq. 20-21).

    Initialised small by default (peak |f| ~ ``init_peak`` = 0.3, box half-widths 1 to
    ``max_width`` = 8 tokens): the RPE features add about
    ``mean(a^2)`` to the squared norms FAVOR+ exponentiates (DESIGN.md §2(c)), and wide boxes or
    large amplitudes made the kernel estimate, and training, visibly worse. The Gaussian mixture
    is nonnegative so the balanced ``sqrt(a)`` split applies; its mask is then a positive-definite
    function, largest at offset 0 (a locality prior the weights can flatten).
    """
    if kind == "gaussian_mixture":
        # Frequencies in cycles per token: means inside the aliasing band [-1/2, 1/2).
        return GaussianMixtureRPE(num_heads, num_terms, 1, nonnegative=True, init_mean_range=0.5,
                                  init_std=0.05, init_peak=init_peak)
    if kind == "local":
        return LocalRPE(num_heads, num_terms, 1, lattice=True, init_half_width_range=(1.0, max_width),
                        init_peak=init_peak)
    raise ValueError(f"unknown 1D RPE {kind!r}; expected gaussian_mixture or local")


class CausalLM(nn.Module):
    """Decoder-only LM.

    Args:
        config: :class:`LMConfig` (``vocab_size`` must be set).

    Shapes: ``forward(tokens [B, L] long, padding_mask [B, L] | None) -> logits [B, L, V]``;
    ``padding_mask`` True = pad (right padding).
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        config.validate()
        if config.vocab_size < 1:
            raise ValueError(f"LMConfig.vocab_size must be >= 1 (set it from the vocabulary), got {config.vocab_size}")
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.pos_embed = nn.Embedding(c.max_len, c.dim) if c.uses_abs_pos() else None
        self.rpe = (
            build_rpe_1d(c.rpe, c.num_heads, c.rpe_terms, init_peak=c.rpe_init_peak, max_width=c.rpe_init_max_width)
            if c.uses_rpe()
            else None
        )
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.dim, self._attention(), c.ffn_dim, dropout=c.dropout) for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied input / output embedding
        self.reset_parameters()

    def _attention(self) -> nn.Module:
        c = self.config
        if c.attention in ("flt", "performer", "exact"):
            return FLTAttention(
                c.dim, c.num_heads, rpe=self.rpe, mode=c.attention, num_rpe_features=c.num_rpe_features,
                num_kernel_features=c.num_kernel_features, kernel="favor+", causal=True,
                dropout=c.attention_dropout, rpe_split=c.rpe_split,
            )
        if c.attention == "linear":
            return FLTAttention(c.dim, c.num_heads, mode="performer", kernel="elu+1", causal=True,
                                num_kernel_features=c.num_kernel_features, dropout=c.attention_dropout)
        if c.attention == "cosformer":
            # A fixed M = max_len (not the sequence length) keeps every prefix's output independent
            # of how many tokens follow: strict causality, also for generation.
            return CosFormerAttention(c.dim, c.num_heads, causal=True, max_len=c.max_len)
        if c.attention == "loglinear":
            return LogLinearAttention(c.dim, c.num_heads, causal=True, max_len=c.max_len,
                                      num_features=c.num_kernel_features, algorithm=c.loglinear_algorithm)
        raise ValueError(f"unknown attention {c.attention!r}")

    def reset_parameters(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=0.02)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Redraw every layer's random features (kernel projections, RPE noise)."""
        for block in self.blocks:
            redraw = getattr(block.attention, "redraw_features", None)
            if redraw is not None:
                redraw(generator)

    def extra_repr(self) -> str:
        c = self.config
        return (f"attention={c.attention!r}, rpe={c.rpe if c.uses_rpe() else None!r}, layers={c.num_layers}, "
                f"dim={c.dim}, heads={c.num_heads}, vocab={c.vocab_size}")

    def positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """``pos [B, L, 1]`` = token index (float)."""
        b, length = tokens.shape
        return torch.arange(length, device=tokens.device, dtype=torch.float32).view(1, length, 1).expand(b, -1, -1)

    def hidden_states(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None,
                      *, upto: int | None = None) -> torch.Tensor:
        """Input of block ``upto`` (all blocks and the final LN when None), ``[B, L, D]``."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got shape {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.config.max_len:
            raise ValueError(f"sequence length {length} exceeds model.max_len {self.config.max_len}")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed.weight[:length]
        x = self.drop(x)
        pos = self.positions(tokens)
        for i, block in enumerate(self.blocks):
            if upto is not None and i == upto:
                return x
            x = block(x, pos, padding_mask)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.hidden_states(tokens, padding_mask))

    @torch.no_grad()
    def attention_maps(self, tokens: torch.Tensor, *, layer: int = 0) -> torch.Tensor:
        """Row-normalised attention of block ``layer`` as the model applies it (for FLT: the
        matrix implied by the random features), ``[B, H, L, L]``. Needs an FLTAttention layer."""
        if not 0 <= layer < len(self.blocks):
            raise ValueError(f"layer must be in [0, {len(self.blocks)}), got {layer}")
        attn = self.blocks[layer].attention
        if not isinstance(attn, FLTAttention):
            raise TypeError(f"attention maps need FLTAttention layers, this model uses {type(attn).__name__}")
        x = self.hidden_states(tokens, upto=layer)
        return attn.attention_weights(self.blocks[layer].norm1(x), self.positions(tokens))
