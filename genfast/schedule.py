"""DDPM noise schedules: the float64 tables q(x_t | x_0) and the samplers index by timestep.

With β_t the variance of step t (t = 0 .. T−1), α_t = 1 − β_t and ᾱ_t = ∏_{s≤t} α_s:

    x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε,       q(x_{t−1} | x_t, x_0) = N(c1_t·x_0 + c2_t·x_t, β̃_t)

with ᾱ_{−1} = 1, β̃_t = β_t(1−ᾱ_{t−1})/(1−ᾱ_t), c1_t = β_t√ᾱ_{t−1}/(1−ᾱ_t), c2_t = √α_t(1−ᾱ_{t−1})/(1−ᾱ_t).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

TABLES = (
    "betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_mean_coef1", "posterior_mean_coef2",
)


def _check_num_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return int(num_steps)


def _check_real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


class NoiseSchedule(nn.Module):
    """The tables of a DDPM noise schedule, as float64 buffers of shape (T,) that move with ``.to(device)``.

    Build one with :meth:`linear` or :meth:`cosine`, or from any ``betas`` in (0, 1). Buffers: ``betas`` (β),
    ``alphas`` (α = 1 − β), ``alphas_cumprod`` (ᾱ), ``alphas_cumprod_prev`` (ᾱ_{t−1}, 1 at t = 0),
    ``sqrt_alphas_cumprod``, ``sqrt_one_minus_alphas_cumprod``, ``posterior_variance`` (β̃) and
    ``posterior_mean_coef1`` / ``posterior_mean_coef2`` (c1, c2; see the module docstring). The tables stay float64
    whatever dtype a ``.to()`` / ``.half()`` asks for: only their device follows.
    """

    def __init__(self, *, betas: Tensor):
        super().__init__()
        if not isinstance(betas, Tensor) or not betas.is_floating_point():
            raise TypeError(f"betas must be a floating-point torch.Tensor, got {betas!r:.80}")
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas must have shape (num_steps,) with num_steps >= 1, got {tuple(betas.shape)}")
        betas = betas.detach().to(torch.float64)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must all lie in the open interval (0, 1)")
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        one_minus = 1.0 - alphas_cumprod
        tables = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=one_minus.sqrt(),
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / one_minus,
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / one_minus,
            posterior_mean_coef2=alphas.sqrt() * (1.0 - alphas_cumprod_prev) / one_minus,
        )
        for name in TABLES:
            self.register_buffer(name, tables[name].contiguous())

    @classmethod
    def linear(cls, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """β_t evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020); 0 < beta_start ≤ beta_end < 1."""
        num_steps = _check_num_steps(num_steps)
        beta_start = _check_real(beta_start, "beta_start")
        beta_end = _check_real(beta_end, "beta_end")
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1, "
                             f"got beta_start={beta_start}, beta_end={beta_end}")
        return cls(betas=torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))

    @classmethod
    def cosine(cls, num_steps: int = 1000, s: float = 0.008) -> "NoiseSchedule":
        """Nichol & Dhariwal 2021: ᾱ(t) = f(t)/f(0) with f(t) = cos²(((t/T) + s)/(1 + s)·π/2) for t = 0 .. T, and
        β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999) for step t = 0 .. T−1; s ≥ 0."""
        num_steps = _check_num_steps(num_steps)
        s = _check_real(s, "s")
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s}")
        steps = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
        f = torch.cos((steps + s) / (1.0 + s) * (math.pi / 2)) ** 2
        alpha_bar = f / f[0]
        return cls(betas=torch.clamp(1.0 - alpha_bar[1:] / alpha_bar[:-1], max=0.999))

    @property
    def num_steps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would cast the float64 tables: take only the device that fn asks for
        for name, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}"
