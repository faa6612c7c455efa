"""An exponential moving average of a model's weights, the copy that samples and evaluations use."""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """θ̄ ← d_t·θ̄ + (1 − d_t)·θ after every optimiser step, as one ``torch._foreach_lerp_`` over all parameters
    (θ̄ + (1 − d_t)·(θ − θ̄)); buffers (BatchNorm statistics) are copied. With ``warmup`` the decay after t earlier
    updates is d_t = min(decay, (1 + t)/(10 + t)) (0.1 at the first update, 0.9 after 80, 0.99 after 890), so early
    averages are not dominated by the random initial weights; without it d_t = decay.

    ``module`` is the averaged copy (eval mode, no gradients) of ``model``, built with ``copy.deepcopy``: the same
    device, dtype and memory format.

    Args (keyword-only): decay in (0, 1); warmup (default True)."""

    def __init__(self, model: nn.Module, *, decay: float, warmup: bool = True):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.model, self.decay, self.warmup = model, float(decay), bool(warmup)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0
        self._params = list(model.parameters())
        self._shadow = list(self.module.parameters())
        self._buffers = list(model.buffers())
        self._shadow_buffers = list(self.module.buffers())

    def decay_at(self, updates: int) -> float:
        """d_t after ``updates`` earlier updates."""
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Move the average towards the model's current weights and copy its buffers."""
        weight = 1.0 - self.decay_at(self.updates)
        torch._foreach_lerp_(self._shadow, self._params, weight)
        if self._buffers:
            torch._foreach_copy_(self._shadow_buffers, self._buffers)
        self.updates += 1

    def state_dict(self) -> dict:
        return dict(module=self.module.state_dict(), updates=self.updates, decay=self.decay, warmup=self.warmup)

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])
