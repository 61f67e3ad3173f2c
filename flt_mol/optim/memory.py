"""Memories for coordinate-wise learned optimisers.

A memory reads, for every coordinate independently (coordinates are the batch), the sequence of
per-step input features ``x_1, x_2, ...`` of an optimisation run and emits a hidden vector
``h_t = M(x_1..x_t)`` per step. All memories share one interface:

- ``initial_state(num_coords, device=, dtype=) -> dict[str, Tensor]``
- ``step(x[N, F], state) -> (h[N, D], state)``      one optimisation step (online use)
- ``forward(x[N, T, F]) -> h[N, T, D]``              ``step`` applied T times (the reference)

so ``h_t`` can never depend on ``x_s`` for ``s > t``: the online path only ever holds the past.

:class:`LSTMMemory` is the Andrychowicz et al. (2016) baseline. :class:`AttentionMemory` is the
Mnemosyne-style (Jain et al. 2023) transformer memory: causal attention over the step index with
an RPE on the 1D step positions (FLT with local or Gaussian-mixture RPE), or a regular Performer
(no RPE), or exact softmax (the O(W^2) reference).

**Bounded window.** The attention memory keeps the last ``window`` input vectors and re-encodes
them at every step (positions relative to the current step, ``pos_j = (j - t) * position_scale``),
so a step costs O(window) per coordinate with linear attention and memory is O(window) per
coordinate; context older than ``window`` steps is dropped. The paper's contexts reach 2,000 steps;
the CPU recipes here use windows of 16-64.

Einsum legend: n coordinates, t steps, w window positions, f input features, d hidden width.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OptimizerMemory", "LSTMMemory", "AttentionMemory", "ATTENTION_MODES", "TEMPORAL_RPES"]

ATTENTION_MODES = ("flt", "performer", "exact")
TEMPORAL_RPES = ("local", "gaussian_mixture")


class OptimizerMemory(nn.Module):
    """Interface of a per-coordinate sequence memory (see module docstring)."""

    input_dim: int
    hidden_dim: int

    def initial_state(
        self, num_coords: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def step(self, x: torch.Tensor, state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reference: run :meth:`step` over ``x [N, T, F]``; returns ``[N, T, D]``."""
        if x.dim() != 3 or x.shape[-1] != self.input_dim:
            raise ValueError(f"{type(self).__name__}.forward: x must be [N, T, {self.input_dim}], got {tuple(x.shape)}")
        state = self.initial_state(x.shape[0], device=x.device, dtype=x.dtype)
        outputs = []
        for t in range(x.shape[1]):
            h, state = self.step(x[:, t], state)
            outputs.append(h)
        return torch.stack(outputs, dim=1)

    def _check_step_input(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[-1] != self.input_dim:
            raise ValueError(f"{type(self).__name__}.step: x must be [N, {self.input_dim}], got {tuple(x.shape)}")


class LSTMMemory(OptimizerMemory):
    """Stacked LSTM over the step index (Andrychowicz et al. 2016), one cell state per coordinate.

    Args:
        input_dim: F, features per coordinate and step.
        hidden_dim: D.
        num_layers: stacked LSTM layers.

    Shapes: ``step(x [N, F]) -> h [N, D]``; state ``h, c [num_layers, N, D]``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, *, num_layers: int = 1):
        super().__init__()
        if input_dim < 1 or hidden_dim < 1 or num_layers < 1:
            raise ValueError(
                f"LSTMMemory: input_dim, hidden_dim, num_layers must be >= 1, got {input_dim}, {hidden_dim}, {num_layers}"
            )
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.lstm = nn.LSTM(input_dim, hidden_dim, num_layers=num_layers, batch_first=True)

    def reset_parameters(self) -> None:
        self.lstm.reset_parameters()

    def initial_state(self, num_coords, *, device=None, dtype=None):
        shape = (self.num_layers, num_coords, self.hidden_dim)
        return {"h": torch.zeros(shape, device=device, dtype=dtype), "c": torch.zeros(shape, device=device, dtype=dtype)}

    def step(self, x, state):
        self._check_step_input(x)
        out, (h, c) = self.lstm(x.unsqueeze(1), (state["h"], state["c"]))  # out [N, 1, D]
        return out.squeeze(1), {"h": h, "c": c}

    def extra_repr(self) -> str:
        return f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, num_layers={self.num_layers}"


def build_temporal_rpe(kind: str, *, num_heads: int, num_terms: int) -> nn.Module:
    """An RPE family on 1D step positions: ``local`` (box mask on integer steps) or ``gaussian_mixture``."""
    from flt_mol.attention import GaussianMixtureRPE, LocalRPE

    if kind == "local":
        return LocalRPE(num_heads, num_terms, 1, lattice=True)
    if kind == "gaussian_mixture":
        return GaussianMixtureRPE(num_heads, num_terms, 1)
    raise ValueError(f"temporal rpe must be one of {TEMPORAL_RPES}, got {kind!r}")


class AttentionMemory(OptimizerMemory):
    """Causal transformer memory over the last ``window`` steps (FLT, Performer or exact attention).

    ``h_t = LN(Blocks(W_in x_{t-w+1..t}, pos))[last]`` with pre-LN
    :class:`~flt_mol.models.blocks.TransformerBlock` layers around
    :class:`~flt_mol.attention.FLTAttention` (``causal=True``) and positions
    ``pos_j = (j - t) * position_scale`` (steps relative to the current one, ``<= 0``).

    Args:
        input_dim: F.
        hidden_dim: D (model width).
        num_layers, num_heads, ffn_dim: transformer sizes.
        window: W, number of most recent steps kept (bounded context; see module docstring).
        mode: ``flt`` (RPE-masked linear attention), ``performer`` (no RPE), ``exact`` (softmax
            with the exact RPE mask, O(W^2): the reference).
        rpe: temporal RPE family for ``flt``/``exact``: ``local`` or ``gaussian_mixture``; must be
            None for ``performer``.
        num_rpe_terms: terms T of the local RPE / modes of the Gaussian mixture.
        num_rpe_features, num_kernel_features: random features r (RPE) and m (FAVOR+).
        position_scale: multiplies the step offsets (use 1 for the lattice local RPE, whose box
            widths are in steps).

    Shapes: ``step(x [N, F]) -> h [N, D]``; state ``window [N, w, F]`` with ``w <= W``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        *,
        num_layers: int = 1,
        num_heads: int = 2,
        ffn_dim: int | None = None,
        window: int = 32,
        mode: str = "flt",
        rpe: str | None = "local",
        num_rpe_terms: int = 2,
        num_rpe_features: int = 8,
        num_kernel_features: int = 16,
        position_scale: float = 1.0,
    ):
        super().__init__()
        if mode not in ATTENTION_MODES:
            raise ValueError(f"AttentionMemory: mode must be one of {ATTENTION_MODES}, got {mode!r}")
        if mode == "performer" and rpe is not None:
            raise ValueError("AttentionMemory: mode='performer' has no RPE mask; set rpe=None (or use mode='flt')")
        if mode != "performer" and rpe not in TEMPORAL_RPES:
            raise ValueError(f"AttentionMemory: mode={mode!r} needs rpe in {TEMPORAL_RPES}, got {rpe!r}")
        if window < 1:
            raise ValueError(f"AttentionMemory: window must be >= 1, got {window}")
        if hidden_dim < 1 or num_layers < 1 or num_heads < 1 or hidden_dim % num_heads != 0:
            raise ValueError(
                f"AttentionMemory: need hidden_dim, num_layers, num_heads >= 1 and hidden_dim divisible by "
                f"num_heads, got hidden_dim={hidden_dim}, num_layers={num_layers}, num_heads={num_heads}"
            )
        if not position_scale > 0:
            raise ValueError(f"AttentionMemory: position_scale must be > 0, got {position_scale}")
        from flt_mol.attention import FLTAttention
        from flt_mol.models.blocks import TransformerBlock

        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.window = window
        self.mode = mode
        self.rpe_kind = rpe
        self.position_scale = float(position_scale)
        self.in_proj = nn.Linear(input_dim, hidden_dim)
        blocks = []
        for _ in range(num_layers):
            rpe_module = None if rpe is None else build_temporal_rpe(rpe, num_heads=num_heads, num_terms=num_rpe_terms)
            attention = FLTAttention(
                hidden_dim,
                num_heads,
                rpe=rpe_module,
                mode=mode,
                num_rpe_features=num_rpe_features,
                num_kernel_features=num_kernel_features,
                causal=True,
            )
            blocks.append(TransformerBlock(hidden_dim, attention, ffn_dim if ffn_dim is not None else 2 * hidden_dim))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(hidden_dim)

    def reset_parameters(self) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def redraw_features(self) -> None:
        """Redraw the random features of every attention layer (explicit; never done in step)."""
        for block in self.blocks:
            block.attention.redraw_features()

    def initial_state(self, num_coords, *, device=None, dtype=None):
        return {"window": torch.zeros(num_coords, 0, self.input_dim, device=device, dtype=dtype)}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Causal encoding of a window ``x [N, w, F]`` whose last entry is the current step -> ``[N, w, D]``."""
        n, w, _ = x.shape
        pos = (torch.arange(w, device=x.device, dtype=x.dtype) - (w - 1)) * self.position_scale  # [w], <= 0
        pos = pos.view(1, w, 1).expand(n, w, 1)  # [N, w, 1]
        h = self.in_proj(x)  # [N, w, D]
        for block in self.blocks:
            h = block(h, pos, None)
        return self.norm(h)

    def step(self, x, state):
        self._check_step_input(x)
        window = torch.cat([state["window"], x.unsqueeze(1)], dim=1)[:, -self.window :]  # [N, w, F]
        h = self.encode(window)[:, -1]  # [N, D]: the current step's output
        return h, {"window": window}

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, window={self.window}, mode={self.mode!r}, "
            f"rpe={self.rpe_kind!r}, position_scale={self.position_scale}"
        )
