"""The VAE ops in plain PyTorch: z = μ + exp(½·logvar)·ε with ε = torch.randn, and
kl_b = ½·Σ(μ² + e^logvar − 1 − logvar)."""
from __future__ import annotations

import math

import torch

from .._rng import draw
from .._shared import compute_dtype


def normal_like(x, generator=None):
    """torch.randn_like(x), from ``generator`` when given."""
    if generator is None:
        return torch.randn_like(x)
    return draw(torch.randn, x.shape, dtype=x.dtype, device=x.device, generator=generator)


def reparameterize(mu, logvar, noise=None, *, generator=None):
    return mu + torch.exp(0.5 * logvar) * (normal_like(mu, generator) if noise is None else noise.to(mu.dtype))


def gaussian_kl(mu, logvar):
    terms = mu.pow(2) + logvar.exp() - 1 - logvar
    return 0.5 * terms.reshape(mu.shape[0], math.prod(mu.shape[1:])).sum(1, dtype=compute_dtype(mu))


def reparameterize_kl(mu, logvar, noise=None, *, generator=None):
    return reparameterize(mu, logvar, noise, generator=generator), gaussian_kl(mu, logvar)
