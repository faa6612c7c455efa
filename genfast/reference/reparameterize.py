"""Reference VAE ops: reparameterization z = μ + exp(½·logvar)·ε and KL(N(μ, σ²) ‖ N(0, I)).

Math in fp32 (fp64 for fp64 inputs); z in the input dtype; kl of shape (B,) in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math

import torch

from .._shared import compute_dtype
from .random import noise_like


def _noise(mu, noise, seed, dtype):
    return (noise if noise is not None else noise_like(mu, seed)).to(dtype)


def reparameterize_kl(mu, logvar, noise, seed, want_z: bool, want_kl: bool):
    """(z, kl); an output not wanted is an empty tensor."""
    dtype = compute_dtype(mu)
    mu_c, logvar_c = mu.to(dtype), logvar.to(dtype)
    z = mu.new_empty(0)
    kl = mu.new_empty(0, dtype=dtype)
    if want_z:
        z = (mu_c + torch.exp(0.5 * logvar_c) * _noise(mu, noise, seed, dtype)).to(mu.dtype)
    if want_kl:
        terms = mu_c * mu_c + torch.exp(logvar_c) - 1.0 - logvar_c
        kl = 0.5 * terms.reshape(mu.shape[0], math.prod(mu.shape[1:])).sum(1)
    return z, kl


def reparameterize_kl_backward(grad_z, grad_kl, mu, logvar, noise, seed):
    """dμ = dz + dkl·μ and dlogvar = dz·ε·½σ + dkl·½(σ² − 1), with σ = exp(½·logvar); absent grads are None."""
    dtype = compute_dtype(mu)
    mu_c, logvar_c = mu.to(dtype), logvar.to(dtype)
    grad_mu = torch.zeros_like(mu_c)
    grad_logvar = torch.zeros_like(mu_c)
    if grad_z is not None:
        sigma = torch.exp(0.5 * logvar_c)
        dz = grad_z.to(dtype)
        grad_mu = grad_mu + dz
        grad_logvar = grad_logvar + dz * _noise(mu, noise, seed, dtype) * (0.5 * sigma)
    if grad_kl is not None:
        dkl = grad_kl.to(dtype).reshape((-1,) + (1,) * (mu.dim() - 1))
        grad_mu = grad_mu + dkl * mu_c
        grad_logvar = grad_logvar + dkl * (0.5 * (torch.exp(logvar_c) - 1.0))
    return grad_mu.to(mu.dtype), grad_logvar.to(logvar.dtype)
