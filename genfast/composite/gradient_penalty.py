"""The WGAN-GP penalty as it is usually written: x̂ = α·real + (1−α)·fake, g = autograd.grad(critic(x̂), x̂),
p = weight·mean_b(‖g_b‖₂ − 1)²."""
from __future__ import annotations

import math

import torch

from .._rng import draw
from .._shared import compute_dtype, penalty_scale


def gradient_penalty(critic, real, fake, *, weight=10.0, alpha=None, generator=None):
    batch = real.shape[0]
    if alpha is None:
        alpha = draw(torch.rand, batch, dtype=real.dtype, device=real.device, generator=generator)
    a = alpha.to(real.dtype).view(-1, *([1] * (real.dim() - 1)))
    x_hat = a * real + (1 - a) * fake.to(real.dtype)
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        if not x_hat.requires_grad:
            x_hat.requires_grad_(True)
        scores = critic(x_hat)
        (g,) = torch.autograd.grad(scores, x_hat, torch.ones_like(scores), create_graph=create_graph)
    norms = torch.linalg.vector_norm(g.reshape(batch, math.prod(g.shape[1:])), dim=1, dtype=compute_dtype(g))
    return (norms - 1).pow(2).sum() * penalty_scale(weight, batch)
