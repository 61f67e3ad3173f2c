"""Coordinate-wise learned optimisers: features -> memory -> head -> update.

Per coordinate i and step t (Andrychowicz et al. 2016; Metz et al. 2020; Jain et al. 2023):

- features ``x_t = [pre(g_t), g_t / (sqrt(v_hat_t) + eps), tanh(t / tau_1), ..., tanh(t / tau_J)]``
  where ``pre`` is the log-magnitude / sign preprocessing of :func:`preprocess_gradient`, ``v`` the
  RMS moving average of ``g^2`` and the optional time features (``time_scales`` tau_j, as in Metz et
  al. 2020) tell the rule how far the run is, so it can learn a schedule: a windowed attention memory
  otherwise cannot tell step 40 from step 400;
- memory ``h_t = M(x_1..x_t)`` (:mod:`flt_mol.optim.memory`: FLT, Performer, exact or LSTM);
- head ``(d_t, s_t) = head(h_t)`` and update
  ``delta_t = -exp(log_lr + r tanh(s_t)) g_t / (sqrt(v_hat_t) + eps) + output_scale * d_t``.

The first term is an RMSprop step whose per-coordinate rate the memory can scale by up to
``exp(+-r)`` (``r = log_lr_range``; a bounded magnitude output in the style of Metz et al. 2019),
the second a free direction term. The head's last layer starts near zero, so an untrained rule
already behaves like RMSprop (a known-good initialisation) and meta-training learns how the
history should modulate it. :class:`LearnedUpdateRule` is the differentiable rule used in
meta-training; :class:`LearnedOptimizer` wraps it as a ``torch.optim.Optimizer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from flt_mol.optim.memory import ATTENTION_MODES, TEMPORAL_RPES, AttentionMemory, LSTMMemory, OptimizerMemory

__all__ = [
    "preprocess_gradient",
    "MemoryConfig",
    "LearnedOptimizerConfig",
    "build_memory",
    "LearnedUpdateRule",
    "LearnedOptimizer",
    "MEMORY_KINDS",
]

MEMORY_KINDS = ("flt", "performer", "exact", "lstm")


def preprocess_gradient(grad: torch.Tensor, *, p: float = 10.0) -> torch.Tensor:
    """Log-magnitude / sign preprocessing (Andrychowicz et al. 2016, appendix A).

    ``pre(g) = (log|g| / p, sign g)`` if ``|g| >= exp(-p)``, else ``(-1, exp(p) g)``.
    Both outputs lie in a range of order one whatever the gradient's scale.

    Shapes: ``grad [...]`` -> ``[..., 2]``.
    """
    threshold = math.exp(-p)
    big = grad.abs() >= threshold
    # clamp before the log so the unused branch of torch.where never produces -inf (NaN gradients)
    log_mag = torch.log(grad.abs().clamp_min(threshold)) / p
    first = torch.where(big, log_mag, torch.full_like(grad, -1.0))
    second = torch.where(big, torch.sign(grad), grad * math.exp(p))
    return torch.stack([first, second], dim=-1)


@dataclass
class MemoryConfig:
    """Which memory and its sizes.

    Attributes:
        kind: ``flt`` | ``performer`` | ``exact`` (attention over the step index) or ``lstm``.
        rpe: temporal RPE for ``flt`` / ``exact``: ``local`` or ``gaussian_mixture``; None for
            ``performer`` and ``lstm``.
        hidden_dim, num_layers, num_heads, ffn_dim: sizes (heads/ffn only for attention).
        window: bounded context W of the attention memory (steps kept).
        num_rpe_terms, num_rpe_features, num_kernel_features: RPE terms T, RPE features r, FAVOR+ m.
        position_scale: multiplies step offsets before the RPE.
    """

    kind: str = "flt"
    rpe: str | None = "local"
    hidden_dim: int = 16
    num_layers: int = 1
    num_heads: int = 2
    ffn_dim: int = 32
    window: int = 32
    num_rpe_terms: int = 2
    num_rpe_features: int = 8
    num_kernel_features: int = 16
    position_scale: float = 1.0

    def __post_init__(self):
        if self.kind not in MEMORY_KINDS:
            raise ValueError(f"MemoryConfig.kind must be one of {MEMORY_KINDS}, got {self.kind!r}")
        if self.kind in ("performer", "lstm") and self.rpe is not None:
            raise ValueError(f"MemoryConfig: kind={self.kind!r} takes no RPE; set rpe: null")
        if self.kind in ("flt", "exact") and self.rpe not in TEMPORAL_RPES:
            raise ValueError(f"MemoryConfig: kind={self.kind!r} needs rpe in {TEMPORAL_RPES}, got {self.rpe!r}")
        for name in ("hidden_dim", "num_layers", "num_heads", "ffn_dim", "window", "num_rpe_terms",
                     "num_rpe_features", "num_kernel_features"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MemoryConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.rpe == "local" and self.position_scale != 1.0:
            raise ValueError(
                "MemoryConfig: the local (lattice) RPE needs integer step offsets, so position_scale must be "
                f"1.0, got {self.position_scale}"
            )
        if not self.position_scale > 0:
            raise ValueError(f"MemoryConfig.position_scale must be > 0, got {self.position_scale}")


@dataclass
class LearnedOptimizerConfig:
    """The learned update rule.

    Attributes:
        memory: the sequence memory (:class:`MemoryConfig`).
        head_hidden: hidden width of the update head MLP.
        nominal_lr: initial rate of the RMSprop term (learnable through its log); 0 disables the term.
        rms_beta: decay of the ``g^2`` moving average.
        output_scale: scale of the head's direction output ``d`` in the update.
        log_lr_range: r, bound on the memory's log step-size multiplier ``r tanh(s)`` (0 disables it).
        preprocess_p: ``p`` of :func:`preprocess_gradient`.
        time_scales: tau_j of the time features ``tanh(t / tau_j)`` (empty: none).
    """

    memory: MemoryConfig = field(default_factory=MemoryConfig)
    head_hidden: int = 16
    nominal_lr: float = 1e-2
    rms_beta: float = 0.95
    output_scale: float = 1e-2
    log_lr_range: float = 3.0
    preprocess_p: float = 10.0
    time_scales: list[float] = field(default_factory=list)

    def __post_init__(self):
        self.time_scales = [float(tau) for tau in self.time_scales]
        if any(not tau > 0 for tau in self.time_scales):
            raise ValueError(f"LearnedOptimizerConfig.time_scales must all be > 0, got {self.time_scales}")
        if isinstance(self.memory, dict):
            self.memory = MemoryConfig(**self.memory)
        if self.nominal_lr < 0:
            raise ValueError(f"LearnedOptimizerConfig.nominal_lr must be >= 0, got {self.nominal_lr}")
        if not 0.0 < self.rms_beta < 1.0:
            raise ValueError(f"LearnedOptimizerConfig.rms_beta must be in (0, 1), got {self.rms_beta}")
        if not self.output_scale > 0:
            raise ValueError(f"LearnedOptimizerConfig.output_scale must be > 0, got {self.output_scale}")
        if self.log_lr_range < 0:
            raise ValueError(f"LearnedOptimizerConfig.log_lr_range must be >= 0, got {self.log_lr_range}")
        if self.head_hidden < 1:
            raise ValueError(f"LearnedOptimizerConfig.head_hidden must be >= 1, got {self.head_hidden}")
        if not self.preprocess_p > 0:
            raise ValueError(f"LearnedOptimizerConfig.preprocess_p must be > 0, got {self.preprocess_p}")


def build_memory(config: MemoryConfig, input_dim: int) -> OptimizerMemory:
    """Construct the memory named by ``config.kind`` (explicit dispatch, no registry)."""
    if config.kind == "lstm":
        return LSTMMemory(input_dim, config.hidden_dim, num_layers=config.num_layers)
    if config.kind in ATTENTION_MODES:
        return AttentionMemory(
            input_dim,
            config.hidden_dim,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            ffn_dim=config.ffn_dim,
            window=config.window,
            mode=config.kind,
            rpe=config.rpe,
            num_rpe_terms=config.num_rpe_terms,
            num_rpe_features=config.num_rpe_features,
            num_kernel_features=config.num_kernel_features,
            position_scale=config.position_scale,
        )
    raise ValueError(f"unknown memory kind {config.kind!r}; expected one of {MEMORY_KINDS}")


class LearnedUpdateRule(nn.Module):
    """The differentiable learned update ``(g_t, state) -> (delta_t, state)`` (see module docstring).

    Args:
        config: :class:`LearnedOptimizerConfig`.

    Shapes: ``forward(grad [N], state) -> (update [N], state)``; the state is a dict with
    ``step []``, ``v [N]`` and ``memory`` (the memory's own state dict of tensors).
    """

    eps = 1e-8

    def __init__(self, config: LearnedOptimizerConfig):
        super().__init__()
        self.config = config
        self.num_features = 3 + len(config.time_scales)
        self.memory = build_memory(config.memory, self.num_features)
        self.head = nn.Sequential(
            nn.Linear(config.memory.hidden_dim, config.head_hidden), nn.GELU(), nn.Linear(config.head_hidden, 2)
        )  # outputs (direction d, log step-size multiplier s)
        self.use_nominal = config.nominal_lr > 0
        self.log_lr = nn.Parameter(torch.tensor(math.log(config.nominal_lr) if self.use_nominal else 0.0),
                                   requires_grad=self.use_nominal)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.memory.reset_parameters()
        self.head[0].reset_parameters()
        # small (not zero) last layer: the rule starts as RMSprop, yet every parameter gets a
        # meta-gradient from the first iteration
        nn.init.normal_(self.head[2].weight, std=1e-2)
        nn.init.zeros_(self.head[2].bias)
        with torch.no_grad():
            self.log_lr.fill_(math.log(self.config.nominal_lr) if self.use_nominal else 0.0)

    def initial_state(self, num_coords: int, *, device=None, dtype=None) -> dict:
        return {
            "step": torch.zeros((), device=device, dtype=torch.float32),
            "v": torch.zeros(num_coords, device=device, dtype=dtype),
            "memory": self.memory.initial_state(num_coords, device=device, dtype=dtype),
        }

    def features(self, grad: torch.Tensor, normalised: torch.Tensor, step: torch.Tensor | None = None) -> torch.Tensor:
        """``[pre(g), g / rms, tanh(step / tau_j)...]`` -> ``[N, num_features]`` (``step``: 1 at the first step)."""
        parts = [preprocess_gradient(grad, p=self.config.preprocess_p), normalised.unsqueeze(-1)]
        if self.config.time_scales:
            if step is None:
                raise ValueError("LearnedUpdateRule.features: this rule has time features, pass step")
            taus = torch.tensor(self.config.time_scales, dtype=grad.dtype, device=grad.device)  # [J]
            parts.append(torch.tanh(step.to(grad.dtype) / taus).expand(grad.shape[0], -1))  # [N, J]
        return torch.cat(parts, dim=-1)

    def forward(self, grad: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        if grad.dim() != 1:
            raise ValueError(f"LearnedUpdateRule: grad must be a flat [N] tensor, got shape {tuple(grad.shape)}")
        if state["v"].shape != grad.shape:
            raise ValueError(
                f"LearnedUpdateRule: state was made for {state['v'].numel()} coordinates, got a gradient of {grad.numel()}"
            )
        beta = self.config.rms_beta
        step = state["step"] + 1
        v = beta * state["v"] + (1.0 - beta) * grad.square()  # [N]
        v_hat = v / (1.0 - beta ** step.to(v.dtype))
        normalised = grad / (v_hat.sqrt() + self.eps)  # [N], |.| <= 1/sqrt(1-beta)
        h, memory_state = self.memory.step(self.features(grad, normalised, step), state["memory"])  # [N, D]
        direction, log_scale = self.head(h).unbind(-1)  # [N], [N]
        update = self.config.output_scale * direction
        if self.use_nominal:
            rate = torch.exp(self.log_lr + self.config.log_lr_range * torch.tanh(log_scale))  # [N]
            update = update - rate * normalised
        return update, {"step": step, "v": v, "memory": memory_state}

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"nominal_lr={c.nominal_lr}, rms_beta={c.rms_beta}, output_scale={c.output_scale}, "
            f"log_lr_range={c.log_lr_range}"
        )


class LearnedOptimizer(torch.optim.Optimizer):
    """A meta-trained :class:`LearnedUpdateRule` used as a ``torch.optim.Optimizer``.

    Each parameter tensor is flattened into coordinates; its per-coordinate history (RMS average
    and memory state, e.g. the attention window) is kept in ``self.state[p]`` so
    ``state_dict()`` / ``load_state_dict()`` resume a run exactly. The rule's own weights are not
    part of the optimiser state: load them from the meta-training checkpoint
    (:func:`flt_mol.optim.meta.load_rule`).

    Args:
        params: iterable of parameters or param groups.
        rule: the update rule (put in eval mode; no gradients are taken through it here).
    """

    def __init__(self, params, rule: LearnedUpdateRule):
        if not isinstance(rule, LearnedUpdateRule):
            raise TypeError(f"LearnedOptimizer: rule must be a LearnedUpdateRule, got {type(rule).__name__}")
        super().__init__(params, {})
        self.rule = rule

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state.update(self.rule.initial_state(p.numel(), device=p.device, dtype=p.dtype))
                update, new_state = self.rule(p.grad.reshape(-1), dict(state))
                p.add_(update.view_as(p))
                state.update(new_state)
        return loss
