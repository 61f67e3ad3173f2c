"""Vision transformer with the attention injected (paper Sec. 5.2, Table 2).

``images [B, C, H, W] -> non-overlapping p x p patches -> linear embedding + learned absolute
position embedding -> N x TransformerBlock(attention, pos = patch grid) -> LN`` (``forward_features``)
``-> mean over patches -> linear classifier`` (``forward_head``). Mean pooling rather than a class
token: a class token has no place on the 2D patch grid the RPE acts on.

Patch ``(row, col)`` has ``pos = (row, col)`` (integers, ``pos [B, P, 2]``), so the 2D RPE sees
offsets in patch units. Variants (``ViTConfig.attention``):

==============  =====================================================================
``flt``         FLTAttention(mode="flt"), 2D Gaussian-mixture RPE (paper: T = 25 modes,
                r = 64), learnable-ReLU feature map ``phi(x) = relu(W x)`` (paper App. B.2)
``performer``   FLTAttention(mode="performer", FAVOR+)
``cosformer``   CosFormerAttention on the row-major patch index
``exact``       FLTAttention(mode="exact") with the exact mask of the same RPE
==============  =====================================================================

Paper configuration: 12 layers, 12 heads, FFN 3072 (width 768, ViT-B).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flt_mol.attention import FLTAttention, GaussianMixtureRPE, LocalRPE
from flt_mol.attention.baselines import CosFormerAttention
from flt_mol.models.blocks import TransformerBlock

__all__ = ["ViTConfig", "VisionTransformer", "patch_grid", "VIT_ATTENTIONS"]

VIT_ATTENTIONS = ("flt", "performer", "cosformer", "exact")


@dataclass
class ViTConfig:
    """Model part of a ViT recipe (``model:`` section)."""

    attention: str = "flt"  # flt | performer | cosformer | exact
    rpe: str = "gaussian_mixture"  # gaussian_mixture | local | none (flt and exact)
    kernel: str = "learnable_relu"  # feature map of flt (performer always uses favor+)
    image_size: int = 28
    patch_size: int = 4
    in_channels: int = 1
    num_classes: int = 10
    num_layers: int = 4
    num_heads: int = 4
    dim: int = 128
    ffn_dim: int = 256
    num_kernel_features: int = 64  # m
    num_rpe_features: int = 64  # r
    rpe_terms: int = 25  # T
    dropout: float = 0.1
    attention_dropout: float = 0.0

    def validate(self) -> None:
        from flt_mol.errors import ConfigError

        if self.attention not in VIT_ATTENTIONS:
            raise ConfigError(f"model.attention must be one of {VIT_ATTENTIONS}, got {self.attention!r}")
        if self.rpe not in ("gaussian_mixture", "local", "none"):
            raise ConfigError(f"model.rpe must be gaussian_mixture, local or none, got {self.rpe!r}")
        if self.attention == "flt" and self.rpe == "none":
            raise ConfigError("model.attention=flt needs model.rpe=gaussian_mixture or local")
        if self.image_size % self.patch_size != 0:
            raise ConfigError(f"model.image_size ({self.image_size}) must be a multiple of model.patch_size ({self.patch_size})")
        if self.dim % self.num_heads != 0:
            raise ConfigError(f"model.dim ({self.dim}) must be divisible by model.num_heads ({self.num_heads})")
        for name in ("patch_size", "in_channels", "num_classes", "num_layers", "num_heads", "dim", "ffn_dim",
                     "num_kernel_features", "num_rpe_features", "rpe_terms"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def uses_rpe(self) -> bool:
        return self.attention in ("flt", "exact") and self.rpe != "none"


def patch_grid(grid: int, *, device: torch.device | None = None) -> torch.Tensor:
    """Integer ``(row, col)`` of the patches in row-major order, ``[grid * grid, 2]`` float."""
    rows, cols = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    return torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=-1).float()


class VisionTransformer(nn.Module):
    """ViT classifier split timm-style into :meth:`forward_features` and :meth:`forward_head`.

    Shapes: ``images [B, C, H, W]`` -> features ``[B, P, D]`` -> logits ``[B, num_classes]``
    (``P = (H / p) (W / p)``).
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.patch_embed = nn.Conv2d(c.in_channels, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.grid * c.grid, c.dim))
        self.register_buffer("patch_pos", patch_grid(c.grid), persistent=False)
        self.rpe = self._rpe() if c.uses_rpe() else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(c.dim, self._attention(), c.ffn_dim, dropout=c.dropout) for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)
        self.reset_parameters()

    def _rpe(self) -> nn.Module:
        c = self.config
        # Small initial masks (peak ~0.3) keep the RPE features from dominating the query / key
        # vectors the feature map sees (see flt_mol.models.lm.build_rpe_1d).
        if c.rpe == "gaussian_mixture":
            # Frequencies in cycles per patch, means in the aliasing band of the integer grid.
            return GaussianMixtureRPE(c.num_heads, c.rpe_terms, 2, nonnegative=True, init_mean_range=0.5,
                                      init_std=0.05, init_peak=0.3)
        return LocalRPE(c.num_heads, c.rpe_terms, 2, lattice=True,
                        init_half_width_range=(1.0, max(1.0, c.grid / 2)), init_peak=0.3)

    def _attention(self) -> nn.Module:
        c = self.config
        if c.attention in ("flt", "exact"):
            return FLTAttention(c.dim, c.num_heads, rpe=self.rpe, mode=c.attention, kernel=c.kernel,
                                num_rpe_features=c.num_rpe_features, num_kernel_features=c.num_kernel_features,
                                dropout=c.attention_dropout)
        if c.attention == "performer":
            return FLTAttention(c.dim, c.num_heads, mode="performer", kernel="favor+",
                                num_kernel_features=c.num_kernel_features, dropout=c.attention_dropout)
        return CosFormerAttention(c.dim, c.num_heads)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.zeros_(self.head.bias)

    @torch.no_grad()
    def redraw_features(self, generator: torch.Generator | None = None) -> None:
        """Redraw every layer's random features (kernel projections, RPE noise)."""
        for block in self.blocks:
            redraw = getattr(block.attention, "redraw_features", None)
            if redraw is not None:
                redraw(generator)

    def extra_repr(self) -> str:
        c = self.config
        return (f"attention={c.attention!r}, rpe={c.rpe if c.uses_rpe() else None!r}, image={c.image_size}, "
                f"patch={c.patch_size}, layers={c.num_layers}, dim={c.dim}, heads={c.num_heads}")

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens ``[B, P, D]`` (with absolute position embedding) and ``pos [B, P, 2]``."""
        c = self.config
        if images.dim() != 4 or images.shape[1:] != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(
                f"images must be [B, {c.in_channels}, {c.image_size}, {c.image_size}], got {tuple(images.shape)}"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, P, D]
        x = x + self.pos_embed
        pos = self.patch_pos.unsqueeze(0).expand(x.shape[0], -1, -1)
        return x, pos

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x, pos = self.embed(images)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, pos, None)
        return self.norm(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.mean(dim=1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))
