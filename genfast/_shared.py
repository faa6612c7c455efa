"""Helpers that the references (``genfast/reference``) and the Triton kernels (``kernels/``) both need. It imports
neither, so the oracle stays independent of the code it checks."""
from __future__ import annotations

import os
import struct

import torch

# the model outputs the sampler steps and the training loss take (diffusers' ``prediction_type``)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# the DDPM step's variances (diffusers' ``variance_type``): the posterior's β̃ or β
VARIANCE_TYPES = ("fixed_small", "fixed_large")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the references and the kernels compute in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def triton_interpret() -> bool:
    """Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``, read before genfast is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def optional_grad(value: torch.Tensor, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The gradient ``value`` of the optional input ``t`` in t's dtype; an empty tensor where t is absent (a
    backward op returns tensors only)."""
    return x.new_empty(0) if t is None else value.to(t.dtype)


def penalty_scale(weight: float, batch: int) -> float:
    """weight / B, the factor of Σ_b(‖g_b‖ − 1)² in the WGAN-GP penalty (an empty batch divides by 1: its penalty
    is 0, not NaN)."""
    return weight / max(batch, 1)


def quantile_position(numel: int, ratio: float, dtype: torch.dtype) -> tuple[int, int, float]:
    """(lo, hi, weight) of the ``ratio`` quantile of ``numel`` values as torch.quantile computes it in ``dtype``
    (fp32 or fp64): the order statistics v_lo ≤ v_hi (0-based, ascending) and quantile = torch.lerp(v_lo, v_hi,
    weight). The rank h = ratio·(numel − 1) is formed in float64 from ``ratio`` rounded to ``dtype`` (as torch's
    scalar tensor of the input's dtype is), lo = ⌊h⌋, hi = ⌈h⌉, weight = h − lo rounded to ``dtype``."""
    rank = _rounded(ratio, dtype) * (numel - 1)
    lo = min(int(rank), numel - 1)
    hi = min(lo + (rank > lo), numel - 1)
    return lo, hi, _rounded(rank - lo, dtype)


def _rounded(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to fp32 (to nearest, as a cast does) for fp32, as it is for fp64; on the host."""
    return struct.unpack("f", struct.pack("f", value))[0] if dtype == torch.float32 else value
