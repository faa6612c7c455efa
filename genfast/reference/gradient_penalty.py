"""Reference WGAN-GP ops: the interpolation x̂ = fake + α_b·(real − fake) and the penalty on the critic's gradient
g = ∇_x̂ critic(x̂), p = weight·mean_b(‖g_b‖₂ − 1)².

Math in fp32 (fp64 for fp64 inputs); x̂ and the input gradients in the input dtype; the penalty (a 0-dim tensor)
and the per-sample norms (B,) in fp32 (fp64 for fp64 inputs). An empty batch has penalty 0.
"""
from __future__ import annotations

import math

import torch

from .._shared import compute_dtype, penalty_scale


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The (B,) tensor ``v`` shaped (B, 1, ..., 1) to broadcast against ``like``."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def interpolate(real, fake, alpha):
    """x̂ = fake + α_b·(real − fake); ``alpha`` has shape (B,)."""
    dtype = compute_dtype(real)
    fake_c = fake.to(dtype)
    return (fake_c + _per_sample(alpha.to(dtype), real) * (real.to(dtype) - fake_c)).to(real.dtype)


def interpolate_backward(grad, alpha, want_real: bool, want_fake: bool):
    """(d real, d fake) = (α_b·g, (1 − α_b)·g); a gradient not wanted is an empty tensor."""
    dtype = compute_dtype(grad)
    grad_c = grad.to(dtype)
    alpha_c = _per_sample(alpha.to(dtype), grad)
    grad_real = (alpha_c * grad_c).to(grad.dtype) if want_real else grad.new_empty(0)
    grad_fake = ((1.0 - alpha_c) * grad_c).to(grad.dtype) if want_fake else grad.new_empty(0)
    return grad_real, grad_fake


def gradient_norm_penalty(grad, weight: float):
    """(p, norms): norms_b = ‖g_b‖₂ over all dims but the first and p = weight·mean_b(norms_b − 1)²."""
    batch = grad.shape[0]
    norms = grad.to(compute_dtype(grad)).reshape(batch, math.prod(grad.shape[1:])).square().sum(1).sqrt()
    return (norms - 1.0).square().sum() * penalty_scale(weight, batch), norms


def gradient_norm_penalty_backward(grad_penalty, grad, norms, weight: float):
    """dg_b = dp·weight·(2/B)·(‖g_b‖ − 1)·g_b/‖g_b‖, and 0 where ‖g_b‖ = 0 (torch.linalg.vector_norm's convention)."""
    dtype = compute_dtype(grad)
    inv_norms = torch.where(norms == 0, 0.0, 1.0 / norms)
    coef = grad_penalty.to(dtype) * (2.0 * penalty_scale(weight, grad.shape[0])) * (norms - 1.0) * inv_norms
    return (grad.to(dtype) * _per_sample(coef, grad)).to(grad.dtype)
