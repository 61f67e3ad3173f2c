"""Population (swarm) learned optimiser: members attend to each other with an RPE over their
positions in parameter space.

K members ``x_1..x_K`` in R^d explore one objective (Rastrigin-type here). At every step each
(member k, coordinate c) gets a token of features

``[pre(g_kc), g_kc / rms_kc, m_kc, (x_kc - x_best,c) / std_c, z(f_k), 1[k = best]]``

(``pre``: log-magnitude/sign preprocessing, ``m``: momentum of the RMS-normalised gradient,
``std_c``: population spread, ``z``: loss z-score in the population). For each coordinate c the K
tokens attend to each other (bidirectional) with an RPE mask ``N[k, k'] = f(x_k - x_k')`` on the
members' full positions (FLT: Gaussian-basis or Gaussian-mixture RPE in d dimensions), so how
much member k listens to k' depends on where they are relative to each other. The update is

``(d_kc, s_kc) = head(h_kc)``, ``delta_kc = -exp(log_lr + r tanh(s_kc)) g_kc / rms_kc + output_scale * d_kc``

(the population decides each member's step size, up to a factor ``exp(+-r)``, and a direction).

The ablation is the same model with ``mode="performer"`` (identical features and sizes, no RPE
mask). This is the population variant of the paper's section 5.4 (after Jain et al. 2023); the
exact architecture of the authors' swarm optimiser is not published, this is our reading.

Einsum legend: k members, c coordinates (= the attention batch), f features, d width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from flt_mol.optim.learned import preprocess_gradient
from flt_mol.optim.memory import ATTENTION_MODES

__all__ = ["SwarmConfig", "SwarmUpdateRule", "SPATIAL_RPES"]

SPATIAL_RPES = ("gaussian_basis", "gaussian_mixture")


@dataclass
class SwarmConfig:
    """The population optimiser.

    Attributes:
        dim: dimension d of the parameter space (the RPE acts on d-dimensional positions).
        population: K members.
        mode: ``flt`` (RPE over member positions), ``performer`` (no RPE), ``exact`` (reference).
        rpe: ``gaussian_basis`` or ``gaussian_mixture`` for ``flt``/``exact``; None for ``performer``.
        hidden_dim, num_layers, num_heads, ffn_dim, num_rpe_terms, num_rpe_features,
        num_kernel_features: sizes.
        position_scale: multiplies member positions before the RPE.
        nominal_lr, rms_beta, momentum, output_scale: the update (see module docstring).
        log_lr_range: r, bound on the log step-size multiplier (0 disables it).
        init_radius: members start uniformly in ``[-init_radius, init_radius]^d``.
    """

    dim: int = 2
    population: int = 8
    mode: str = "flt"
    rpe: str | None = "gaussian_basis"
    hidden_dim: int = 16
    num_layers: int = 1
    num_heads: int = 2
    ffn_dim: int = 32
    num_rpe_terms: int = 4
    num_rpe_features: int = 16
    num_kernel_features: int = 16
    position_scale: float = 1.0
    nominal_lr: float = 0.05
    rms_beta: float = 0.95
    momentum: float = 0.9
    output_scale: float = 0.1
    log_lr_range: float = 3.0
    init_radius: float = 5.12

    def __post_init__(self):
        if self.mode not in ATTENTION_MODES:
            raise ValueError(f"SwarmConfig.mode must be one of {ATTENTION_MODES}, got {self.mode!r}")
        if self.mode == "performer" and self.rpe is not None:
            raise ValueError("SwarmConfig: mode='performer' has no RPE mask; set rpe: null")
        if self.mode != "performer" and self.rpe not in SPATIAL_RPES:
            raise ValueError(f"SwarmConfig: mode={self.mode!r} needs rpe in {SPATIAL_RPES}, got {self.rpe!r}")
        if self.population < 2:
            raise ValueError(f"SwarmConfig.population must be >= 2 (members attend to each other), got {self.population}")
        for name in ("dim", "hidden_dim", "num_layers", "num_heads", "ffn_dim", "num_rpe_terms",
                     "num_rpe_features", "num_kernel_features"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SwarmConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_dim % self.num_heads != 0:
            raise ValueError(f"SwarmConfig: hidden_dim={self.hidden_dim} must be divisible by num_heads={self.num_heads}")
        if self.nominal_lr < 0 or not 0 < self.rms_beta < 1 or not 0 <= self.momentum < 1 or not self.output_scale > 0:
            raise ValueError(
                "SwarmConfig: need nominal_lr >= 0, 0 < rms_beta < 1, 0 <= momentum < 1, output_scale > 0; got "
                f"{self.nominal_lr}, {self.rms_beta}, {self.momentum}, {self.output_scale}"
            )
        if self.log_lr_range < 0:
            raise ValueError(f"SwarmConfig.log_lr_range must be >= 0, got {self.log_lr_range}")
        if not self.init_radius > 0 or not self.position_scale > 0:
            raise ValueError(
                f"SwarmConfig: init_radius and position_scale must be > 0, got {self.init_radius}, {self.position_scale}"
            )


def _build_spatial_rpe(kind: str, *, num_heads: int, num_terms: int, dim: int) -> nn.Module:
    from flt_mol.attention import GaussianBasisRPE, GaussianMixtureRPE

    if kind == "gaussian_basis":
        return GaussianBasisRPE(num_heads, num_terms, dim)
    if kind == "gaussian_mixture":
        return GaussianMixtureRPE(num_heads, num_terms, dim)
    raise ValueError(f"spatial rpe must be one of {SPATIAL_RPES}, got {kind!r}")


class SwarmUpdateRule(nn.Module):
    """Population update ``(x, f, g, state) -> (delta, state)`` (see module docstring).

    Shapes: ``x, g [K, d]``, ``f [K]`` -> ``delta [K, d]``; state ``step []``, ``v, m [K, d]``.
    """

    num_features = 7
    eps = 1e-8

    def __init__(self, config: SwarmConfig):
        super().__init__()
        from flt_mol.attention import FLTAttention
        from flt_mol.models.blocks import TransformerBlock

        self.config = config
        self.in_proj = nn.Linear(self.num_features, config.hidden_dim)
        blocks = []
        for _ in range(config.num_layers):
            rpe = None
            if config.rpe is not None:
                rpe = _build_spatial_rpe(config.rpe, num_heads=config.num_heads, num_terms=config.num_rpe_terms,
                                         dim=config.dim)
            attention = FLTAttention(
                config.hidden_dim,
                config.num_heads,
                rpe=rpe,
                mode=config.mode,
                num_rpe_features=config.num_rpe_features,
                num_kernel_features=config.num_kernel_features,
                causal=False,
            )
            blocks.append(TransformerBlock(config.hidden_dim, attention, config.ffn_dim))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(config.hidden_dim)
        self.head = nn.Sequential(nn.Linear(config.hidden_dim, config.hidden_dim), nn.GELU(),
                                  nn.Linear(config.hidden_dim, 2))  # (direction, log step multiplier)
        self.use_nominal = config.nominal_lr > 0
        self.log_lr = nn.Parameter(torch.tensor(math.log(config.nominal_lr) if self.use_nominal else 0.0),
                                   requires_grad=self.use_nominal)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        nn.init.normal_(self.head[2].weight, std=1e-2)
        nn.init.zeros_(self.head[2].bias)
        with torch.no_grad():
            self.log_lr.fill_(math.log(self.config.nominal_lr) if self.use_nominal else 0.0)

    def redraw_features(self) -> None:
        for block in self.blocks:
            block.attention.redraw_features()

    def initial_state(self, *, device=None, dtype=None) -> dict:
        shape = (self.config.population, self.config.dim)
        return {
            "step": torch.zeros((), device=device, dtype=torch.float32),
            "v": torch.zeros(shape, device=device, dtype=dtype),
            "m": torch.zeros(shape, device=device, dtype=dtype),
        }

    def initial_positions(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Members uniform in ``[-init_radius, init_radius]^d`` -> ``[K, d]``."""
        c = self.config
        return (torch.rand(c.population, c.dim, generator=generator) * 2.0 - 1.0) * c.init_radius

    def forward(self, x: torch.Tensor, losses: torch.Tensor, grad: torch.Tensor, state: dict):
        c = self.config
        k, d = c.population, c.dim
        if x.shape != (k, d) or grad.shape != (k, d) or losses.shape != (k,):
            raise ValueError(
                f"SwarmUpdateRule: expected x, grad [{k}, {d}] and losses [{k}], got "
                f"{tuple(x.shape)}, {tuple(grad.shape)}, {tuple(losses.shape)}"
            )
        step = state["step"] + 1
        v = c.rms_beta * state["v"] + (1 - c.rms_beta) * grad.square()  # [K, d]
        normalised = grad / ((v / (1 - c.rms_beta ** step.to(v.dtype))).sqrt() + self.eps)
        m = c.momentum * state["m"] + (1 - c.momentum) * normalised

        losses_d = losses.detach()
        best = int(torch.argmin(losses_d))
        spread = x.detach().std(dim=0, keepdim=True) + 1e-3  # [1, d]
        offset = (x - x[best].unsqueeze(0)) / spread  # [K, d]
        z = (losses_d - losses_d.mean()) / (losses_d.std() + 1e-8)  # [K]
        is_best = torch.zeros(k, dtype=x.dtype, device=x.device)
        is_best[best] = 1.0
        member = torch.stack([z, is_best], dim=-1).unsqueeze(1).expand(k, d, 2)  # [K, d, 2]
        feats = torch.cat(
            [preprocess_gradient(grad), normalised.unsqueeze(-1), m.unsqueeze(-1), offset.unsqueeze(-1), member],
            dim=-1,
        )  # [K, d, 7]

        tokens = self.in_proj(feats.transpose(0, 1))  # [d, K, D]: one attention batch per coordinate
        pos = (x * c.position_scale).unsqueeze(0).expand(d, k, d)  # [d(batch), K, d(space)]
        h = tokens
        for block in self.blocks:
            h = block(h, pos, None)
        direction, log_scale = self.head(self.norm(h)).transpose(0, 1).unbind(-1)  # [K, d] each
        update = c.output_scale * direction
        if self.use_nominal:
            update = update - torch.exp(self.log_lr + c.log_lr_range * torch.tanh(log_scale)) * normalised
        return update, {"step": step, "v": v, "m": m}

    def extra_repr(self) -> str:
        c = self.config
        return f"dim={c.dim}, population={c.population}, mode={c.mode!r}, rpe={c.rpe!r}"
