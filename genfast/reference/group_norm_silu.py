"""Reference GroupNorm + SiLU with the DDPM time-embedding add and the ADM/EDM scale-shift, forward and backward.

For x of shape (B, C, *spatial) split into G groups of C/G channels, with (B, C) tensors add, scale, shift:

    h  = x + add                                  (add broadcast over space, before the norm)
    x̂  = (h − mean_g(h)) · rstd,   rstd = 1 / sqrt(var_g(h) + eps)   (biased variance over a group)
    m  = (x̂ · weight + bias) · (1 + scale) + shift
    y  = silu(m) = m · σ(m)                        (or y = m without the activation)

Backward, with dm = dy · silu'(m), silu'(m) = σ(m) · (1 + m · (1 − σ(m))), sums Σ_s over space, Σ_b over the batch:

    dshift = Σ_s dm                  dscale  = Σ_s dm · (x̂ · weight + bias)
    dbias  = Σ_b Σ_s dm · (1 + scale)          dweight = Σ_b Σ_s dm · (1 + scale) · x̂
    dx̂     = dm · (1 + scale) · weight
    dx     = rstd · (dx̂ − mean_g(dx̂) − x̂ · mean_g(dx̂ · x̂))      (the GroupNorm backward: d/dh of x̂)
    dadd   = Σ_s dx

Math in fp32 (fp64 for fp64 inputs); y and dx in x's dtype and memory layout, every other gradient in the dtype of
its input; mean and rstd of shape (B, G) in the compute dtype. Absent optional inputs act as weight = 1, bias = 0,
add = scale = shift = 0, and their gradients are returned as empty tensors.
"""
from __future__ import annotations

import math

import torch

from .._shared import compute_dtype, optional_grad
from .._validation import match_layout


def _per_channel(t, x, dtype, default):
    """A (C,) or (B, C) tensor as a (·, C, 1, …, 1) tensor broadcasting against x, or ``default`` when absent."""
    if t is None:
        return default
    return t.to(dtype).reshape(t.shape + (1,) * (x.dim() - 2))


def _grouped(t, num_groups):
    """t of shape (B, C, *spatial) as (B, G, C/G · S) (explicit sizes: -1 is ambiguous for empty tensors)."""
    return t.reshape(t.shape[0], num_groups, t.shape[1] // num_groups * math.prod(t.shape[2:]))


def _normalized(x, add, mean, rstd, num_groups, dtype):
    """x̂ = (x + add − mean) · rstd in the compute dtype, in x's shape, from the saved statistics."""
    h = x.to(dtype) + _per_channel(add, x, dtype, 0.0)
    return ((_grouped(h, num_groups) - mean[..., None]) * rstd[..., None]).reshape(x.shape)


def _pre_activation(xhat, weight, bias, scale, shift, dtype):
    """(n, gain, m): n = x̂ · weight + bias, gain = 1 + scale, m = n · gain + shift."""
    n = xhat * _per_channel(weight, xhat, dtype, 1.0) + _per_channel(bias, xhat, dtype, 0.0)
    gain = 1.0 + _per_channel(scale, xhat, dtype, 0.0)
    return n, gain, n * gain + _per_channel(shift, xhat, dtype, 0.0)


def group_norm_silu(x, weight, bias, add, scale, shift, num_groups: int, eps: float, silu: bool):
    """(y, mean, rstd) as in the module docstring."""
    dtype = compute_dtype(x)
    h = _grouped(x.to(dtype) + _per_channel(add, x, dtype, 0.0), num_groups)
    # Deviations from a pivot, the group's first value, so that a large mean costs no precision (as in the kernels).
    pivot = h[..., :1] if h.numel() else h.new_zeros(h.shape[:2] + (1,))
    dev = h - pivot
    if h.numel():
        var, mean_dev = torch.var_mean(dev, dim=-1, unbiased=False)
    else:  # empty groups: mean 0, variance 0 (as the kernels define them)
        var = mean_dev = h.new_zeros(h.shape[:2])
    rstd = torch.rsqrt(var + eps)
    xhat = ((dev - mean_dev[..., None]) * rstd[..., None]).reshape(x.shape)
    m = _pre_activation(xhat, weight, bias, scale, shift, dtype)[2]
    y = m * torch.sigmoid(m) if silu else m
    return match_layout(y, x, dtype=x.dtype), pivot[..., 0] + mean_dev, rstd


def group_norm_silu_backward(grad_y, x, weight, bias, add, scale, shift, mean, rstd, num_groups: int, silu: bool):
    """(dx, dweight, dbias, dadd, dscale, dshift) from the explicit formulas of the module docstring."""
    dtype = compute_dtype(x)
    xhat = _normalized(x, add, mean, rstd, num_groups, dtype)
    n, gain, m = _pre_activation(xhat, weight, bias, scale, shift, dtype)
    dm = grad_y.to(dtype)
    if silu:
        sig = torch.sigmoid(m)
        dm = dm * sig * (1.0 + m * (1.0 - sig))

    def over_space(t):  # Σ_s, also for no spatial dims (where torch would read an empty dim list as "all dims")
        return t.reshape(*t.shape[:2], math.prod(t.shape[2:])).sum(-1)

    dn = dm * gain
    dxhat = _grouped(dn * _per_channel(weight, x, dtype, 1.0), num_groups)
    xhat_g = _grouped(xhat, num_groups)
    dx = rstd[..., None] * (dxhat - dxhat.mean(-1, keepdim=True)
                            - xhat_g * (dxhat * xhat_g).mean(-1, keepdim=True))
    dx = dx.reshape(x.shape)
    return (
        match_layout(dx, x, dtype=x.dtype),
        optional_grad(over_space(dn * xhat).sum(0), weight, x),
        optional_grad(over_space(dn).sum(0), bias, x),
        optional_grad(over_space(dx), add, x),
        optional_grad(over_space(dm * n), scale, x),
        optional_grad(over_space(dm), shift, x),
    )
