"""The diffusion ops in plain PyTorch, as diffusers' schedulers and training scripts write them, coefficients
gathered from the schedule's float64 tables per sample: q_sample x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, the loss
F.mse_loss(model(x_t, t), target) and the DDPM / DDIM steps (x̂₀ from the prediction type, clipped or dynamically
thresholded with torch.quantile, then the posterior mean or the DDIM update)."""
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


def diffusion_loss(model, x0, schedule, *, t, prediction_type="epsilon", generator=None):
    noise = normal_like(x0, generator)
    output = model(q_sample(x0, t, schedule, noise), t)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = (_per_sample(schedule.sqrt_alphas_cumprod[t], x0) * noise
                  - _per_sample(schedule.sqrt_one_minus_alphas_cumprod[t], x0) * x0)
    else:
        target = x0
    return F.mse_loss(output, target.to(output.dtype)).to(compute_dtype(output))


def x0_and_eps(model_output, t, x_t, schedule, prediction_type):
    """(x̂₀, ε̂) from the model output, as diffusers' schedulers compute them."""
    sqrt_ac = _per_sample(schedule.sqrt_alphas_cumprod[t], x_t)
    sqrt_1m_ac = _per_sample(schedule.sqrt_one_minus_alphas_cumprod[t], x_t)
    if prediction_type == "epsilon":
        return (x_t - sqrt_1m_ac * model_output) / sqrt_ac, model_output
    if prediction_type == "v_prediction":
        return sqrt_ac * x_t - sqrt_1m_ac * model_output, sqrt_ac * model_output + sqrt_1m_ac * x_t
    return model_output, (x_t - sqrt_ac * model_output) / sqrt_1m_ac


def threshold_of(x0, ratio, max_value):
    """Dynamic thresholding's s per sample (B,): torch.quantile of |x̂₀| clamped to [1, max_value], in fp32 (fp64
    for fp64), from x̂₀ detached (a constant of the backward)."""
    flat = x0.detach().reshape(x0.shape[0], -1)
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    return torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)


def dynamic_threshold(model_output, t, x_t, schedule, prediction_type, ratio, max_value):
    return threshold_of(x0_and_eps(model_output, t, x_t, schedule, prediction_type)[0], ratio, max_value)


def handled_x0(x0, clip, s):
    """x̂₀ clamped to [−clip, clip], or thresholded by s (B,): clamp(x̂₀, −s, s)/s, or as it is."""
    if s is not None:
        s = s.view(-1, *([1] * (x0.dim() - 1)))
        return (torch.clamp(x0.to(s.dtype), -s, s) / s).to(x0.dtype)
    return x0 if clip is None else x0.clamp(-clip, clip)


def _handle_x0(x0, clip, threshold):
    """x̂₀ handled as a step asks: ``threshold`` = (ratio, max_value) of dynamic thresholding, or None."""
    return handled_x0(x0, clip, None if threshold is None else threshold_of(x0, *threshold))


def ddpm_step(model_output, t, t_prev, x_t, schedule, noise=None, *, prediction_type="epsilon",
              variance_type="fixed_small", clip=1.0, threshold=None, generator=None):
    s = schedule
    t_prev = t - 1 if t_prev is None else t_prev
    abar_t = s.alphas_cumprod[t]
    abar_p = torch.where(t_prev >= 0, s.alphas_cumprod[t_prev.clamp(min=0)], 1.0)
    beta = 1 - abar_t / abar_p
    x0_hat = _handle_x0(x0_and_eps(model_output, t, x_t, s, prediction_type)[0], clip, threshold)
    mean = (_per_sample(abar_p.sqrt() * beta / (1 - abar_t), x_t) * x0_hat
            + _per_sample((abar_t / abar_p).sqrt() * (1 - abar_p) / (1 - abar_t), x_t) * x_t)
    variance = (1 - abar_p) / (1 - abar_t) * beta if variance_type == "fixed_small" else beta
    sigma = torch.where(t > 0, variance.clamp(min=0).sqrt(), 0.0)
    noise = normal_like(x_t, generator) if noise is None else noise.to(x_t.dtype)
    return mean + _per_sample(sigma, x_t) * noise


def ddim_step(model_output, t, t_prev, x_t, schedule, eta=0.0, noise=None, *, prediction_type="epsilon",
              use_clipped_model_output=False, clip=1.0, threshold=None, generator=None):
    if eta > 0:  # σ is NaN for t_prev > t; checked without reading the values back
        torch._assert_async((t_prev <= t).all(), "t_prev must be <= t for every sample when eta > 0")
    abar_t = schedule.alphas_cumprod[t]
    abar_p = torch.where(t_prev >= 0, schedule.alphas_cumprod[t_prev.clamp(min=0)], 1.0)
    sigma = eta * ((1 - abar_p) / (1 - abar_t) * (1 - abar_t / abar_p)).sqrt()
    x0_hat, eps_hat = x0_and_eps(model_output, t, x_t, schedule, prediction_type)
    x0_hat = _handle_x0(x0_hat, clip, threshold)
    if use_clipped_model_output:
        eps_hat = ((x_t - _per_sample(abar_t.sqrt(), x_t) * x0_hat) / _per_sample((1 - abar_t).sqrt(), x_t))
    direction = _per_sample((1 - abar_p - sigma**2).clamp(min=0).sqrt(), x_t) * eps_hat
    x_prev = _per_sample(abar_p.sqrt(), x_t) * x0_hat + direction
    if eta == 0:
        return x_prev
    noise = normal_like(x_t, generator) if noise is None else noise.to(x_t.dtype)
    return x_prev + _per_sample(sigma, x_t) * noise
