"""Reference diffusion ops: forward noising, the DDPM and DDIM sampler steps, and the ε-prediction MSE.

q_sample, ddpm_step and ddim_step are per-sample affine maps out = a_b·x + b_b·y + c_b·ε (x the sample being
noised or denoised, y the model's ε̂, ε the noise). The coefficients are combined in float64 from the schedule's
float64 tables at the sample's timestep (as the kernels do), then cast to the compute dtype: fp32, fp64 for fp64
inputs. Outputs in the input dtype. ε is ``noise`` when given, else ``noise_like(x, seed)``; with neither the
noise term is absent.
"""
from __future__ import annotations

import torch

from .random import noise_like
from .._shared import compute_dtype


def q_sample_coefficients(t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """(a, c) of x_t = a·x_0 + c·ε: a = √ᾱ_t, c = √(1−ᾱ_t)."""
    return sqrt_alphas_cumprod[t], sqrt_one_minus_alphas_cumprod[t]


def ddpm_coefficients(t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, posterior_mean_coef1,
                      posterior_mean_coef2, posterior_variance):
    """(a, b, c) of x_{t−1} = a·x_t + b·ε̂ + c·z = c1·x̂_0 + c2·x_t + √β̃_t·z with x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t:
    a = c2 + c1/√ᾱ_t, b = −c1·√(1−ᾱ_t)/√ᾱ_t, c = √β̃_t (0 at t = 0)."""
    sqrt_ac, coef1 = sqrt_alphas_cumprod[t], posterior_mean_coef1[t]
    a = posterior_mean_coef2[t] + coef1 / sqrt_ac
    b = -coef1 * sqrt_one_minus_alphas_cumprod[t] / sqrt_ac
    return a, b, torch.sqrt(posterior_variance[t])


def ddim_coefficients(t, t_prev, eta, alphas_cumprod, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """(a, b, σ) of x_prev = √ᾱ_p·x̂_0 + √(1−ᾱ_p−σ²)·ε̂ + σ·z with x̂_0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t and
    σ = η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_p), ᾱ_p = ᾱ_{t_prev} (1 when t_prev < 0):
    a = √ᾱ_p/√ᾱ_t, b = √(1−ᾱ_p−σ²) − a·√(1−ᾱ_t). σ is exactly 0 for η = 0, also when t_prev > t (inversion)."""
    has_prev = t_prev >= 0
    prev = t_prev.clamp(min=0)
    ac = alphas_cumprod[t]
    ac_prev = torch.where(has_prev, alphas_cumprod[prev], 1.0)
    sqrt_ac_prev = torch.where(has_prev, sqrt_alphas_cumprod[prev], 1.0)
    variance = (1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)
    sigma = eta * torch.sqrt(variance) if eta > 0 else torch.zeros_like(ac)
    a = sqrt_ac_prev / sqrt_alphas_cumprod[t]
    b = torch.sqrt(1.0 - ac_prev - sigma * sigma) - a * sqrt_one_minus_alphas_cumprod[t]
    return a, b, sigma


def _per_sample(coef, x, dtype):
    """A (B,) float64 coefficient as a (B, 1, ..., 1) tensor of ``dtype`` that broadcasts against ``x``."""
    return coef.to(dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def affine(x, y, noise, seed, a, b, c):
    """a·x + b·y + c·ε in the compute dtype, returned in x's dtype; ``y`` (and ``b``) may be None."""
    dtype = compute_dtype(x)
    out = _per_sample(a, x, dtype) * x.to(dtype)
    if y is not None:
        out = out + _per_sample(b, x, dtype) * y.to(dtype)
    if noise is not None or seed is not None:
        eps = noise if noise is not None else noise_like(x, seed)
        out = out + _per_sample(c, x, dtype) * eps.to(dtype)
    return out.to(x.dtype)


def affine_backward(grad, a, b):
    """(dx, dy) = (a·g, b·g) of out = a·x + b·y + c·ε; dy is None when ``b`` is."""
    dtype = compute_dtype(grad)
    g = grad.to(dtype)
    grad_x = (_per_sample(a, grad, dtype) * g).to(grad.dtype)
    grad_y = None if b is None else (_per_sample(b, grad, dtype) * g).to(grad.dtype)
    return grad_x, grad_y


def q_sample(x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε."""
    a, c = q_sample_coefficients(t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    return affine(x0, None, noise, seed, a, None, c)


def q_sample_backward(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """dx_0 = √ᾱ_t·dx_t."""
    a, _ = q_sample_coefficients(t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    return affine_backward(grad, a, None)[0]


def ddpm_step(model_output, t, x_t, noise, seed, *tables):
    """x_{t−1} = a·x_t + b·ε̂ + c·z with (a, b, c) from :func:`ddpm_coefficients`; ``tables`` are its tables."""
    a, b, c = ddpm_coefficients(t, *tables)
    return affine(x_t, model_output, noise, seed, a, b, c)


def ddpm_step_backward(grad, t, *tables):
    """(dε̂, dx_t) = (b·g, a·g)."""
    a, b, _ = ddpm_coefficients(t, *tables)
    grad_x, grad_model_output = affine_backward(grad, a, b)
    return grad_model_output, grad_x


def ddim_step(model_output, t, t_prev, x_t, noise, seed, eta, *tables):
    """x_prev = a·x_t + b·ε̂ + σ·z with (a, b, σ) from :func:`ddim_coefficients`; ``tables`` are its tables."""
    a, b, sigma = ddim_coefficients(t, t_prev, eta, *tables)
    return affine(x_t, model_output, noise, seed, a, b, sigma)


def ddim_step_backward(grad, t, t_prev, eta, *tables):
    """(dε̂, dx_t) = (b·g, a·g)."""
    a, b, _ = ddim_coefficients(t, t_prev, eta, *tables)
    grad_x, grad_model_output = affine_backward(grad, a, b)
    return grad_model_output, grad_x


def noise_mse(eps_hat, seed):
    """mean((ε̂ − ε)²) with ε = noise_like(ε̂, seed): a 0-dim tensor, fp32 (fp64 for fp64 inputs)."""
    dtype = compute_dtype(eps_hat)
    diff = eps_hat.to(dtype) - noise_like(eps_hat, seed).to(dtype)
    return (diff * diff).sum() / eps_hat.numel()


def noise_mse_backward(grad_loss, eps_hat, seed):
    """dε̂ = 2(ε̂ − ε)/N·dloss."""
    dtype = compute_dtype(eps_hat)
    diff = eps_hat.to(dtype) - noise_like(eps_hat, seed).to(dtype)
    scale = 2.0 / max(eps_hat.numel(), 1)  # an empty ε̂ has an empty gradient
    return (grad_loss.to(dtype) * scale * diff).to(eps_hat.dtype)
