"""The diffusion ops in plain PyTorch, coefficients gathered from the schedule's float64 tables per sample:
q_sample x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, the loss F.mse_loss(model(x_t, t), ε), and the DDPM / DDIM steps."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._shared import compute_dtype
from .reparameterize import normal_like


def _per_sample(values, like):
    """The (B,) float64 ``values`` as a (B, 1, …) tensor in like's dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def q_sample(x0, t, schedule, noise=None, *, generator=None):
    noise = normal_like(x0, generator) if noise is None else noise.to(x0.dtype)
    return (_per_sample(schedule.sqrt_alphas_cumprod[t], x0) * x0
            + _per_sample(schedule.sqrt_one_minus_alphas_cumprod[t], x0) * noise)


def diffusion_loss(model, x0, schedule, *, t, generator=None):
    noise = normal_like(x0, generator)
    eps_hat = model(q_sample(x0, t, schedule, noise), t)
    return F.mse_loss(eps_hat, noise.to(eps_hat.dtype)).to(compute_dtype(eps_hat))


def ddpm_step(model_output, t, x_t, schedule, noise=None, *, generator=None):
    s = schedule
    x0_hat = (x_t - _per_sample(s.sqrt_one_minus_alphas_cumprod[t], x_t) * model_output) / _per_sample(
        s.sqrt_alphas_cumprod[t], x_t)
    mean = _per_sample(s.posterior_mean_coef1[t], x_t) * x0_hat + _per_sample(s.posterior_mean_coef2[t], x_t) * x_t
    noise = normal_like(x_t, generator) if noise is None else noise.to(x_t.dtype)
    return mean + _per_sample(s.posterior_variance[t].sqrt(), x_t) * noise


def ddim_step(model_output, t, t_prev, x_t, schedule, eta=0.0, noise=None, *, generator=None):
    if eta > 0:  # σ is NaN for t_prev > t; checked without reading the values back
        torch._assert_async((t_prev <= t).all(), "t_prev must be <= t for every sample when eta > 0")
    abar_t = schedule.alphas_cumprod[t]
    abar_p = torch.where(t_prev >= 0, schedule.alphas_cumprod[t_prev.clamp(min=0)], 1.0)
    sigma = eta * ((1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)).sqrt()
    x0_hat = (x_t - _per_sample((1 - abar_t).sqrt(), x_t) * model_output) / _per_sample(abar_t.sqrt(), x_t)
    direction = _per_sample((1 - abar_p - sigma**2).clamp(min=0).sqrt(), x_t) * model_output
    x_prev = _per_sample(abar_p.sqrt(), x_t) * x0_hat + direction
    if eta == 0:
        return x_prev
    noise = normal_like(x_t, generator) if noise is None else noise.to(x_t.dtype)
    return x_prev + _per_sample(sigma, x_t) * noise
