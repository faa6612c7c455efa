"""Reference diffusion ops: forward noising, the DDPM and DDIM sampler steps with diffusers' handling of x̂₀
(three prediction types, clipping, dynamic thresholding), the per-sample dynamic threshold, and the MSE of the
model output against its training target.

Notation: ᾱ_t the schedule's cumulative product at the sample's timestep t, y the model output, ε the noise, and
for a step from t to t_prev, ᾱ_p = ᾱ_{t_prev} (1 when t_prev < 0).

**x̂₀ and ε̂ from the model output**, by its prediction type (diffusers' ``prediction_type``):

    "epsilon"       y = ε̂                      x̂₀ = (x_t − √(1−ᾱ_t)·y)/√ᾱ_t    ε̂ = y
    "v_prediction"  y = √ᾱ_t·ε − √(1−ᾱ_t)·x₀     x̂₀ = √ᾱ_t·x_t − √(1−ᾱ_t)·y      ε̂ = √(1−ᾱ_t)·x_t + √ᾱ_t·y
    "sample"        y = x̂₀                      x̂₀ = y                          ε̂ = (x_t − √ᾱ_t·y)/√(1−ᾱ_t)

i.e. x̂₀ = P·x_t + Q·y and ε̂ = R·x_t + S·y (:func:`prediction_coefficients`).

**x̂₀ handling.** Clipping: x̂₀' = clamp(x̂₀, −r, r). Dynamic thresholding (Saharia et al. 2022): x̂₀' =
clamp(x̂₀, −s, s)/s with s per sample (:func:`dynamic_threshold`). Else x̂₀' = x̂₀.

**The steps** are x_prev = A·x_t + B·y + C·x̂₀' + σ·z with per-sample coefficients:

- DDPM, t → t_prev (t_prev = t − 1 unless given), β' = 1 − ᾱ_t/ᾱ_p: the posterior mean c1·x̂₀' + c2·x_t, so
  A = c2 = √(ᾱ_t/ᾱ_p)·(1−ᾱ_p)/(1−ᾱ_t), B = 0, C = c1 = √ᾱ_p·β'/(1−ᾱ_t); σ² = (1−ᾱ_p)/(1−ᾱ_t)·β'
  ("fixed_small", Ho et al.'s σ² = β̃) or β' ("fixed_large"), and σ = 0 at t = 0.
- DDIM (Song et al. 2021): σ = η·√((1−ᾱ_p)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_p) (exactly 0 for η = 0, also when t_prev > t:
  inversion), d = √(1−ᾱ_p−σ²), x_prev = √ᾱ_p·x̂₀' + d·ε̂' + σ·z where ε̂' = ε̂ (A = d·R, B = d·S, C = √ᾱ_p),
  or with ``use_clipped_model_output`` ε̂ recomputed from x̂₀': ε̂' = (x_t − √ᾱ_t·x̂₀')/√(1−ᾱ_t)
  (A = d/√(1−ᾱ_t), B = 0, C = √ᾱ_p − d·√ᾱ_t/√(1−ᾱ_t)).

Without clipping or thresholding a step is the affine map a·x_t + b·y + σ·z with a = A + C·P, b = B + C·Q, and
is computed so. Backward: dx_t = (A + C·m·P/s)·g and dy = (B + C·m·Q/s)·g, where m = 1 where |x̂₀| ≤ the bound
(r, or s) and 0 outside it — a clipped x̂₀ passes no gradient — and s = 1 when clipping; the threshold s is a
constant of the backward (as if computed under ``no_grad``).

q_sample is x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε. The training target of a prediction type is ε, v = √ᾱ_t·ε − √(1−ᾱ_t)·x₀
or x₀: target = u·ε + w·x₀ (:func:`target_coefficients`).

Coefficients are combined in float64 from the schedule's float64 tables at each sample's timestep (as the kernels
do), then cast to the compute dtype: fp32, fp64 for fp64 inputs. Outputs in the input dtype. ε is ``noise`` when
given, else ``noise_like(x, seed)``; with neither the noise term is absent.
"""
from __future__ import annotations

import torch

from .random import noise_like
from .._shared import PREDICTION_TYPES, VARIANCE_TYPES, compute_dtype, quantile_position


def _alphas(t, t_prev, alphas_cumprod, sqrt_alphas_cumprod):
    """(ᾱ_p, √ᾱ_p) at t_prev (1 for t_prev < 0); t_prev = t − 1 when None."""
    t_prev = t - 1 if t_prev is None else t_prev
    has_prev = t_prev >= 0
    prev = t_prev.clamp(min=0)
    return (torch.where(has_prev, alphas_cumprod[prev], 1.0), torch.where(has_prev, sqrt_alphas_cumprod[prev], 1.0))


def prediction_coefficients(prediction_type, sqrt_ac, sqrt_1m_ac):
    """(P, Q, R, S) of x̂₀ = P·x_t + Q·y and ε̂ = R·x_t + S·y (the table in the module docstring)."""
    one, zero = torch.ones_like(sqrt_ac), torch.zeros_like(sqrt_ac)
    if prediction_type == "epsilon":
        p = 1.0 / sqrt_ac
        return p, -sqrt_1m_ac * p, zero, one
    if prediction_type == "v_prediction":
        return sqrt_ac, -sqrt_1m_ac, sqrt_1m_ac, sqrt_ac
    if prediction_type == "sample":
        r = 1.0 / sqrt_1m_ac
        return zero, one, r, -sqrt_ac * r
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def target_coefficients(prediction_type, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """(u, w) of the training target u·ε + w·x₀: (1, 0) for ε, (√ᾱ_t, −√(1−ᾱ_t)) for v, (0, 1) for x₀."""
    sqrt_ac, sqrt_1m_ac = sqrt_alphas_cumprod[t], sqrt_one_minus_alphas_cumprod[t]
    one, zero = torch.ones_like(sqrt_ac), torch.zeros_like(sqrt_ac)
    if prediction_type == "epsilon":
        return one, zero
    if prediction_type == "v_prediction":
        return sqrt_ac, -sqrt_1m_ac
    if prediction_type == "sample":
        return zero, one
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def q_sample_coefficients(t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """(a, c) of x_t = a·x_0 + c·ε: a = √ᾱ_t, c = √(1−ᾱ_t)."""
    return sqrt_alphas_cumprod[t], sqrt_one_minus_alphas_cumprod[t]


def ddpm_coefficients(t, t_prev, prediction_type, variance_type, alphas_cumprod, sqrt_alphas_cumprod,
                      sqrt_one_minus_alphas_cumprod):
    """(P, Q, A, B, C, σ) of the DDPM step (module docstring), with α' = ᾱ_t/ᾱ_p: A = √α'·(1−ᾱ_p)/(1−ᾱ_t)."""
    ac, sqrt_ac, sqrt_1m_ac = alphas_cumprod[t], sqrt_alphas_cumprod[t], sqrt_one_minus_alphas_cumprod[t]
    ac_prev, sqrt_ac_prev = _alphas(t, t_prev, alphas_cumprod, sqrt_alphas_cumprod)
    p, q, _, _ = prediction_coefficients(prediction_type, sqrt_ac, sqrt_1m_ac)
    alpha = ac / ac_prev
    beta = 1.0 - alpha
    inv_one_minus = 1.0 / (sqrt_1m_ac * sqrt_1m_ac)
    coef1 = sqrt_ac_prev * beta * inv_one_minus
    coef2 = alpha.sqrt() * (1.0 - ac_prev) * inv_one_minus
    if variance_type == "fixed_small":
        variance = (1.0 - ac_prev) * inv_one_minus * beta
    elif variance_type == "fixed_large":
        variance = beta
    else:
        raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    sigma = torch.where(t > 0, variance.clamp(min=0.0).sqrt(), 0.0)
    return p, q, coef2, torch.zeros_like(coef2), coef1, sigma


def ddim_coefficients(t, t_prev, eta, prediction_type, use_clipped_model_output, alphas_cumprod,
                      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """(P, Q, A, B, C, σ) of the DDIM step (module docstring)."""
    ac, sqrt_ac, sqrt_1m_ac = alphas_cumprod[t], sqrt_alphas_cumprod[t], sqrt_one_minus_alphas_cumprod[t]
    ac_prev, sqrt_ac_prev = _alphas(t, t_prev, alphas_cumprod, sqrt_alphas_cumprod)
    p, q, r, s = prediction_coefficients(prediction_type, sqrt_ac, sqrt_1m_ac)
    variance = (1.0 - ac_prev) / (1.0 - ac) * (1.0 - ac / ac_prev)
    sigma = eta * torch.sqrt(variance) if eta > 0 else torch.zeros_like(ac)
    d = torch.sqrt(1.0 - ac_prev - sigma * sigma)
    if use_clipped_model_output:
        d_over = d / sqrt_1m_ac
        return p, q, d_over, torch.zeros_like(d), sqrt_ac_prev - d_over * sqrt_ac, sigma
    return p, q, d * r, d * s, sqrt_ac_prev, sigma


def _per_sample(coef, x, dtype):
    """A (B,) float64 coefficient as a (B, 1, ..., 1) tensor of ``dtype`` that broadcasts against ``x``."""
    return coef.to(dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def _noise(x, noise, seed, dtype):
    """ε in ``dtype``, or None when there is no noise term."""
    if noise is None and seed is None:
        return None
    return (noise if noise is not None else noise_like(x, seed)).to(dtype)


def affine(x, y, noise, seed, a, b, c):
    """a·x + b·y + c·ε in the compute dtype, returned in x's dtype; ``y`` (and ``b``) may be None."""
    dtype = compute_dtype(x)
    out = _per_sample(a, x, dtype) * x.to(dtype)
    if y is not None:
        out = out + _per_sample(b, x, dtype) * y.to(dtype)
    eps = _noise(x, noise, seed, dtype)
    if eps is not None:
        out = out + _per_sample(c, x, dtype) * eps
    return out.to(x.dtype)


def _x0_hat(x, y, p, q, dtype):
    """x̂₀ = P·x_t + Q·y in ``dtype``."""
    return _per_sample(p, x, dtype) * x.to(dtype) + _per_sample(q, x, dtype) * y.to(dtype)


def _bound(x, clip, threshold, dtype):
    """(bound, 1/scale) of the x̂₀ handling as (B, 1, ...) tensors: (r, 1) clipping, (s, 1/s) thresholding."""
    if threshold is not None:
        s = _per_sample(threshold, x, dtype)
        return s, 1.0 / s
    bound = torch.full((x.shape[0],) + (1,) * (x.dim() - 1), clip, dtype=dtype, device=x.device)
    return bound, torch.ones_like(bound)


def _step(x, y, noise, seed, coefficients, clip, threshold):
    """A·x_t + B·y + C·x̂₀' + σ·z (the affine map a·x_t + b·y + σ·z without clipping or thresholding)."""
    p, q, a, b, c, sigma = coefficients
    if clip is None and threshold is None:
        return affine(x, y, noise, seed, a + c * p, b + c * q, sigma)
    dtype = compute_dtype(x)
    bound, inv_scale = _bound(x, clip, threshold, dtype)
    x0 = torch.minimum(torch.maximum(_x0_hat(x, y, p, q, dtype), -bound), bound) * inv_scale
    out = _per_sample(a, x, dtype) * x.to(dtype) + _per_sample(b, x, dtype) * y.to(dtype)
    out = out + _per_sample(c, x, dtype) * x0
    eps = _noise(x, noise, seed, dtype)
    if eps is not None:
        out = out + _per_sample(sigma, x, dtype) * eps
    return out.to(x.dtype)


def _step_backward(grad, y, x, coefficients, clip, threshold):
    """(dy, dx_t) = ((B + C·m·Q/s)·g, (A + C·m·P/s)·g) (module docstring), in grad's dtype."""
    p, q, a, b, c, _ = coefficients
    dtype = compute_dtype(grad)
    g = grad.to(dtype)
    if clip is None and threshold is None:
        grad_x = _per_sample(a + c * p, grad, dtype) * g
        grad_y = _per_sample(b + c * q, grad, dtype) * g
        return grad_y.to(grad.dtype), grad_x.to(grad.dtype)
    bound, inv_scale = _bound(grad, clip, threshold, dtype)
    x0 = _x0_hat(x, y, p, q, dtype)
    passed = ((x0 >= -bound) & (x0 <= bound)).to(dtype) * inv_scale * _per_sample(c, grad, dtype) * g
    grad_x = _per_sample(a, grad, dtype) * g + _per_sample(p, grad, dtype) * passed
    grad_y = _per_sample(b, grad, dtype) * g + _per_sample(q, grad, dtype) * passed
    return grad_y.to(grad.dtype), grad_x.to(grad.dtype)


def affine_backward(grad, a):
    """dx = a·g of out = a·x + c·ε."""
    dtype = compute_dtype(grad)
    return (_per_sample(a, grad, dtype) * grad.to(dtype)).to(grad.dtype)


def q_sample(x0, t, noise, seed, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε."""
    a, c = q_sample_coefficients(t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    return affine(x0, None, noise, seed, a, None, c)


def q_sample_backward(grad, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod):
    """dx_0 = √ᾱ_t·dx_t."""
    a, _ = q_sample_coefficients(t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    return affine_backward(grad, a)


def dynamic_threshold(model_output, t, x_t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, prediction_type,
                      ratio, max_value):
    """s_b = min(max(quantile(|x̂₀_b|, ratio), 1), max_value) per sample (B,), in the compute dtype: the quantile
    of the D = numel/B values of sample b as torch.quantile computes it (linear interpolation between the order
    statistics at ⌊h⌋ and ⌈h⌉, h = ratio·(D − 1): :func:`genfast._shared.quantile_position`); 1 for D = 0."""
    dtype = compute_dtype(x_t)
    batch = x_t.shape[0]
    p, q, _, _ = prediction_coefficients(prediction_type, sqrt_alphas_cumprod[t], sqrt_one_minus_alphas_cumprod[t])
    flat = _x0_hat(x_t, model_output, p, q, dtype).abs().reshape(batch, -1)
    numel = flat.shape[1]
    if numel == 0:
        return torch.ones(batch, dtype=dtype, device=x_t.device)
    lo, hi, weight = quantile_position(numel, ratio, dtype)
    below = torch.kthvalue(flat, lo + 1, dim=1).values
    above = below if hi == lo else torch.kthvalue(flat, hi + 1, dim=1).values
    quantile = torch.lerp(below, above, weight)
    return quantile.clamp(min=1.0, max=max_value)  # min first, then max: max_value when it is below 1


def ddpm_step(model_output, t, t_prev, x_t, noise, seed, threshold, alphas_cumprod, sqrt_alphas_cumprod,
              sqrt_one_minus_alphas_cumprod, prediction_type, variance_type, clip):
    """x_prev = A·x_t + B·y + C·x̂₀' + σ·z with the coefficients of :func:`ddpm_coefficients`; x̂₀ clipped to
    [−clip, clip] (a float), thresholded by ``threshold`` (B,), or neither (both None)."""
    coefficients = ddpm_coefficients(t, t_prev, prediction_type, variance_type, alphas_cumprod, sqrt_alphas_cumprod,
                                     sqrt_one_minus_alphas_cumprod)
    return _step(x_t, model_output, noise, seed, coefficients, clip, threshold)


def ddpm_step_backward(grad, model_output, x_t, threshold, t, t_prev, alphas_cumprod, sqrt_alphas_cumprod,
                       sqrt_one_minus_alphas_cumprod, prediction_type, variance_type, clip):
    """(dy, dx_t) of :func:`ddpm_step`; ``model_output`` and ``x_t`` are needed (else None) with clip/threshold."""
    coefficients = ddpm_coefficients(t, t_prev, prediction_type, variance_type, alphas_cumprod, sqrt_alphas_cumprod,
                                     sqrt_one_minus_alphas_cumprod)
    return _step_backward(grad, model_output, x_t, coefficients, clip, threshold)


def ddim_step(model_output, t, t_prev, x_t, noise, seed, threshold, alphas_cumprod, sqrt_alphas_cumprod,
              sqrt_one_minus_alphas_cumprod, eta, prediction_type, use_clipped_model_output, clip):
    """x_prev = A·x_t + B·y + C·x̂₀' + σ·z with the coefficients of :func:`ddim_coefficients`; ``clip`` and
    ``threshold`` as in :func:`ddpm_step`."""
    coefficients = ddim_coefficients(t, t_prev, eta, prediction_type, use_clipped_model_output, alphas_cumprod,
                                     sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    return _step(x_t, model_output, noise, seed, coefficients, clip, threshold)


def ddim_step_backward(grad, model_output, x_t, threshold, t, t_prev, alphas_cumprod, sqrt_alphas_cumprod,
                       sqrt_one_minus_alphas_cumprod, eta, prediction_type, use_clipped_model_output, clip):
    """(dy, dx_t) of :func:`ddim_step`; ``model_output`` and ``x_t`` as in :func:`ddpm_step_backward`."""
    coefficients = ddim_coefficients(t, t_prev, eta, prediction_type, use_clipped_model_output, alphas_cumprod,
                                     sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
    return _step_backward(grad, model_output, x_t, coefficients, clip, threshold)


def _target_error(model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, prediction_type):
    """model_output − (u·ε + w·x₀) in the compute dtype."""
    dtype = compute_dtype(model_output)
    diff = model_output.to(dtype)
    if prediction_type != "sample":
        u, _ = target_coefficients(prediction_type, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
        diff = diff - _per_sample(u, model_output, dtype) * noise_like(model_output, seed).to(dtype)
    if prediction_type != "epsilon":
        _, w = target_coefficients(prediction_type, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod)
        diff = diff - _per_sample(w, model_output, dtype) * x0.to(dtype)
    return diff


def target_mse(model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, prediction_type):
    """mean((y − target)²) with target = u·ε + w·x₀ (:func:`target_coefficients`), ε = noise_like(y, seed): a
    0-dim tensor, fp32 (fp64 for fp64 inputs). ``x0`` is read for "v_prediction" and "sample" only."""
    diff = _target_error(model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                         prediction_type)
    return (diff * diff).sum() / model_output.numel()


def target_mse_backward(grad_loss, model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                        prediction_type):
    """dy = 2(y − target)/N·dloss (dx₀ = −w·dy, formed by the caller where x₀ needs it)."""
    dtype = compute_dtype(model_output)
    diff = _target_error(model_output, seed, x0, t, sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod,
                         prediction_type)
    scale = 2.0 / max(model_output.numel(), 1)  # an empty y has an empty gradient
    return (grad_loss.to(dtype) * scale * diff).to(model_output.dtype)
